"""Fixtures for tests/faults: a persistent Mosquitto, real daemons (optionally inside a network namespace)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.daemon import DaemonProcess, Daemons, write_config
from tests.support.netns import NetNs, NetNsDaemon, unavailable


@pytest.fixture
def fault_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto with persistence: sessions, queued and in-flight messages survive its restart."""
    b = Broker(tmp_path / "broker", persistence=True).start()
    yield b
    b.stop()


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace linked to the root namespace by a veth pair; always removed afterwards."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    ns = NetNs()
    try:
        yield ns.create()
    finally:
        ns.delete()


@pytest.fixture
def daemons(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: start the real daemon on tiny model ``gguf`` (inside ``netns`` if given), wait until it serves;
    all are stopped afterwards. ``[model]`` defaults to n_ctx 1024 and one thread (two cores, shared)."""
    daemons = Daemons()

    def _start(port: int, *, device_id: str = "dev1", gguf: str = "slow", host: str = "127.0.0.1",
               netns: NetNs | None = None, top: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               wait: bool = True, **sections: dict[str, Any]) -> DaemonProcess:  # fmt: skip
        sections = {**sections, "mqtt": {"host": host, "port": port, **sections.get("mqtt", {})},
                    "model": {"n_ctx": 1024, "threads": 1, **sections.get("model", {})}}  # fmt: skip
        config = write_config(tmp_path / f"{device_id}.toml", port=port, model_file=tiny_models[gguf],
                              device_id=device_id, top=top, **sections)  # fmt: skip
        d: DaemonProcess
        if netns is not None:
            d = NetNsDaemon(config=config, workdir=tmp_path, env=env or {}, netns=netns.name)
        else:
            d = DaemonProcess(config=config, workdir=tmp_path, env=env or {})
        return daemons.start(d, wait=wait, timeout=90)

    yield _start
    daemons.stop_all()
