"""Checks shared by the scenarios: is the unit up and READY, is the device online and answering."""

from __future__ import annotations

import re
import time
from typing import Any

from tests.system.device import Device, DeviceError
from tests.system.observer import current_status, mosquitto_rr

UNIT = "edge-agent"
MAX_EXPOSURE = 1.5


def wait_active(device: Device, timeout: float = 180.0) -> dict[str, str]:
    """Wait for ``active (running)``: for a Type=notify unit that means READY=1 arrived. Fails fast on ``failed``."""
    deadline = time.monotonic() + timeout
    show: dict[str, str] = {}
    while time.monotonic() < deadline:
        show = device.show()
        if show.get("ActiveState") == "active" and show.get("SubState") == "running":
            return show
        if show.get("ActiveState") == "failed":
            break
        time.sleep(0.5)
    raise DeviceError(f"{UNIT} not active (running) on {device.name}: {show}\n{device.journal(lines=40)}")


def wait_online(port: int, device_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the retained status on the broker says ``online``."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = current_status(port, device_id, timeout=2.0)
        if status and status.get("state") == "online":
            return status
        time.sleep(0.5)
    raise AssertionError(f"{device_id} not online on the broker after {timeout}s; retained status: {status}")


def ask(port: int, device_id: str, prompt: str = "Hello, device", max_tokens: int = 8,
        timeout: float = 60.0) -> dict[str, Any]:
    """One inference over MQTT 5 with mosquitto_rr; asserts it is a full answer and returns it."""
    reply = mosquitto_rr(port, device_id, {"prompt": prompt, "max_tokens": max_tokens}, timeout=timeout)
    assert "error" not in reply, reply
    assert reply.get("done") is True, reply
    assert reply["usage"]["completion_tokens"] == max_tokens, reply
    assert reply["text"], reply
    return reply


def serving(device: Device, port: int, device_id: str) -> dict[str, Any]:
    """Unit active and READY with a STATUS= text, retained status online, a question answered."""
    show = wait_active(device)
    assert show["StatusText"], f"no STATUS= text from the agent: {show}"
    status = wait_online(port, device_id)
    reply = ask(port, device_id)
    return {"show": show, "status": status, "reply": reply}


def exposure(device: Device, unit: str = UNIT) -> float:
    """``systemd-analyze security UNIT`` measured inside the booted device."""
    out = device.run(["systemd-analyze", "security", "--no-pager", unit], timeout=60, check=False).stdout
    match = re.search(rf"Overall exposure level for {re.escape(unit)}\.service:\s*([\d.]+)", out)
    if match is None:
        raise AssertionError(f"no exposure level in systemd-analyze output:\n{out[-2000:]}")
    return float(match.group(1))


def reset_failed(device: Device) -> None:
    """Re-arm the unit: clears a failed state, the start rate limit and NRestarts (systemd's own counter)."""
    device.run(["systemctl", "reset-failed", UNIT], timeout=30, check=False)


def restart(device: Device) -> None:
    device.run(["systemctl", "restart", UNIT], timeout=120, check=False)
