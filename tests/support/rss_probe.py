"""Measure what loading and running a GGUF model really adds to a process's memory.

Each measurement runs in a fresh Python subprocess (so allocator state, page cache mappings and
llama.cpp's globals from earlier loads do not leak into it):

1. import llama_cpp and psutil, initialise the llama.cpp backend, record the baseline RSS;
2. load the model (llama-cpp-python defaults: mmap on, f16 KV cache, ``n_batch`` 512);
3. fill the context with a prompt up to ``n_ctx - n_gen`` tokens (evaluated in ``n_batch`` chunks),
   then generate ``n_gen`` tokens: the last prompt batch attends over the whole cache, which is the
   largest compute graph llama.cpp ever runs, so this is the serving worst case;
4. report the RSS increase (current and peak) and llama.cpp's own buffer sizes from its log.

Used by ``tests/integration/test_estimate_accuracy.py`` and ``bench/estimate_accuracy.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

_CHILD = textwrap.dedent(
    """
    import json, sys
    import psutil
    import llama_cpp
    args = json.loads(sys.argv[1])
    proc = psutil.Process()
    llama_cpp.llama_backend_init()
    base = proc.memory_info().rss
    llm = llama_cpp.Llama(
        model_path=args["model"], n_ctx=args["n_ctx"], n_batch=args["n_batch"],
        n_threads=args["threads"], n_threads_batch=args["threads"], verbose=True,
        **args.get("extra", {}),
    )
    after_load = proc.memory_info().rss
    n_prompt = max(1, args["fill"] - args["n_gen"])
    seed = llm.tokenize(b"The quick brown fox jumps over the lazy dog. ", add_bos=False)
    tokens = [llm.token_bos()] + (seed * (n_prompt // len(seed) + 1))[: n_prompt - 1]
    llm.create_completion(prompt=tokens, max_tokens=args["n_gen"], temperature=0.0)
    after_run = proc.memory_info()
    # VmHWM (peak RSS of this address space) resets at exec; ru_maxrss would carry the parent's peak.
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    print("RSS_PROBE " + json.dumps({
        "baseline_rss": base,
        "after_load_rss": after_load,
        "after_run_rss": after_run.rss,
        "peak_rss": peak,
        "n_prompt": n_prompt,
    }), flush=True)
    """
)

_BUFFER_RE = re.compile(r"(?P<what>[A-Za-z_ ]+?) (?:buffer )?size =\s+(?P<mib>[0-9.]+) MiB")


def measure(
    model: Path,
    n_ctx: int,
    *,
    n_batch: int = 512,
    n_gen: int = 8,
    fill: int | None = None,
    threads: int = 2,
    extra: dict[str, Any] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Load ``model`` at ``n_ctx`` in a fresh interpreter, fill ``fill`` tokens (default: all), report.

    Returns baseline/after-load/after-run/peak RSS in bytes, ``increase`` (peak minus baseline) and
    ``buffers``: llama.cpp's logged buffer sizes in bytes keyed by its own labels.
    """
    args = {
        "model": str(model),
        "n_ctx": n_ctx,
        "n_batch": n_batch,
        "n_gen": n_gen,
        "fill": fill if fill is not None else n_ctx,
        "threads": threads,
        "extra": extra or {},
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RSS_PROBE ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"measurement failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("RSS_PROBE "))
    buffers: dict[str, int] = {}
    for m in _BUFFER_RE.finditer(done.stderr):
        key = " ".join(m.group("what").split())
        buffers[key] = buffers.get(key, 0) + round(float(m.group("mib")) * 1024 * 1024)
    result["buffers"] = buffers
    result["increase"] = max(result["peak_rss"], result["after_run_rss"]) - result["baseline_rss"]
    return result
