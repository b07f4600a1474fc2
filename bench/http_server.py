"""Contender: llama-cpp-python's OpenAI-compatible HTTP server (``python -m llama_cpp.server``), streamed
over SSE with http.client: what a user would pick instead of edge-agent.

Started with ``--interrupt_requests False``: by default a new request interrupts the running stream, which
would cut the concurrent clients' replies short instead of queueing them.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.measures import Sample
from bench.models import REPO
from bench.processes import stop_process


def available() -> str | None:
    """None when the server can run here, else why not (its extra is not installed)."""
    for module in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


class LlamaServer:
    """One ``llama_cpp.server`` process; ``complete`` is safe from many threads (one connection each)."""

    name = "http"
    label = "llama_cpp.server (HTTP, SSE)"
    concurrent = True

    def __init__(self, model: Path, *, port: int, n_ctx: int, threads: int, workdir: Path, timeout_s: float) -> None:
        self.model, self.port, self.n_ctx, self.threads, self.timeout_s = model, port, n_ctx, threads, timeout_s
        self._log_path = workdir / "llama-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server; returns seconds from process start to its first answered GET /v1/models."""
        started = time.perf_counter()
        with self._log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
                 "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
                 "--n_threads_batch", str(self.threads), "--interrupt_requests", "False", "--verbose", "False"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = started + self.timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v1/models")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"llama_cpp.server not ready within {self.timeout_s:.0f} s; log tail:\n"
                           f"{self._log_path.read_text(errors='replace')[-3000:]}")

    def _conn(self) -> http.client.HTTPConnection:
        # A fresh connection per request, connected before the clock starts (as the MQTT clients are): a
        # kept-alive one idles between rounds past uvicorn's keep-alive timeout (5 s) and fails on reuse.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        conn.connect()
        return conn

    def _stream(self, conn: http.client.HTTPConnection, body: str) -> tuple[float, float, int]:
        """(first token time, end time, tokens) of one streamed completion; raises on an HTTP error."""
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first = last = 0.0
        tokens = 0
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue  # blank separators and ": ping" comments
            payload = line[6:].strip()
            last = time.perf_counter()
            if payload == b"[DONE]":
                break
            if json.loads(payload)["choices"][0].get("finish_reason") is None:
                # One chunk per token; the closing chunk only carries finish_reason.
                if tokens == 0:
                    first = last
                tokens += 1
        resp.read()  # drain, so the connection can be reused
        return first, last, tokens

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = True) -> Sample:
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
                           "stream": True})
        conn = self._conn()
        start = time.perf_counter()
        try:
            first, last, tokens = self._stream(conn, body)
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as exc:
            return Sample(self.name, start=start, end=time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
        return Sample(self.name, tokens=tokens, total_ms=(last - start) * 1000, ttft_ms=(first - start) * 1000,
                      decode_tps=(tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0,
                      start=start, end=last)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self) -> None:
        stop_process(self.proc, grace_s=10.0)
