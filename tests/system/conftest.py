"""Fixtures of the system tests: cached root and wheelhouse, a broker and a fake Hub on the host, devices.

Every device a module creates is destroyed when the module ends (power cut, unmount), whatever
happened. Measured figures (tests/system/report.py) are printed at the end of the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.fake_hub import FakeHub
from tests.system.device import Device, device_rootfs, unavailable_reason, wheelhouse
from tests.system.hub_catalog import SMOLLM_135M, SMOLLM_360M, tiny_model
from tests.system.report import FIGURES, record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("system test figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def device_root() -> tuple[Path, Path]:
    """The cached device root and its apt mirror, or a skip naming what this machine lacks."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    paths = device_rootfs()
    record("rootfs ready (s, cached after the first run)", round(time.monotonic() - started, 1))
    return paths


@pytest.fixture(scope="session")
def device_wheels(device_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edge-agent's wheel from this checkout plus every dependency's wheel (cached between runs)."""
    started = time.monotonic()
    house = wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    record("wheelhouse ready (s)", round(time.monotonic() - started, 1))
    return house


@pytest.fixture(scope="module")
def host_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Mosquitto on a free loopback port of the host; devices reach it as 127.0.0.1 (shared network)."""
    broker = Broker(tmp_path_factory.mktemp("broker"), persistence=True).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A Hub look-alike on the host serving tiny models under two real catalog entries' repos and files."""
    models = tmp_path_factory.mktemp("hub-models")
    fake = FakeHub().start()
    fake.add_repo(SMOLLM_135M[0], {SMOLLM_135M[1]: tiny_model(models / "135m.gguf", seed=1, name="tiny-135m")})
    fake.add_repo(SMOLLM_360M[0], {SMOLLM_360M[1]: tiny_model(models / "360m.gguf", seed=2, name="tiny-360m")})
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def make_device(device_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[Callable[[str], Device]]:
    """Factory: a fresh device with a unique machine name and root, booted. All are destroyed at module end."""
    base, apt = device_root
    made: list[Device] = []
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "")[:10]

    def _make(role: str) -> Device:
        name = f"ea-{module}-{role}-{os.getpid() % 100000}-{len(made)}"
        device = Device.create(name, base, apt, tmp_path_factory.mktemp(name))
        made.append(device)
        seconds = device.boot()
        record(f"{name}: first boot (s)", seconds)
        return device

    yield _make
    keep = os.environ.get("EDGE_AGENT_KEEP_DEVICES") == "1"
    for device in made:
        device.destroy(keep_files=keep)
