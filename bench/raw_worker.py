"""Raw llama-cpp-python in its own process: the baseline every contender is compared against.

    python -m bench.raw_worker   (driven by bench/raw.py)

Reads JSON commands on stdin, one per line, and answers one JSON line each. The first line configures
the model (path, n_ctx, threads); the answer ``{"ready": ...}`` comes once ``llama_cpp.Llama`` has
loaded it. Then:

* ``{"prompt": ..., "max_tokens": N}``: a streamed greedy completion, as a user of the library writes
  it; answers time to first token, decode tokens/s and the total;
* ``{"op": "prefill", "tokens": N}``: the time to evaluate N prompt tokens from an empty cache (one
  prefill chunk of the batching engine);
* ``{"op": "rss"}``: this process's resident set size.
"""

from __future__ import annotations

import json
import sys
import time

import psutil


def _complete(llm: object, prompt: str, max_tokens: int) -> dict[str, object]:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    finish = None
    for chunk in llm.create_completion(  # type: ignore[attr-defined]
            prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True):
        now = time.perf_counter()
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None:
            finish = choice["finish_reason"]
            last = now
            continue
        # One chunk per generated token (text held back for a stop string or split UTF-8 comes later,
        # merged); the closing chunk only carries finish_reason.
        if tokens == 0:
            first = now
        tokens += 1
        last = now
    total = last - started
    return {"ttft_ms": (first - started) * 1000, "tokens": tokens, "total_ms": total * 1000, "finish": finish,
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def _prefill(llm: object, n: int) -> dict[str, object]:
    text = " ".join(f"item {i} of the list is a word" for i in range(n))
    tokens = llm.tokenize(text.encode())[:n]  # type: ignore[attr-defined]
    llm.reset()  # type: ignore[attr-defined]
    started = time.perf_counter()
    llm.eval(tokens)  # type: ignore[attr-defined]
    took = time.perf_counter() - started
    llm.reset()  # type: ignore[attr-defined]
    return {"prefill_ms": took * 1000, "tokens": len(tokens)}


def main() -> None:
    """Serve commands on stdin until it closes."""
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
            out: dict[str, object] = {"rss": psutil.Process().memory_info().rss}
        elif cmd.get("op") == "prefill":
            out = _prefill(llm, int(cmd["tokens"]))
        else:
            out = _complete(llm, cmd["prompt"], int(cmd["max_tokens"]))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
