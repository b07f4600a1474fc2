"""Time to first token with and without prefix reuse: a long shared system prompt, different questions.

    python bench/prefix_reuse.py [--model PATH]

The engine alone (no MQTT), SmolLM2-135M-Instruct Q4_1 by default, 2 slots, n_ctx 2048, 2 threads; the
runs alternate reuse on/off twice so drift on a shared machine falls on both. Prints one line per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.engine.llama import LlamaEngine, SamplingParams  # noqa: E402
from bench.models import smollm2  # noqa: E402

ROOMS = ["kitchen", "hall", "garage", "office", "bedroom"]
SYSTEM = "You are the voice assistant of a smart home. " + " ".join(
    f"Room {i}: the {ROOMS[i % 5]} has lights, a thermostat set to {18 + i % 5} degrees and a window sensor."
    for i in range(24)
)
QUESTIONS = ["Is the kitchen window open?", "What is the hall thermostat set to?", "Turn off the garage lights.",
             "How warm is the office?", "Which rooms have lights?", "Is it cold in the bedroom?"]


def run(model: Path, *, reuse: bool) -> tuple[int, list[float], list[int]]:
    engine = LlamaEngine(model, n_ctx=2048, threads=2, parallel=2)
    engine.load()
    engine._reuse_prefix = reuse and engine._reuse_prefix  # the knob the engine sets from the model
    ttfts, cached, n = [], [], 0
    for question in QUESTIONS:
        tokens = engine.tokenize_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        n = len(tokens)
        result = engine.generate(tokens, SamplingParams(max_tokens=4, temperature=0), lambda _t: None, lambda: False)
        ttfts.append(result.ttft_s * 1000)
        cached.append(result.cached_tokens)
    engine.close()
    return n, ttfts, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a chat GGUF (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    args = parser.parse_args()
    model = args.model or smollm2().path
    for reuse in (True, False, True, False):
        n, ttfts, cached = run(model, reuse=reuse)
        print(f"reuse={'on' if reuse else 'off'}: prompt {n} tokens, first TTFT {ttfts[0]:.0f} ms, later TTFT median "
              f"{statistics.median(ttfts[1:]):.0f} ms, reused {cached[1:]}", flush=True)


if __name__ == "__main__":
    main()
