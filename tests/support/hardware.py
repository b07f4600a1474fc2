"""Helpers for the hardware probe tests: fixture trees under tests/fixtures/sys/<case>/{sys,proc}.

Each case directory also holds ``expected.json``: the snapshot the probe must produce from that tree
(without ``ts``). To regenerate after a deliberate change to the snapshot shape, run
``python -m tests.support.hardware`` and review the diff line by line: the file is the specification.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.hardware.probe import probe_device
from agent.hardware.snapshot import DeviceSnapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sys"

CASES = ("pi-zero-2w", "pi4-2gb", "pi5-8gb", "laptop-battery", "cgroup-limited")


def probe_case(case: str) -> DeviceSnapshot:
    """Probe one fixture tree the way the agent probes a real device, minus vcgencmd."""
    root = FIXTURES / case
    return probe_device(root / "sys", root / "proc", use_vcgencmd=False)


def snapshot_data(snapshot: DeviceSnapshot) -> dict[str, Any]:
    """The snapshot's JSON form without the timestamp (which differs on every run)."""
    data = snapshot.model_dump(mode="json")
    data.pop("ts")
    return data


def expected_data(case: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / case / "expected.json").read_text(encoding="utf-8"))
    return data


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Create a fake sysfs/procfs tree: {relative path: content}; text gets the trailing newline sysfs has."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content + "\n", encoding="utf-8")
    return root


def _regenerate() -> None:
    for case in CASES:
        text = json.dumps(snapshot_data(probe_case(case)), indent=2) + "\n"
        (FIXTURES / case / "expected.json").write_text(text, encoding="utf-8")
        print(f"wrote {FIXTURES / case / 'expected.json'}")


if __name__ == "__main__":
    _regenerate()
