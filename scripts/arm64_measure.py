"""Measurements for scripts/arm64-device.sh, run inside the emulated arm64 device (and ``table`` on the host).

Subcommands (one JSON object or text on stdout each):

* ``sysinfo``: ``llama_print_system_info()`` on line 1, the CPU features the emulated CPU shows on line 2.
* ``estimate MODEL --n-ctx N``: the planner's estimate for a local file, i.e.
  :func:`agent.catalog.estimate.estimate_memory` with :func:`default_repack_types` of this machine
  (what :class:`agent.catalog.planner.Planner` passes), plus the same estimate with no repacked types.
* ``prompt MODEL --tokens N``: plain text that the model's tokenizer turns into about N tokens.
* ``probe MODEL --n-ctx N --fill N [--no-mmap]``: load the model as the agent's engine does (same
  llama_cpp.Llama arguments; mmap on unless ``--no-mmap``), evaluate a ``fill``-token prompt and
  generate 8 tokens; report the peak RSS increase over the interpreter after ``import llama_cpp``
  and llama.cpp's own buffer sizes (a ``CPU_REPACK`` buffer means weights were repacked).
* ``table ROWS``: the markdown table from the tab-separated rows the shell script collected
  (standard library only: runs on the host).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
SEED_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. "
N_GEN = 8
# llama.cpp's load log: "load_tensors:   CPU_REPACK model buffer size =    12.34 MiB", "... CPU KV buffer size".
_BUFFER_RE = re.compile(
    r"(?P<what>[A-Za-z_0-9]+)\s+(?P<kind>model |compute |KV |output )?buffer size =\s+(?P<mib>[0-9.]+) MiB"
)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def sysinfo() -> None:
    """llama.cpp's build/runtime features, then what the (emulated) CPU advertises."""
    import llama_cpp  # noqa: PLC0415 -- only inside the device

    print(llama_cpp.llama_print_system_info().decode().strip())
    features = ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        features = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Features")), "")
    except OSError:
        pass
    auxv = subprocess.run(["/bin/true"], env={"LD_SHOW_AUXV": "1"}, capture_output=True, text=True, check=False)
    hwcap = " ".join(ln.split()[-1] for ln in auxv.stdout.splitlines() if ln.startswith(("AT_HWCAP:", "AT_HWCAP2:")))
    print(f"Features: {features or '(no Features line: this qemu shows the host cpuinfo)'}; AT_HWCAP/HWCAP2 {hwcap}")


def estimate(model: Path, n_ctx: int, n_batch: int) -> None:
    """The planner's estimate for ``model`` on this machine, with and without the repack term."""
    from agent.catalog.estimate import default_repack_types, estimate_memory  # noqa: PLC0415
    from agent.catalog.gguf_header import read_local  # noqa: PLC0415

    info = read_local(model)
    repack = default_repack_types()
    est = estimate_memory(info, n_ctx, n_batch=n_batch, repack_types=repack)
    bare = estimate_memory(info, n_ctx, n_batch=n_batch, repack_types=frozenset())
    print(json.dumps({
        "repack_types": sorted(repack),
        "estimate_bytes": est.estimate_bytes,
        "total_bytes": est.total_bytes,
        "process_overhead_bytes": est.process_overhead_bytes,
        "terms": est.terms(),
        "estimate_no_repack_bytes": bare.estimate_bytes,
    }))


def prompt(model: Path, tokens: int) -> None:
    """Text of about ``tokens`` tokens (BOS included) for this model's tokenizer."""
    import llama_cpp  # noqa: PLC0415

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    seed = llm.tokenize(SEED_TEXT.encode(), add_bos=False)
    ids = (seed * (tokens // len(seed) + 1))[: tokens - 1]
    print(llm.detokenize(ids).decode("utf-8", errors="ignore"))


def probe(model: Path, n_ctx: int, fill: int, *, use_mmap: bool) -> None:
    """Peak RSS increase of loading ``model`` and serving a ``fill``-token prompt, as JSON."""
    import llama_cpp  # noqa: PLC0415

    from agent.engine.llama import physical_cores  # noqa: PLC0415

    threads = physical_cores()
    llama_cpp.llama_backend_init()
    baseline = _status_bytes("VmRSS")
    # llama.cpp logs its buffer sizes to fd 2; keep them for the report, out of the caller's way.
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            llm = llama_cpp.Llama(
                model_path=str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=min(512, n_ctx), use_mmap=use_mmap, verbose=True,
            )
            after_load = _status_bytes("VmRSS")
            seed = llm.tokenize(SEED_TEXT.encode(), add_bos=False)
            n_prompt = max(1, fill - N_GEN)
            ids = [llm.token_bos(), *(seed * (n_prompt // len(seed) + 1))[: n_prompt - 1]]
            # Streamed, to time llama-cpp-python alone (prompt, then each token) next to the daemon's figures.
            started = time.perf_counter()
            stamps = [time.perf_counter() for _ in llm.create_completion(
                prompt=ids, max_tokens=N_GEN, temperature=0.0, stream=True)]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    buffers: dict[str, float] = {}
    for m in _BUFFER_RE.finditer(text):
        key = f"{m.group('what')} {(m.group('kind') or '').strip()}".strip()
        buffers[key] = round(buffers.get(key, 0.0) + float(m.group("mib")), 2)
    peak = max(_status_bytes("VmHWM"), _status_bytes("VmRSS"))
    print(json.dumps({
        "use_mmap": use_mmap, "threads": threads, "n_prompt": len(ids), "baseline_rss": baseline,
        "after_load_rss": after_load, "peak_rss": peak, "increase": peak - baseline,
        "buffers_mib": buffers, "repacked": any("REPACK" in k.upper() for k in buffers),
        "ttft_s": round(stamps[0] - started, 2) if stamps else None,
        "decode_tokens_per_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 3) if len(stamps) > 1 else None,
    }))


def _mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def table(rows_file: Path, n_ctx: int) -> None:
    """Markdown table from rows ``name\testimate-json\tdaemon-hwm\tprobe-mmap-json\tprobe-nommap-json``.

    The no-mmap probe is ``{}`` when it was not run.
    """
    print(f"Estimate vs measured peak RSS (n_ctx {n_ctx}, a prompt filling it, 8 generated tokens). `estimate` is the "
          "planner's (aarch64 repack set); `increase` is peak RSS minus the interpreter after `import llama_cpp`, "
          "in a fresh process with the agent's Llama arguments (use_mmap on, as the agent).")
    print()
    print("| model | estimate | of it repacked | estimate w/o repack | increase (mmap on) | mmap off | "
          "repack buffer | estimate error | w/o repack error | daemon VmHWM | estimate + process overhead |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    details = []
    for line in rows_file.read_text(encoding="utf-8").splitlines():
        name, est_s, hwm_s, on_s, off_s = line.split("\t")
        est, on, off = json.loads(est_s), json.loads(on_s), json.loads(off_s)
        got = on["increase"]
        err = 100.0 * (est["estimate_bytes"] - got) / got
        err_bare = 100.0 * (est["estimate_no_repack_bytes"] - got) / got
        repack = "CPU_REPACK" if on.get("repacked") or off.get("repacked") else "none"
        print(
            f"| {name} | {_mib(est['estimate_bytes'])} | {_mib(est['terms']['repacked_weights'])} | "
            f"{_mib(est['estimate_no_repack_bytes'])} | {_mib(got)} | "
            f"{_mib(off['increase']) if 'increase' in off else 'not run'} | {repack} | {err:+.1f} % | "
            f"{err_bare:+.1f} % | {_mib(int(hwm_s))} | {_mib(est['total_bytes'])} |"
        )
        details.append(
            f"- {name}: {on.get('n_prompt')} prompt tokens, baseline {_mib(on['baseline_rss'])} MiB, "
            f"llama.cpp buffers (MiB) {on.get('buffers_mib')}; llama-cpp-python alone: first token after "
            f"{on.get('ttft_s', '?')} s, {on.get('decode_tokens_per_s', '?')} tokens/s"
        )
    print()
    print("All sizes in MiB. Error = (estimate - increase with mmap on) / increase. Under qemu-user the "
          "process also holds the emulator and its translated code, in the baseline and in VmHWM.")
    print()
    print("\n".join(details))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sysinfo")
    p = sub.add_parser("estimate")
    p.add_argument("model", type=Path)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--n-batch", type=int, default=512)
    p = sub.add_parser("prompt")
    p.add_argument("model", type=Path)
    p.add_argument("--tokens", type=int, default=1700)
    p = sub.add_parser("probe")
    p.add_argument("model", type=Path)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--fill", type=int, default=1700)
    p.add_argument("--no-mmap", action="store_true")
    p = sub.add_parser("table")
    p.add_argument("rows", type=Path)
    p.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    if args.cmd == "sysinfo":
        sysinfo()
    elif args.cmd == "estimate":
        estimate(args.model, args.n_ctx, args.n_batch)
    elif args.cmd == "prompt":
        prompt(args.model, args.tokens)
    elif args.cmd == "probe":
        probe(args.model, args.n_ctx, args.fill, use_mmap=not args.no_mmap)
    else:
        table(args.rows, args.n_ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
