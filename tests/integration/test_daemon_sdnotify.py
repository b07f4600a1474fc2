"""The daemon speaks sd_notify like a Type=notify service: READY, STATUS, WATCHDOG, STOPPING, on a real socket."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.daemon import DaemonProcess, write_config
from tests.support.sd_socket import NotifyReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start(tmp_path, broker, model, receiver: NotifyReceiver, **env: str) -> DaemonProcess:
    config = write_config(tmp_path / "dev.toml", port=broker.port, model_file=model)
    # WATCHDOG_PID is the daemon's own pid, unknown before it starts: leave it out (systemd's rule:
    # without WATCHDOG_PID the watchdog applies to the receiving process).
    return DaemonProcess(config=config, workdir=tmp_path,
                         env={**receiver.environ(watchdog_usec=1_000_000), **env}).start()


def test_ready_only_after_connect_then_watchdog_then_stopping(tmp_path, broker, tiny_models) -> None:
    """READY=1 comes once the model is loaded and the broker connected; pings follow; SIGTERM sends STOPPING=1."""
    with NotifyReceiver() as r:
        d = start(tmp_path, broker, tiny_models["Q8_0"], r)
        try:
            ready = r.wait_for("READY=1", 60)
            assert any(e.get("event") == "mqtt_connected" for e in d.events())
            assert any("loading model" in m.fields.get("STATUS", "") for m in r.messages[: r.messages.index(ready)])
            first = r.wait_for("WATCHDOG=1", 5, after=r.messages.index(ready))
            r.wait_for("WATCHDOG=1", 5, after=r.messages.index(first) + 1)
            d.signal(signal.SIGTERM)
            r.wait_for("STOPPING=1", 30)
            assert d.wait(30) == 0
        finally:
            d.kill()
    order = [m for m in r.assignments() if m in ("READY=1", "STOPPING=1")]
    assert order == ["READY=1", "STOPPING=1"]


def test_watchdog_pings_stop_when_the_main_loop_hangs(tmp_path, broker, tiny_models) -> None:
    """With the main loop wedged (test hook), no more WATCHDOG=1 arrive, so systemd would restart the service."""
    with NotifyReceiver() as r:
        d = start(tmp_path, broker, tiny_models["Q8_0"], r, EDGE_TEST_HOOKS="1")
        try:
            r.wait_for("READY=1", 60)
            r.wait_for("WATCHDOG=1", 5)
            d.signal(signal.SIGUSR2)
            time.sleep(1.0)  # a ping already in flight may still land
            before = r.count("WATCHDOG=1")
            time.sleep(2.5)  # five watchdog half-periods
            assert r.count("WATCHDOG=1") == before
        finally:
            d.kill()
