"""Logging set-up: syslog priority prefixes exactly when the output is the journal stream systemd announced."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.logs import configure_logging, syslog_prefix, under_journald


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def journal_env(stream: io.TextIOBase) -> dict[str, str]:
    """JOURNAL_STREAM as systemd sets it for a stream: ``device:inode`` of the connected socket."""
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


class TestUnderJournald:
    def test_matching_device_and_inode_is_the_journal(self, tmp_path: Path) -> None:
        """The stream whose dev:inode JOURNAL_STREAM names is the journal."""
        with (tmp_path / "out").open("w") as out:
            assert under_journald(out, journal_env(out))

    def test_another_file_is_not(self, tmp_path: Path) -> None:
        """A child whose stdout was redirected elsewhere inherits JOURNAL_STREAM but writes no prefixes."""
        with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
            assert not under_journald(b, journal_env(a))

    @pytest.mark.parametrize("value", [None, "", "garbage", "1:x"])
    def test_unset_or_malformed_is_not(self, tmp_path: Path, value: str | None) -> None:
        """Without a usable JOURNAL_STREAM (a TTY, a pipe, a test) nothing is prefixed."""
        with (tmp_path / "out").open("w") as out:
            assert not under_journald(out, {} if value is None else {"JOURNAL_STREAM": value})

    def test_a_stream_without_a_file_descriptor_is_not(self) -> None:
        """An in-memory stream cannot be the journal."""
        assert not under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def _log_all_levels(path: Path, environ: dict[str, str] | None) -> list[str]:
    with path.open("w") as out:
        configure_logging("debug", "json", stream=out, environ=environ if environ is not None else journal_env(out))
        log = structlog.get_logger("test")
        log.debug("d_event")
        log.info("i_event")
        log.warning("w_event", key=1)
        log.error("e_event")
    return path.read_text().splitlines()


def test_journal_lines_carry_their_syslog_priority(tmp_path: Path) -> None:
    """Under journald: <7> debug, <6> info, <4> warning, <3> error, then the unchanged JSON line."""
    lines = _log_all_levels(tmp_path / "journal", None)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [(e["event"], e["level"]) for e in events] == [
        ("d_event", "debug"), ("i_event", "info"), ("w_event", "warning"), ("e_event", "error")]
    assert events[2]["key"] == 1


def test_plain_files_and_pipes_get_no_prefix(tmp_path: Path) -> None:
    """Without JOURNAL_STREAM the output is plain JSON lines, as before."""
    lines = _log_all_levels(tmp_path / "plain", {})
    assert [json.loads(line)["event"] for line in lines] == ["d_event", "i_event", "w_event", "e_event"]


def test_every_line_of_a_multi_line_rendering_is_prefixed() -> None:
    """A console traceback spans lines; journald reads each line's priority separately."""
    assert syslog_prefix(None, "exception", "boom\n  at x") == "<3>boom\n<3>  at x"
    assert syslog_prefix(None, "critical", "x") == "<2>x"
    assert syslog_prefix(None, "msg", "x") == "<6>x"


def test_console_lines_carry_no_colour_codes_when_not_on_a_terminal() -> None:
    """A one-shot command's warnings captured by a script (bootstrap --prepull, Ansible) are plain text."""
    import io

    import structlog

    from agent.logs import configure_logging

    out = io.StringIO()
    configure_logging("info", "console", stream=out, environ={})
    structlog.get_logger("t").warning("model_pulled", model="tiny")
    assert "model_pulled" in out.getvalue()
    assert "\x1b[" not in out.getvalue()
