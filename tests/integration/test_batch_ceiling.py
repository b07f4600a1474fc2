"""bench/batch_ceiling.py runs on a real GGUF file and prints one row per level (the harness, not the speed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import batch_ceiling

pytestmark = pytest.mark.integration


def test_the_engine_alone_reports_each_level(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_ceiling, "N_GEN", 16)
    assert batch_ceiling.main(["--models", "--files", str(tiny_models["Q8_0"]), "--rounds", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [int(r[1]) for r in rows] == [1, 2, 4]
    assert float(rows[0][3]) == 1.0 and all(float(r[2]) > 0 and float(r[4]) >= float(r[5]) for r in rows)
