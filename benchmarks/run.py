"""``make bench``: llava against llama-cpp-python's stock ``Llava15ChatHandler``, side by side.

Every figure is the median of ``--runs`` runs (3 by default) in this one process tree, on the
same synthetic pair (``benchmarks/models.py``). Prints a Markdown table with ratios and the
targets, and writes the numbers as JSON beside the models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import SHAPES, build, cache_dir

QUESTION = "Describe this picture in detail."
FOLLOW_UP = "What else?"

OURS = """
import json, sys, time
from pathlib import Path
import llama_cpp
from llava_cli.conversation import Conversation, open_model
from llava_cli.images import load
from llava_cli.options import RuntimeOptions, SamplingParams
model, mmproj, image, question, follow_up, n = sys.argv[1:7]
loaded = open_model(Path(model), Path(mmproj), RuntimeOptions(ctx=2048, cache=False))
conv = Conversation(loaded)
sampling = SamplingParams(temperature=0, max_tokens=int(n))
llama_cpp.llama_perf_context_reset(loaded.session.ctx)
t = time.perf_counter()
"".join(conv.ask(question, [load(image)], sampling))
first = time.perf_counter() - t
first_ttft = conv.last.timings.ttft_s
perf = llama_cpp.llama_perf_context(loaded.session.ctx)
ours_tps = conv.last.timings.decode_tokens_per_s
llama_tps = perf.n_eval / (perf.t_eval_ms / 1000) if perf.n_eval else 0.0
t = time.perf_counter()
"".join(conv.ask(follow_up, [], sampling))
second = time.perf_counter() - t
print(json.dumps({"first_s": first, "follow_up_s": second, "decode_tps": ours_tps,
                  "llama_perf_tps": llama_tps, "first_ttft_s": first_ttft,
                  "follow_up_ttft_s": conv.last.timings.ttft_s}))
loaded.close()
"""

STOCK = """
import base64, json, sys, time
import llama_cpp
from llama_cpp.llama_chat_format import Llava15ChatHandler
model, mmproj, image, question, follow_up, n, mode = sys.argv[1:8]
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=model, chat_handler=Llava15ChatHandler(clip_model_path=mmproj,
      verbose=False), n_ctx=2048, verbose=False)
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
             {"type": "text", "text": question}]}]
def ask(messages):
    t = time.perf_counter(); first = None; text = ""
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=int(n), temperature=0,
                                            stream=True):
        first = first or time.perf_counter()
        text += chunk["choices"][0]["delta"].get("content") or ""
    return time.perf_counter() - t, (first or time.perf_counter()) - t, text
total, ttft, text = ask(messages)
out = {"first_s": total, "ttft_s": ttft, "wall_s": time.perf_counter() - t0}
if mode == "chat":
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow_up}]
    out["follow_up_s"], out["follow_up_ttft_s"], _ = ask(messages)
print(json.dumps(out))
llm.close()
"""


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:5]} failed ({proc.returncode})")
    return wall, rusage.ru_maxrss / 1024, out.decode()


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small pair: a fast check")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    pair = build(shape)
    work = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    image = work / "photo.png"
    _photo(image)
    env = {**os.environ, "LLAVA_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    n = str(args.max_tokens)
    base = [str(pair.model), str(pair.mmproj), str(image), QUESTION, FOLLOW_UP, n]
    ask = [py, "-m", "llava_cli", "ask", str(image), "--model", str(pair.model),
           "--mmproj", str(pair.mmproj), "-p", QUESTION, "--max-tokens", n,
           "--temperature", "0", "--ctx", "2048", "--json"]  # fmt: skip

    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for i in range(args.runs):
        print(f"run {i + 1} of {args.runs}", file=sys.stderr)
        wall, rss, out = peak_rss([*ask, "--no-cache"], env)
        record = json.loads(out)
        add("ask_wall_s", wall)
        add("ask_ttft_s", record["timings"]["ttft_s"])  # from the call, as for the stock one
        add("ask_rss_mb", rss)
        wall, rss, out = peak_rss([py, "-c", STOCK, *base, "ask"], env)
        stock = json.loads(out)
        add("stock_wall_s", wall)
        add("stock_ttft_s", stock["ttft_s"])
        add("stock_rss_mb", rss)
        mine = json.loads(peak_rss([py, "-c", OURS, *base], env)[2])
        add("chat_first_s", mine["first_s"])
        add("chat_follow_up_s", mine["follow_up_s"])
        add("chat_first_ttft_s", mine["first_ttft_s"])
        add("chat_follow_up_ttft_s", mine["follow_up_ttft_s"])
        add("decode_tps", mine["decode_tps"])
        add("llama_perf_tps", mine["llama_perf_tps"])
        stock_chat = json.loads(peak_rss([py, "-c", STOCK, *base, "chat"], env)[2])
        add("stock_follow_up_s", stock_chat["follow_up_s"])
        add("stock_follow_up_ttft_s", stock_chat["follow_up_ttft_s"])
        cache_env = {**env, "LLAVA_HOME": str(work / f"cache-{i}")}
        first = json.loads(peak_rss(ask, cache_env)[2])["timings"]["ttft_s"]
        second = json.loads(peak_rss(ask, cache_env)[2])["timings"]["ttft_s"]
        add("cache_first_ttft_s", first)
        add("cache_second_ttft_s", second)
    for _ in range(5):
        add("help_s", peak_rss([py, "-m", "llava_cli", "--help"], env)[0])

    m = {name: median(values) for name, values in results.items()}
    rows = [
        ("one-shot `ask`, wall (load included)", m["ask_wall_s"], m["stock_wall_s"], "≤ 1.0×"),
        ("one-shot time to first token (after loading)", m["ask_ttft_s"], m["stock_ttft_s"], ""),
        (
            "follow-up chat turn: first token",
            m["chat_follow_up_ttft_s"],
            m["stock_follow_up_ttft_s"],
            "",
        ),
        ("follow-up chat turn: whole answer", m["chat_follow_up_s"], m["stock_follow_up_s"], ""),
        (
            "follow-up ÷ first turn, first token (llava)",
            m["chat_follow_up_ttft_s"],
            m["chat_first_ttft_s"],
            "≤ 0.10",
        ),
        (
            "follow-up ÷ first turn, whole answer (llava)",
            m["chat_follow_up_s"],
            m["chat_first_s"],
            "",
        ),
        (
            "second `ask` on the image: first token",
            m["cache_second_ttft_s"],
            m["cache_first_ttft_s"],
            "≤ 0.15",
        ),
        (
            "decode tokens/s: llava ÷ llama_perf_context",
            m["decode_tps"],
            m["llama_perf_tps"],
            "≥ 0.97",
        ),
        ("peak RSS, MB (one-shot)", m["ask_rss_mb"], m["stock_rss_mb"], ""),
        ("`llava --help`, s", m["help_s"], 0.25, "≤ 0.25 s"),
    ]
    machine = platform.processor() or platform.machine()
    print(
        f"\n{shape.name} pair, {args.runs} runs each, median; {machine}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| measure | llava | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    for label, ours, theirs, target in rows:
        ratio = ours / theirs if theirs else float("nan")
        print(f"| {label} | {ours:.3g} | {theirs:.3g} | {ratio:.2f} | {target} |")
    out = cache_dir() / f"results-{shape.name}.json"
    out.write_text(json.dumps({"shape": shape.name, "runs": results, "median": m}, indent=2))
    print(f"\nbaselines: llama-cpp-python's Llava15ChatHandler; llama.cpp's own decode figure;"
          f" the first run. JSON: {out}")  # fmt: skip
    return 0


def _photo(path: Path) -> None:
    """A 640×480 picture with some structure (gradients and shapes)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480))
    pixels = image.load()
    assert pixels is not None
    for y in range(480):
        for x in range(640):
            pixels[x, y] = (x * 255 // 640, y * 255 // 480, (x + y) % 256)
    draw = ImageDraw.Draw(image)
    draw.ellipse((200, 120, 440, 360), fill=(230, 40, 40))
    draw.rectangle((40, 40, 160, 200), fill=(20, 40, 220))
    image.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
