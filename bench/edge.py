"""Contender: edge-agent, the real daemon (``python -m agent run``) behind a real Mosquitto, over MQTT 5.

Each client thread has its own MQTT connection (TCP_NODELAY, like the broker) subscribed once to its
own reply subtree, so a request costs one PUBLISH and its replies, never a SUBSCRIBE round trip.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.measures import Sample
from bench.models import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support below: the helpers the integration tests use

from tests.support.daemon import Client, DaemonProcess, write_config

PREFIX = "edge"


class EdgeAgent:
    """One daemon process with its own config (slots, KV type); ``complete`` is safe from many threads."""

    concurrent = True

    def __init__(self, name: str, label: str, *, model: Path, broker_port: int, n_ctx: int, threads: int,
                 workdir: Path, timeout_s: float, parallel: int = 1, kv_type: str = "f16") -> None:
        self.name, self.label = name, label
        self.device_id = f"bench-{name}"
        self.port, self.timeout_s = broker_port, timeout_s
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            self.workdir / "agent.toml", port=broker_port, model_file=model, device_id=self.device_id,
            model={"n_ctx": n_ctx, "threads": threads, "kv_type": kv_type},
            # No admission limit may refuse the benchmark's own load: 8 clients, each reply topic its own.
            inference={"parallel": parallel, "max_queue": 16, "rate_per_client_per_s": 0},
            log={"level": "info", "format": "json"})
        self.daemon = DaemonProcess(config=self.config, workdir=self.workdir)
        self._local = threading.local()
        self._clients: list[Client] = []
        self._clients_lock = threading.Lock()

    def start(self) -> float:
        """Start the daemon; returns seconds from process start to its retained status saying online."""
        watcher = Client(self.port)
        try:
            watcher.subscribe(f"{PREFIX}/{self.device_id}/status")
            started = time.perf_counter()
            self.daemon.start()
            deadline = started + self.timeout_s
            while time.perf_counter() < deadline:
                try:
                    m = watcher.messages.get(timeout=0.5)
                except queue.Empty:
                    if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
                        break
                    continue
                if json.loads(m.payload).get("state") == "online":
                    return time.perf_counter() - started
            raise RuntimeError(f"{self.name}: daemon not online within {self.timeout_s:.0f} s; log tail:\n"
                               f"{self.daemon.log_text()[-3000:]}")
        finally:
            watcher.close()

    def _client(self) -> tuple[Client, str]:
        client = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.port)
            base = f"bench/{self.device_id}/{client.client_id}"
            client.subscribe(f"{base}/#")
            self._local.client, self._local.base, self._local.n = client, base, 0
            with self._clients_lock:
                self._clients.append(client)
        self._local.n += 1
        return client, f"{self._local.base}/{self._local.n}"

    def _await_final(self, client: Client, reply: str, deadline: float) -> tuple[float | None, float, int]:
        """(first chunk time, final reply time, completion tokens); raises on an error reply or the deadline."""
        first: float | None = None
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"no final reply within {self.timeout_s:.0f} s")
            try:
                m = client.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            now = time.perf_counter()
            if m.topic != reply:
                continue  # a late message for an earlier request that timed out
            data = json.loads(m.payload)
            if not data.get("done"):
                if first is None:
                    first = now
                continue
            if "error" in data:
                raise RuntimeError(f"{data['error'].get('code')}: {data['error'].get('message')}")
            return first, now, int(data["usage"]["completion_tokens"])

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = True) -> Sample:
        name = self.name if stream else f"{self.name}-nostream"
        client, reply = self._client()
        # Greedy and repeat_penalty 1.0 spelled out: the [generation] defaults (temperature 0.7, repeat_penalty
        # 1.1) would sample differently from raw llama-cpp-python and the HTTP server.
        body: dict[str, Any] = {"id": uuid.uuid4().hex[:12], "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "repeat_penalty": 1.0, "stream": stream}
        start = time.perf_counter()
        try:
            client.publish(f"{PREFIX}/{self.device_id}/infer", body, response_topic=reply)
            first, now, tokens = self._await_final(client, reply, start + self.timeout_s)
        except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
            return Sample(name, start=start, end=time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
        if not stream or first is None:
            return Sample(name, tokens=tokens, total_ms=(now - start) * 1000, start=start, end=now)
        return Sample(name, tokens=tokens, total_ms=(now - start) * 1000, ttft_ms=(first - start) * 1000,
                      decode_tps=(tokens - 1) / (now - first) if tokens > 1 and now > first else 0.0,
                      start=start, end=now)

    def pids(self) -> list[int]:
        proc = self.daemon.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def log_tail(self, chars: int = 3000) -> str:
        return self.daemon.log_text()[-chars:]

    def stop(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.close()
            self._clients.clear()
        self.daemon.stop()  # SIGTERM, then SIGKILL after 20 s


class NonStreaming:
    """The same daemon asked with ``"stream": false``: one reply message, no first-token time."""

    concurrent = True

    def __init__(self, base: EdgeAgent) -> None:
        self.base = base
        self.name = f"{base.name}-nostream"
        self.label = f"{base.label}, not streamed"

    def complete(self, prompt: str, max_tokens: int, *, stream: bool = False) -> Sample:
        return self.base.complete(prompt, max_tokens, stream=False)

    def pids(self) -> list[int]:
        return self.base.pids()
