"""Serving benchmark: edge-agent against raw llama-cpp-python and llama-cpp-python's HTTP server.

    python -m bench            # full: SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M; refreshes docs/performance.md
    python -m bench --quick    # CI-sized: a tiny random model, a couple of minutes

Starts a private Mosquitto on a free loopback port, then per model, one at a time: raw llama-cpp-python
(bench/raw_worker.py), three daemons (``[inference] parallel`` = 4, = 1, and = 1 with a q8_0 KV cache) and
``llama_cpp.server``, all with the same model, threads and n_ctx. Measures start-to-ready, idle CPU, one
client (interleaved rounds with a warm-up), RSS, and 1/2/4/8 concurrent clients; then the memory estimate
table (bench/estimate_accuracy.py). Writes ``bench/results/<date>-<host>.md`` (``-quick`` for --quick) and one
PNG per model when matplotlib is installed (the bench extra). Every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from types import FrameType

from bench import models as bench_models
from bench.estimate import estimate_table
from bench.models import REPO, BenchModel, ModelUnavailableError
from bench.report import RunInfo, model_section, plot_model, refresh_docs, results_markdown
from bench.suite import BenchConfig, ModelResult, run_model

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.broker import Broker, free_port

FULL_MODELS = {"smollm2": bench_models.smollm2, "gemma3": bench_models.gemma3_270m}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    out = {"Python": platform.python_version()}
    for dist in ("llama_cpp_python", "paho-mqtt"):
        try:
            out[dist.replace("_", "-")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        # `mosquitto -h` prints "mosquitto version X.Y.Z" first (and exits 3).
        head = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=10, check=False).stdout
        out["Mosquitto"] = head.splitlines()[0].split()[-1] if head else "?"
    except (OSError, subprocess.TimeoutExpired):
        out["Mosquitto"] = "missing"
    return out


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so the finally blocks stop every process this run started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: a tiny model, fewer rounds, no docs refresh")
    ap.add_argument("--models", nargs="+", choices=sorted(FULL_MODELS), default=None,
                    help="full run: which models (default: all)")
    ap.add_argument("--rounds", type=int, default=None, help="single-client rounds after the warm-up")
    ap.add_argument("--load-rounds", type=int, default=None, help="rounds of the concurrent-client levels")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="time budget in minutes (default 22, --quick 3): past a model's share, rounds beyond the "
                    "first few are skipped and the results say so")
    ap.add_argument("--threads", type=int, default=0,
                    help="llama.cpp threads for every contender (default: 2, --quick 1)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "performance.md",
                    help="refreshed by a full run with every model (see --no-docs)")
    ap.add_argument("--no-docs", action="store_true", help="do not refresh docs/performance.md")
    ap.add_argument("--no-estimate", action="store_true", help="skip the memory estimate table")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary dir (logs, configs)")
    return ap.parse_args(argv)


def config_for(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        cfg = BenchConfig(quick=True, threads=args.threads or 1, n_ctx=512, max_tokens=32, rounds=3, load_max_tokens=24,
                          load_rounds=1, load_requests=2, idle_s=3.0, timeout_s=60.0)
    else:
        cfg = BenchConfig(quick=False, threads=args.threads or 2)
    changes = {}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.load_rounds is not None:
        changes["load_rounds"] = args.load_rounds
    return BenchConfig(**{**cfg.__dict__, **changes}) if changes else cfg


def _models(args: argparse.Namespace, work: Path, notes: list[str]) -> list[BenchModel]:
    if args.quick:
        return [bench_models.tiny(work)]
    out = []
    for key in args.models or list(FULL_MODELS):
        try:
            out.append(FULL_MODELS[key]())
        except ModelUnavailableError as exc:
            notes.append(f"Model {key} skipped: {exc}")
            print(notes[-1], flush=True)
    return out


def _measure_all(args: argparse.Namespace, cfg: BenchConfig, work: Path, notes: list[str]) -> tuple[
        list[ModelResult], str]:
    """Every model through the suite on one private broker, then the estimate table."""
    budget_s = 60 * (args.budget_min or (3.0 if cfg.quick else 22.0))
    end = time.monotonic() + budget_s * 0.8  # the rest: the estimate table and the report
    models = _models(args, work, notes)
    results: list[ModelResult] = []
    broker = Broker(work / "broker").start()
    try:
        for i, model in enumerate(models):
            print(f"== {model.label} ({model.path.name})", flush=True)
            # Each model's share of the time left, by file size (a rough proxy for its cost per token).
            weight = model.path.stat().st_size / sum(m.path.stat().st_size for m in models[i:])
            share = (end - time.monotonic()) * weight
            results.append(run_model(model, cfg, work, broker_port=broker.port, free_port=free_port,
                                     deadline=time.monotonic() + share))
    finally:
        broker.stop()
    estimate = "(skipped: --no-estimate)"
    if time.monotonic() > end + budget_s * 0.1:
        estimate = "(skipped: the timings used up the time budget)"
    elif not args.no_estimate and models:
        print("== memory estimate table (bench/estimate_accuracy.py)", flush=True)
        estimate = estimate_table(models, [512] if cfg.quick else [2048], [1] if cfg.quick else [1, cfg.parallel],
                                  deadline=end + budget_s * 0.17)
    return results, estimate


def _docs(info: RunInfo, cfg: BenchConfig, results: list[ModelResult], *, out: Path, plots: dict[str, str | None],
          estimate: str) -> str:
    """The generated block of docs/performance.md: the run's tables, with links relative to docs/."""
    rel = Path("..") / out.parent.relative_to(REPO) if out.parent.is_relative_to(REPO) else out.parent
    generated = [f"Generated from the full run of {info.started} (`{info.command}`, {info.duration_s / 60:.1f} min on "
                 f"{info.cpu}, {os.cpu_count()} CPUs, load average {info.load_before[0]:.2f} before and "
                 f"{info.load_after[0]:.2f} after); the whole record is [{out.name}]({rel / out.name}).", ""]
    for res in results:
        plot = plots.get(res.model.slug)
        generated.append(model_section(res, cfg, str(rel / plot) if plot else None, heading="###"))
    # What to expect on a board is interpretation (which run's batching gain to extrapolate from): written by hand.
    generated += ["### Memory estimate accuracy", "", estimate.strip()]
    return "\n".join(generated)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the results (and, after a full run, docs/performance.md); 0 unless it broke."""
    args = parse_args(argv)
    cfg = config_for(args)
    signal.signal(signal.SIGTERM, _interrupt)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    info = RunInfo(command=command.strip(), started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   host=socket.gethostname().split(".")[0], cpu=_cpu_name(), versions=_versions(),
                   load_before=os.getloadavg())
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    notes: list[str] = []
    results: list[ModelResult] = []
    try:
        results, estimate = _measure_all(args, cfg, work, notes)
    except KeyboardInterrupt:
        print("interrupted: every process this run started is stopped", flush=True)
        return 130
    finally:
        failed = any(r.errors for r in results)
        if args.keep_workdir or failed:
            print(f"work dir kept (logs, configs): {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    info.duration_s = time.monotonic() - t0
    info.finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info.load_after = os.getloadavg()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{info.host}{'-quick' if cfg.quick else ''}"
    plots: dict[str, str | None] = {}
    for res in results:
        png = args.out_dir / f"{stem}-{res.model.slug}.png"
        plots[res.model.slug] = png.name if plot_model(res, cfg, png) else None
    if results and not all(plots.values()):
        notes.append("Plots skipped: matplotlib is not installed (pip install -e '.[bench]').")
    text = results_markdown(info, cfg, results, plots=plots, estimate=estimate, notes=notes)
    out = args.out_dir / f"{stem}.md"
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {out}", flush=True)
    if not cfg.quick and not args.no_docs and len(results) == len(FULL_MODELS):
        refresh_docs(args.docs, _docs(info, cfg, results, out=out, plots=plots, estimate=estimate))
        print(f"refreshed: {args.docs}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
