"""Raw llama-cpp-python in its own process: the baseline the daemon is compared against.

Reads JSON commands on stdin, one per line; answers one JSON line each. Same model, n_ctx, threads,
prompt and greedy settings as the daemon run.
"""

from __future__ import annotations

import json
import sys
import time

import psutil


def main() -> None:
    import llama_cpp

    cfg = json.loads(sys.stdin.readline())
    llm = llama_cpp.Llama(
        model_path=cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
        verbose=False,
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "rss":
            print(json.dumps({"rss": psutil.Process().memory_info().rss}), flush=True)
            continue
        prompt = cmd["prompt"]
        started = time.perf_counter()
        first = last = 0.0
        n = 0
        for _chunk in llm.create_completion(prompt, max_tokens=cmd["max_tokens"], temperature=0.0, stream=True):
            now = time.perf_counter()
            if n == 0:
                first = now
            last = now
            n += 1
        print(json.dumps({"ttft_ms": (first - started) * 1000, "n": n,
                          "tps": (n - 1) / (last - first) if n > 1 and last > first else 0.0}), flush=True)


if __name__ == "__main__":
    main()
