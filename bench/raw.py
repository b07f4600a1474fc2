"""Contender: raw llama-cpp-python (``llama_cpp.Llama`` in a subprocess, bench/raw_worker.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.measures import Sample
from bench.models import REPO
from bench.processes import LineReader, stop_process


class RawLlama:
    """The baseline: what a user gets writing ``Llama(...).create_completion(stream=True)`` themselves.
    One request at a time (the library has no server); its times are taken inside its process."""

    name = "raw"
    label = "raw llama-cpp-python"
    concurrent = False

    def __init__(self, model: Path, *, n_ctx: int, threads: int, workdir: Path, timeout_s: float) -> None:
        self.model, self.n_ctx, self.threads, self.timeout_s = model, n_ctx, threads, timeout_s
        self._log = (workdir / "raw-worker.log").open("wb")
        self.proc: subprocess.Popen[str] | None = None
        self._reader: LineReader | None = None
        self._lock = threading.Lock()

    def start(self) -> float:
        """Start the worker and load the model; returns start-to-ready in seconds."""
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.raw_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO)
        self._reader = LineReader(self.proc.stdout)  # type: ignore[arg-type]
        self._call({"model": str(self.model), "n_ctx": self.n_ctx, "threads": self.threads})
        return time.perf_counter() - started

    def _call(self, cmd: dict[str, object]) -> dict[str, object]:
        assert self.proc is not None
        assert self._reader is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return json.loads(self._reader.readline(self.timeout_s))  # type: ignore[no-any-return]

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = True) -> Sample:
        start = time.perf_counter()
        try:
            got = self._call({"prompt": prompt, "max_tokens": max_tokens})
        except (TimeoutError, EOFError, OSError, ValueError) as exc:
            return Sample(self.name, start=start, end=time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
        return Sample(self.name, tokens=int(got["tokens"]), total_ms=float(got["total_ms"]),  # type: ignore[arg-type]
                      ttft_ms=float(got["ttft_ms"]), decode_tps=float(got["decode_tps"]),  # type: ignore[arg-type]
                      start=start, end=time.perf_counter())

    def prefill_ms(self, tokens: int) -> float:
        """Time to evaluate ``tokens`` prompt tokens from an empty cache."""
        return float(self._call({"op": "prefill", "tokens": tokens})["prefill_ms"])  # type: ignore[arg-type]

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc, grace_s=5.0)
        self._log.close()
