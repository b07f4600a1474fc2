"""The memory-estimate error table, from bench/estimate_accuracy.py (owned elsewhere: called, never copied).

Its functions first (``configs``, ``estimate_row``, ``measure``, ``markdown``: the loop of its ``main`` over
this run's models only); if their API has moved, the script as a subprocess (``--only`` per model), its
output included as it is.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.models import REPO, BenchModel


def _with_functions(models: list[BenchModel], contexts: list[int], slots: list[int], deadline: float) -> str:
    from bench import estimate_accuracy as ea

    rows: list[dict[str, Any]] = []
    left_out: list[str] = []
    for m in models:
        for cfg in ea.configs(m.label, contexts, slots):
            remaining = deadline - time.monotonic()
            if remaining < 20:
                left_out.append(f"{m.label} {cfg}: past the time budget")
                continue
            est = ea.estimate_row(m.path, cfg)
            try:
                got = ea.measure(m.path, {**cfg, "use_mmap": est["use_mmap"]}, timeout=remaining)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                left_out.append(f"{m.label} {cfg}: {type(exc).__name__}: {str(exc)[-300:]}")
                continue
            rows.append({"model": m.label, **cfg, "mmap_auto": cfg["use_mmap"] is None, "measured": got["increase"],
                         **est, "err": 100.0 * (est["estimate"] - got["increase"]) / got["increase"]})
            print(f"  {m.label} {cfg}: estimate {est['estimate'] / 2**20:.1f} MiB, measured "
                  f"{got['increase'] / 2**20:.1f} MiB", flush=True)
    table = str(ea.markdown(rows)) if rows else "No row measured."
    return table + ("\nLeft out: " + "; ".join(left_out) + "\n" if left_out else "")


def _with_script(models: list[BenchModel], contexts: list[int], slots: list[int], timeout_s: float) -> str:
    tables = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-est-") as tmp:
        for m in models:
            only = "tiny-256 Q8_0" if m.slug.startswith("tiny") else m.label.split()[0]
            out = Path(tmp) / f"{m.slug}.md"
            cmd = [sys.executable, "bench/estimate_accuracy.py", "--only", only, "--n-ctx", *map(str, contexts),
                   "--slots", *map(str, slots), "--out", str(out)]
            if m.slug.startswith("gemma"):
                cmd += ["--gemma", str(m.path)]
            try:
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                tables.append(f"`{' '.join(cmd[1:])}` did not finish within {timeout_s:.0f} s.")
                continue
            body = out.read_text(encoding="utf-8") if out.exists() else (done.stdout + done.stderr)[-3000:]
            tables.append(f"`python {' '.join(cmd[1:])}` (exit {done.returncode}):\n\n{body}")
    return "\n\n".join(tables)


def estimate_table(models: list[BenchModel], contexts: list[int], slots: list[int], *, deadline: float) -> str:
    """The markdown table for ``models`` at ``contexts`` x ``slots`` (rows past ``deadline``, a
    ``time.monotonic`` value, left out and named), or a note saying why there is none."""
    try:
        return _with_functions(models, contexts, slots, deadline)
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        api_error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a failed measurement is reported; the benchmark goes on
        return f"The estimate table failed: {type(exc).__name__}: {exc}"
    print(f"  its functions could not be called ({api_error}): running the script", flush=True)
    return f"(its functions could not be called: {api_error}; run as a script)\n\n" + _with_script(
        models, contexts, slots, max(60.0, deadline - time.monotonic()))
