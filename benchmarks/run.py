"""``make bench``: llava against llama-cpp-python's stock ``Llava15ChatHandler``, side by side.

Every figure is the median of ``--runs`` runs (3 by default) in this one process tree, on the
same synthetic pair (``benchmarks/models.py``). Prints a Markdown table with ratios and the
targets, and writes the numbers as JSON beside the models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fixed_cost, long_chat, native
from benchmarks.models import SHAPES, build, cache_dir
from llava_cli.synthetic import ModelPair

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
    done = native.measure(cmd, env)
    return done.wall_s, done.rss_mb, done.stdout


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small pair: a fast check")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--no-native", action="store_true", help="skip llama.cpp's own binaries (no build)"
    )
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

    tools = None if args.no_native else native.build(cache_dir())
    threads = str(len(os.sched_getaffinity(0)))  # llava's default: one per available CPU
    # The same prompt as llama-mtmd-cli reads it: the vicuna format without a system prompt.
    ask_equal = [*ask, "--system", "", "--no-cache", "--threads", threads]
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    def run_once(i: int) -> None:
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
        if tools is not None:
            one_shot_against_native(tools, pair, image, ask_equal, env, int(n), add)
        if server is not None:  # the same one-shot, its layers on a loopback RPC server
            add("rpc_ask_wall_s", peak_rss([*ask, "--no-cache", "--rpc", server], env)[0])
        cache_env = {**env, "LLAVA_HOME": str(work / f"cache-{i}")}
        first = json.loads(peak_rss(ask, cache_env)[2])["timings"]["ttft_s"]
        second = json.loads(peak_rss(ask, cache_env)[2])["timings"]["ttft_s"]
        add("cache_first_ttft_s", first)
        add("cache_second_ttft_s", second)

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(rpc_server(env)) if rpc_available() else None
        for i in range(args.runs):
            run_once(i)
    for _ in range(5):
        add("help_s", peak_rss([py, "-m", "llava_cli", "--help"], env)[0])
    print("long chat: 40 turns, twice", file=sys.stderr)
    long = long_chat.measure(pair, image)  # a mean over 40 turns each: measured once
    print("fixed cost: the tiny model", file=sys.stderr)
    fixed = fixed_cost.measure(runs=10)

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
        *(
            [
                (
                    "one-shot `ask` through a loopback RPC server ÷ local, wall",
                    m["rpc_ask_wall_s"],
                    m["ask_wall_s"],
                    "",
                )
            ]
            if "rpc_ask_wall_s" in m
            else []
        ),
        (
            f"long chat, 40 turns: mean first token, context filling early ({long['drops']} "
            "drops) ÷ never full",
            long["filling_mean_ttft_s"],
            long["roomy_mean_ttft_s"],
            "≤ 1.5",
        ),
        (
            "… the same, turns 2-40 (the image turn left out)",
            long["filling_follow_up_ttft_s"],
            long["roomy_follow_up_ttft_s"],
            "",
        ),
        (
            "whole `ask` on the tiny test model, s (default threads)",
            fixed["ask_default_threads_s"],
            0.30,
            "≤ 0.30 s",
        ),
        ("whole `ask` on the tiny test model, s (`--threads 1`)", fixed["ask_s"], 0.30, ""),
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
        print(f"| {label} | {ours:.4g} | {theirs:.4g} | {ratio:.2f} | {target} |")
    if tools is not None:
        print_native_tables(m, fixed)
        print_repack_table(pair, int(threads))
    saved = cache_dir() / f"results-{shape.name}.json"
    saved.write_text(json.dumps({"shape": shape.name, "runs": results, "median": m}, indent=2))
    print(f"\nbaselines: llama-cpp-python's Llava15ChatHandler; llama.cpp's own decode figure;"
          f" the first run. JSON: {saved}")  # fmt: skip
    return 0


NATIVE = {  # llama-mtmd-cli's configurations; the best of them is the anchor
    "default (repack on)": {"repack": True, "warmup": True},
    "--no-repack": {"repack": False, "warmup": True},
    "--no-repack --no-warmup": {"repack": False, "warmup": False},
}
PARTS = ("load_s", "image_encode_s", "prefill_s", "decode_s")


def one_shot_against_native(
    tools: native.Tools,
    pair: ModelPair,
    image: Path,
    ask: list[str],
    env: dict[str, str],
    n: int,
    add: Callable[[str, float], None],
) -> None:
    """One whole ``llava ask`` and one whole ``llama-mtmd-cli`` run per configuration, on the
    same files, prompt format and answer length."""
    done = native.measure(ask, env)
    record = json.loads(done.stdout)
    add("equal_wall_s", done.wall_s)
    add("equal_rss_mb", done.rss_mb)
    add("equal_prompt_tokens", record["usage"]["prompt_tokens"])
    for part in PARTS:
        add(f"equal_{part}", record["timings"][part])
    threads = int(ask[ask.index("--threads") + 1])
    for name, config in NATIVE.items():
        run = native.run_mtmd_cli(
            native.mtmd_cli_args(
                tools, pair.model, pair.mmproj, image, QUESTION, n, threads=threads, ctx=2048,
                **config,
            )
        )  # fmt: skip
        add(f"native {name} wall_s", run.wall_s)
        add(f"native {name} rss_mb", run.rss_mb)
        add(f"native {name} prompt_tokens", run.prompt_tokens)
        add(f"native {name} encode_s", run.encode_s)
        add(f"native {name} prompt_s", run.prompt_s)
        add(f"native {name} decode_s", run.decode_s)


@contextlib.contextmanager
def rpc_server(env: dict[str, str]) -> Iterator[str]:
    """`llava rpc-server` on a free loopback port, for the bench's RPC row."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "llava_cli", "rpc-server", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def rpc_available() -> bool:
    from llava_cli.engine import rpc

    return rpc.available()


def print_native_tables(m: dict[str, float], fixed: dict[str, Any]) -> None:
    best = min(NATIVE, key=lambda name: m[f"native {name} wall_s"])
    b = f"native {best} "
    print(f"\nllava against llama.cpp's own `llama-mtmd-cli` (best configuration: `{best}`), "
          f"one-shot, whole process; prompts of {m['equal_prompt_tokens']:.0f} and "
          f"{m[b + 'prompt_tokens']:.0f} tokens (llava with `--system \"\"`, the binary "
          "with `--chat-template vicuna`: the same LLaVA-1.5 format)\n")  # fmt: skip
    print("| measure | llava | llama-mtmd-cli | ratio | target |")
    print("|---|---|---|---|---|")
    for label, ours, theirs, target in (
        ("one-shot wall, s", m["equal_wall_s"], m[b + "wall_s"], "≤ 1.10"),
        ("peak RSS, MB", m["equal_rss_mb"], m[b + "rss_mb"], "≤ 1.05"),
    ):
        print(f"| {label} | {ours:.4g} | {theirs:.4g} | {ours / theirs:.2f} | {target} |")
    native_work = m[b + "encode_s"] + m[b + "prompt_s"] + m[b + "decode_s"]
    llava_work = sum(m[f"equal_{part}"] for part in PARTS[1:])
    print("\nWhere the difference is (seconds; llava's own timings, llama.cpp's log for the "
          "binary):\n")  # fmt: skip
    print("| part | llava | llama-mtmd-cli | difference |")
    print("|---|---|---|---|")
    for label, ours, theirs in (
        ("start-up, imports, load, image file, exit", m["equal_wall_s"] - llava_work,
         m[b + "wall_s"] - native_work),
        ("image encode (CLIP)", m["equal_image_encode_s"], m[b + "encode_s"]),
        ("prefill (image and text tokens)", m["equal_prefill_s"], m[b + "prompt_s"]),
        ("decode", m["equal_decode_s"], m[b + "decode_s"]),
    ):  # fmt: skip
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | {ours - theirs:+.2f} |")
    print(f"\nOf llava's first row: Python start-up and the command line's imports (`llava "
          f"--version`) {fixed['version_s']:.2f} s, the model load {m['equal_load_s']:.2f} s; "
          "the image file is read and decoded on a thread while the model loads. The binary's "
          "prefill is llama.cpp's prompt clock less the encode it also covers; its decode "
          "leaves out the first token and sampling.")  # fmt: skip
    ours_n, theirs_n = m["equal_prompt_tokens"], m[b + "prompt_tokens"]
    if abs(ours_n - theirs_n) > 0.02 * theirs_n:
        print(f"\nWARNING: the prompts differ by more than 2% ({ours_n:.0f} and "
              f"{theirs_n:.0f} tokens): the comparison is not like for like")  # fmt: skip
    print("\n| llama-mtmd-cli configuration | wall, s | peak RSS, MB |\n|---|---|---|")
    for name in NATIVE:
        print(f"| `{name}` | {m[f'native {name} wall_s']:.2f} | "
              f"{m[f'native {name} rss_mb']:.0f} |")  # fmt: skip


def print_repack_table(pair: ModelPair, threads: int) -> None:
    """llama-bench, repacking off and on, for each build this CPU can run: the measurement
    behind --repack's default (engine.model.repack_default)."""
    builds = {"this machine's flags": native.cmake_flags()}
    if native.cmake_flags("--portable") != builds["this machine's flags"]:
        builds["portable (AVX2)"] = native.cmake_flags("--portable")
    print(f"\nCPU weight repacking, llama-bench on the bench model (pp512 and tg32 tokens/s, "
          f"{threads} threads, 3 repetitions):\n")  # fmt: skip
    print("| build | repack | prompt tok/s | decode tok/s |\n|---|---|---|---|")
    for label, flags in builds.items():
        tools = native.build(cache_dir(), flags)
        for row in native.repack_bench(tools, pair.model, threads):
            print(f"| {label} | {'on' if row.repack else 'off'} | {row.prompt_tps:.1f} | "
                  f"{row.decode_tps:.1f} |")  # fmt: skip


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
