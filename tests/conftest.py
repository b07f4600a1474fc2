"""Shared fixtures: real Mosquitto brokers, tiny real GGUF models, real daemon subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.support.broker import Broker
from tests.support.daemon import Client, DaemonProcess, Daemons, write_config


@pytest.fixture(autouse=True)
def _structlog_back_to_defaults() -> Iterator[None]:
    """A test that runs a CLI entry point leaves structlog writing to that test's captured stderr, which is
    closed afterwards: the next test to log would fail with "I/O operation on closed file"."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random-weight llama GGUF per tensor type (F32, F16, Q8_0, Q4_0), plus one without a template."""
    from tests.support.tiny_gguf import tiny_model_set, write_tiny_llama

    directory = tmp_path_factory.mktemp("models")
    models = dict(tiny_model_set(directory))
    models["no_template"] = write_tiny_llama(directory / "tiny-no-template.gguf", chat_template=None)
    # Hundreds of tokens/s (370 on 2 cores through the batching engine, which made the former 256-wide shape
    # run at 3,500): for tests that must act mid-generation, e.g. cancel 900 tokens before they are done.
    models["slow"] = write_tiny_llama(
        directory / "tiny-slow.gguf", tensor_type="Q4_0", n_embd=768, n_layer=8, n_ff=2048, name="tiny-slow"
    )
    return models


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def start_daemon(tmp_path: Path, broker: Broker, tiny_models: dict[str, Path]) -> Iterator:
    """Factory: write a config and start the real daemon; waits until it is online. Stops all at teardown."""
    daemons = Daemons()

    def _start(device_id: str = "dev1", model: str = "Q8_0", wait: bool = True, model_cfg: dict | None = None,
               **sections: dict) -> DaemonProcess:
        if model_cfg:
            sections["model"] = model_cfg
        config = write_config(tmp_path / f"{device_id}.toml", port=broker.port, model_file=tiny_models[model],
                              device_id=device_id, **sections)
        return daemons.start(DaemonProcess(config=config, workdir=tmp_path), wait=wait)

    yield _start
    daemons.stop_all()


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    c = Client(broker.port)
    yield c
    c.close()
