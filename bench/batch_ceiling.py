"""What batching can give on this machine at all: the engine alone, no MQTT, no daemon.

The issue's target (4 clients ≥ 1.6x one client) is judged on the daemon over MQTT. This measures the
same ratio one layer down, straight on :class:`agent.engine.llama.LlamaEngine`: N sequences started
together, stepped until all end, greedy, 128 tokens each from bench/prompts.py. It also splits each step's
time into ``llama_decode`` (the C++ forward pass over the batch) and the rest (sampling, detokenizing,
Python). If the engine alone stays under 1.6x, the daemon cannot reach it on this CPU; if the engine
reaches it and the daemon does not, the difference is ours to find.

    python -m bench.batch_ceiling [--models smollm2 gemma3] [--files X.gguf ...] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from agent.engine.llama import LlamaEngine, SamplingParams
from bench.models import gemma3_270m, smollm2
from bench.prompts import PROMPTS

MODELS = {"smollm2": smollm2, "gemma3": gemma3_270m}
N_GEN = 128


def run_level(engine: LlamaEngine, n: int, first_prompt: int) -> dict[str, float]:
    """Start ``n`` sequences together and step until all end: aggregate decode tokens/s and time split."""
    import llama_cpp

    decode_s = 0.0
    real_decode = llama_cpp.llama_decode

    def timed_decode(ctx: Any, batch: Any) -> int:
        nonlocal decode_s
        t = time.perf_counter()
        rc = real_decode(ctx, batch)
        decode_s += time.perf_counter() - t
        return int(rc)

    counts = [0] * n
    done = [False] * n
    params = SamplingParams(max_tokens=N_GEN, temperature=0.0, top_k=1, top_p=1.0)
    llama_cpp.llama_decode = timed_decode
    try:
        for i in range(n):
            prompt = engine.tokenize_prompt(PROMPTS[(first_prompt + i) % len(PROMPTS)])

            def on_text(_text: str, i: int = i) -> None:
                counts[i] += 1

            def on_done(_outcome: Any, i: int = i) -> None:
                done[i] = True

            engine.start(prompt, params, on_text, on_done)
        # Prefill first (every prompt fills the batch), then time the decode steps only.
        while any(s.pending is None for s in engine._running):  # a bench looks inside
            engine.step()
        decode_s = 0.0
        started = time.perf_counter()
        tokens = steps = 0
        while not all(done):
            tokens += engine.step()
            steps += 1
        wall = time.perf_counter() - started
    finally:
        llama_cpp.llama_decode = real_decode
    return {"tokens_per_s": tokens / wall, "step_ms": 1000 * wall / steps, "decode_ms": 1000 * decode_s / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["smollm2", "gemma3"])
    parser.add_argument("--files", nargs="*", type=Path, default=[], help="further GGUF files (e.g. requantized)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| model | sequences | aggregate tokens/s | x one | step ms | llama_decode ms | rest ms |")
    print("|---|---|---|---|---|---|---|")
    models = [(m.label, m.path) for m in (MODELS[name]() for name in args.models)]
    for label, path in [*models, *((f.name, f) for f in args.files)]:
        engine = LlamaEngine(Path(path), n_ctx=2048, threads=args.threads, parallel=4)
        engine.load()
        try:
            run_level(engine, 1, 0)  # warm-up
            results: dict[int, list[dict[str, float]]] = {1: [], 2: [], 4: []}
            for r in range(args.rounds):
                for n, rows in results.items():  # interleaved, so drift falls on every level alike
                    rows.append(run_level(engine, n, r))
            one = statistics.median(x["tokens_per_s"] for x in results[1])
            for n, rows in results.items():
                tps = statistics.median(x["tokens_per_s"] for x in rows)
                step = statistics.median(x["step_ms"] for x in rows)
                dec = statistics.median(x["decode_ms"] for x in rows)
                print(f"| {label} | {n} | {tps:.1f} | {tps / one:.2f} | {step:.2f} | {dec:.2f} | {step - dec:.2f} |")
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
