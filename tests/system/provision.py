"""Provisioning a booted device the two documented ways: ``bootstrap.sh`` on the board, Ansible from the host.

``bootstrap.sh`` runs inside the device from a source snapshot of this checkout (what ``git clone``
gives the board) with the wheelhouse beside it, as docs/deploy.md §2b shows, with ``--pip-offline``
(docs: offline fleets). The Ansible role runs on the host (the controller) against the device through
the ``community.docker.nsenter`` connection into the container's PID 1, so the play sees the real
booted system: systemd as the service manager, ``systemctl`` working, handlers restarting the unit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.system.device import NOT_SOURCE, REPO, Device

CHECKOUT_IN_DEVICE = "/root/edge-agent"
PROVISIONING = REPO / "provisioning"


def place_checkout(device: Device, wheels: Path) -> None:
    """The board's clone of the repository, with the wheelhouse in it (done once per device)."""
    if not (device.root / CHECKOUT_IN_DEVICE.lstrip("/")).exists():
        device.copy_in(REPO, CHECKOUT_IN_DEVICE, ignore=NOT_SOURCE)
        device.copy_in(wheels, f"{CHECKOUT_IN_DEVICE}/wheelhouse")


def write_secret(device: Device, name: str, value: str) -> str:
    """A root-only file on the device holding a secret; returns its path inside the device."""
    path = f"/root/secrets/{name}"
    device.sh(f"install -d -m 0700 /root/secrets && umask 077 && printf %s '{value}' > {path}")
    return path


def bootstrap(device: Device, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``sudo provisioning/bootstrap.sh --wheelhouse wheelhouse --pip-offline ARGS`` in the board's checkout."""
    return device.run(["provisioning/bootstrap.sh", "--wheelhouse", "wheelhouse", "--pip-offline", *args],
                      cwd=CHECKOUT_IN_DEVICE, timeout=timeout, check=False)


def changes(bootstrap_output: str) -> int | None:
    """N from bootstrap's last line ``done: N change(s)``."""
    match = re.search(r"^done: (\d+) change\(s\)\s*$", bootstrap_output, re.M)
    return int(match.group(1)) if match else None


# --- Ansible -----------------------------------------------------------------------------------------


def ansible_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def nsenter_connection_available() -> bool:
    """Whether the controller has community.docker (its nsenter connection plugin)."""
    try:
        import ansible_collections.community.docker  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Play:
    """One ansible-playbook run: its output and the recap numbers of the device."""

    result: subprocess.CompletedProcess[str]
    recap: dict[str, int]
    seconds: float

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


def recap(output: str) -> dict[str, int]:
    match = re.search(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output, re.M)
    if match is None:
        return {}
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups()), strict=True))


def write_inventory(path: Path, device: Device, device_id: str) -> Path:
    """An inventory of this one device, reached through nsenter into its PID 1 (re-read each run)."""
    path.write_text(
        "[edge_devices]\n"
        f"{device.name} ansible_connection=community.docker.nsenter ansible_nsenter_pid={device.pid1} "
        f"ansible_python_interpreter=/usr/bin/python3 device_id={device_id}\n"
    )
    return path


def playbook(inventory: Path, extra_vars: dict[str, Any], work: Path, *flags: str,
             timeout: float = 900) -> Play:
    """``ansible-playbook -i INVENTORY site.yml -e @vars.json FLAGS`` from the host venv."""
    import time

    vars_file = work / "extra-vars.json"
    vars_file.write_text(json.dumps(extra_vars))
    # A clean environment: the nsenter connection hands the controller's environment to every command
    # on the device, which an SSH connection to a real board would not.
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "ANSIBLE_CONFIG": str(PROVISIONING / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [ansible_tool("ansible-playbook") or "ansible-playbook", "-i", str(inventory), str(PROVISIONING / "site.yml"),
         "-e", f"@{vars_file}", *flags],
        capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=PROVISIONING,
    )
    return Play(result=result, recap=recap(result.stdout), seconds=round(time.monotonic() - started, 1))
