"""``edge-agent probe``: the table and the JSON form, against a fixture tree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.__main__ import main
from tests.support.hardware import FIXTURES, expected_data


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    # The command configures structlog when nobody has; do not leak that into other tests.
    yield
    structlog.reset_defaults()


def _run(argv: list[str]) -> int:
    return main(argv)


def _case_args(case: str, tmp_path: Path) -> list[str]:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "test"\n')
    root = FIXTURES / case
    return ["--config", str(config), "--sys-root", str(root / "sys"), "--proc-root", str(root / "proc")]


def test_json_output_is_the_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the same snapshot the probe produces, and nothing else on stdout."""
    assert _run(["probe", "--json", *_case_args("cgroup-limited", tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    data.pop("ts")
    assert data == expected_data("cgroup-limited")


def test_table_names_the_budget_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table shows the board, the throttle flags and which limit sets the memory budget."""
    assert _run(["probe", *_case_args("pi-zero-2w", tmp_path)]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["Board"].strip() == "Raspberry Pi Zero 2 W Rev 1.0"
    assert rows["Budget"].strip() == "380.0 MiB  (limited by MemAvailable)"
    assert "now under voltage, throttled" in rows["Throttle"]


def test_models_dir_adds_disk_free(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--models-dir reports free space on the file system that holds the models."""
    assert _run(["probe", "--json", "--models-dir", str(tmp_path), *_case_args("pi4-2gb", tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["disk"]["path"] == str(tmp_path)
