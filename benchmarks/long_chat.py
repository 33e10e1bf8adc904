"""Long chats at a flat cost: the mean time to first token of 40 chat turns (the first with an
image) in a context that fills early, divided by the same 40 turns in a context that never
fills. Target: at most 1.5.

Each run is a fresh process that drives ``llava_cli.conversation`` and ``llava_cli.room``
exactly as ``llava chat`` does every turn (make room, then ask), with the same prompts and
greedy sampling. A turn's time to first token is the wall time from before making room to the
first piece of the answer: measuring and dropping are part of what a turn costs.

The context that fills early holds 2,048 tokens: full after about a dozen turns on both bench
pairs, then made room for every few turns. The one that never fills holds 8,192, more than the
bench pairs were trained for (4,096), so both are made as Sessions directly, as ``--ctx``
would not: their answers, random words of a synthetic vocabulary, take about twice as many
tokens read back as text as they took when generated, and 40 turns of them measure over 4,096
(the trained context matters to the answers' quality, not to speed).

Run alone: ``python benchmarks/long_chat.py --quick`` (the small pair) prints the row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_cli.synthetic import ModelPair

FILLING_CTX = 2048
ROOMY_CTX = 8192
MAX_TOKENS = 16
FIRST_PROMPT = "Describe this picture in detail."
TARGET = 1.5

TURNS = """
import json, sys, time
from pathlib import Path
from llava_cli.conversation import Conversation, open_model
from llava_cli.engine import Session
from llava_cli.images import load
from llava_cli.options import RuntimeOptions, SamplingParams
from llava_cli.commands.room import answer_room, make_room
model, mmproj, image, first_prompt, n_ctx, turns, n = sys.argv[1:8]
turns, n = int(turns), int(n)
loaded = open_model(Path(model), Path(mmproj), RuntimeOptions(cache=False))
conv = Conversation(loaded)
sampling = SamplingParams(temperature=0, max_tokens=n)
picture = load(image)
n_ctx = int(n_ctx)
loaded.session.close()
loaded.session = Session(loaded.engine, n_ctx)  # not capped at the trained context
ttfts, drops, dropped = [], 0, 0
for i in range(turns):
    prompt = first_prompt if i == 0 else f"And part {i}?"
    images = [picture] if i == 0 else []
    started = time.perf_counter()
    gone = make_room(conv, prompt, images, answer_room=answer_room(n, n_ctx))
    stream = conv.ask(prompt, images, sampling)
    next(stream)
    ttfts.append(time.perf_counter() - started)
    for _ in stream:
        pass
    if gone is not None:
        drops, dropped = drops + 1, dropped + gone.exchanges
print(json.dumps({"n_ctx": n_ctx, "ttft_s": ttfts, "drops": drops, "dropped": dropped,
                  "images_left": len(conv.images)}))
loaded.close()
"""


def _turns(pair: ModelPair, image: Path, *, turns: int, fills: bool) -> dict[str, Any]:
    n_ctx = FILLING_CTX if fills else ROOMY_CTX
    cmd = [sys.executable, "-c", TURNS, str(pair.model), str(pair.mmproj), str(image),
           FIRST_PROMPT, str(n_ctx), str(turns), str(MAX_TOKENS)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, env=env, check=False, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the long-chat run failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure(pair: ModelPair, image: Path, *, turns: int = 40) -> dict[str, Any]:
    """The same ``turns`` chat turns (the first with ``image``) in a context that fills early
    and in one that never fills: mean time to first token of each, and their ratio (target:
    at most 1.5). ``follow_up_ratio`` leaves out the first turn (the image), the same in both."""
    filling = _turns(pair, image, turns=turns, fills=True)
    roomy = _turns(pair, image, turns=turns, fills=False)
    if roomy["drops"]:
        raise RuntimeError(f"the roomy context ({roomy['n_ctx']} tokens) filled up")
    fill_mean = statistics.mean(filling["ttft_s"])
    roomy_mean = statistics.mean(roomy["ttft_s"])
    fill_follow = statistics.mean(filling["ttft_s"][1:])
    roomy_follow = statistics.mean(roomy["ttft_s"][1:])
    return {
        "turns": turns,
        "filling_ctx": filling["n_ctx"],
        "roomy_ctx": roomy["n_ctx"],
        "drops": filling["drops"],  # times the filling context made room
        "dropped_exchanges": filling["dropped"],
        "image_kept": filling["images_left"] == 1,
        "filling_mean_ttft_s": fill_mean,
        "roomy_mean_ttft_s": roomy_mean,
        "ratio": fill_mean / roomy_mean,
        "filling_follow_up_ttft_s": fill_follow,
        "roomy_follow_up_ttft_s": roomy_follow,
        "follow_up_ratio": fill_follow / roomy_follow,
        "filling_max_ttft_s": max(filling["ttft_s"]),
        "target": TARGET,
    }


def row(result: dict[str, Any]) -> str:
    """The Markdown table row (``| measure | llava | baseline | ratio | target |``)."""
    label = (
        f"long chat, {result['turns']} turns: mean first token, context filling early "
        f"({result['filling_ctx']} tokens, {result['drops']} drops) ÷ never full"
    )
    fill, roomy = result["filling_mean_ttft_s"], result["roomy_mean_ttft_s"]
    return f"| {label} | {fill:.3g} | {roomy:.3g} | {result['ratio']:.2f} | ≤ {TARGET} |"


def main() -> int:
    from benchmarks.models import SHAPES, build
    from benchmarks.run import _photo

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small pair: a fast check")
    parser.add_argument("--turns", type=int, default=40)
    args = parser.parse_args()
    pair = build(SHAPES["quick" if args.quick else "full"])
    with tempfile.TemporaryDirectory(prefix="llava-long-chat-") as work:
        image = Path(work) / "photo.png"
        _photo(image)
        result = measure(pair, image, turns=args.turns)
    print(json.dumps(result), file=sys.stderr)
    print(row(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
