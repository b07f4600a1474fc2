"""The command line's contract: exit codes, one-line errors (to systemd too), config check/reset-overrides."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.__main__ import EXIT_CODES_HELP, build_parser, exit_code_for, main
from agent.catalog.fit import NothingFitsError
from agent.catalog.hub import HubAuthError, HubError, HubUnreachableError
from agent.cli.device_client import AnswerError
from agent.cli.exit_codes import ONE_SHOT_ONLY
from agent.cli.status import NoStatusError
from agent.errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    ModelFileError,
    ModelUnavailableError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    TooLargeError,
    TransportError,
)
from agent.settings import OVERRIDES_FILE_NAME
from tests.support.sd_socket import NotifyReceiver


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _hub_error_from_a_refused_cache() -> HubError:
    """What `raise HubError(...) from exc` leaves when the HF cache refused a write."""
    wrapped = HubError("cannot store the file")
    wrapped.__cause__ = PermissionError(13, "Permission denied", "/var/lib/edge-agent/hf-cache/models--x")
    return wrapped


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("bad"), 78),
        (NothingFitsError("nothing fits"), 78),
        (PermissionDeniedError("cannot read x: permission denied"), 77),
        (PermissionError(13, "Permission denied", "/etc/edge-agent/agent.toml"), 77),
        (_hub_error_from_a_refused_cache(), 77),
        (ModelUnavailableError("no model"), 69),
        (ModelFileError("missing"), 69),
        (HubUnreachableError("down"), 69),
        (HubAuthError("401"), 69),
        (BadRequestError("--arg x: expected KEY=VALUE"), 2),
        (TooLargeError("the message is larger than the broker accepts"), 65),
        (AnswerError({"done": True, "error": {"code": "too_large", "message": "prompt"}}), 65),
        (AnswerError({"done": True, "error": {"code": "bad_request", "message": "x"}}), 65),
        (NoStatusError("no retained status"), 66),
        (NotFoundError("nothing cached matches x"), 66),
        (TransportError("no broker"), 68),
        (AnswerError({"done": True, "error": {"code": "model_unavailable", "message": "loading"}}), 69),
        (AnswerError({"done": True, "error": {"code": "overloaded", "retry_after_ms": 800}}), 79),
        (AnswerError({"done": True, "error": {"code": "rate_limited", "retry_after_ms": 100}}), 79),
        (OverloadedError("queue full"), 79),
        (DeadlineExceededError("no answer within 2 s"), 124),
        (AnswerError({"done": True, "error": {"code": "timeout", "message": "deadline"}}), 124),
        (AnswerError({"done": True, "error": {"code": "cancelled", "message": "shutting down"}}), 1),
        (AnswerError({"done": True, "error": "not an object"}), 1),
        (RuntimeError("bug"), 1),
    ],
)
def test_exit_code_table(exc: BaseException, code: int) -> None:
    """Each error category maps to its documented exit code; a refused file wins over the error wrapping it;
    an error reply maps by its wire code."""
    assert exit_code_for(exc) == code


@pytest.mark.parametrize("exc", [TransportError("x"), DeadlineExceededError("x"), OverloadedError("x"),
                                 NotFoundError("x"), TooLargeError("x")])
def test_the_daemon_never_ends_with_a_one_shot_code(exc: BaseException) -> None:
    """`run` keeps the codes systemd's restart rules know: a one-shot-only category is 1 for the daemon."""
    assert exit_code_for(exc) in ONE_SHOT_ONLY
    assert exit_code_for(exc, one_shot=False) == 1


def test_one_shot_codes_collide_with_no_daemon_code() -> None:
    """65, 66, 68, 79, 124 are none of the codes the daemon uses nor any the unit file's exit rules name."""
    assert {65, 66, 68, 79, 124} == ONE_SHOT_ONLY
    assert not ONE_SHOT_ONLY & {0, 1, 2, 69, 75, 77, 78, 130}
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "edge-agent.service").read_text()
    named = {int(code) for line in unit.splitlines() if line.split("=", 1)[0].endswith("ExitStatus")
             for code in line.split("=", 1)[1].split() if code.isdigit()}
    assert {2, 75, 77, 78} <= named
    assert not ONE_SHOT_ONLY & named


def test_help_lists_the_exit_codes() -> None:
    """`edge-agent --help` ends with the exit code table, every code in it."""
    text = build_parser().format_help()
    assert EXIT_CODES_HELP.splitlines()[0] in text
    for code in ("69", "75", "77", "78", "65", "66", "68", "79", "124", "130"):
        assert f"\n  {code} " in text


def test_the_daemon_loads_none_of_the_client_commands() -> None:
    """`edge-agent run` parses with a tree of `run` alone: the resident process never imports the Hub client,
    httpx or tqdm that `models`, `chat` or `fleet` need (8.7 MiB of RSS on a fixed-file device)."""
    probe = (
        "import sys; from agent.__main__ import build_parser; "
        "args = build_parser(['run']).parse_args(['run', '--config', 'x.toml']); "
        "print(args.command, sorted(m for m in sys.modules if m.startswith('agent.cli.') or m in "
        "('huggingface_hub', 'httpx2', 'tqdm', 'agent.catalog.hub')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == "run"
    loaded = ast.literal_eval(out[1])
    assert set(loaded) <= {"agent.cli.run", "agent.cli.config_cmd", "agent.cli.exit_codes", "agent.cli.device_client"}
    assert "agent.cli.run" in loaded


def test_every_command_module_is_named_once() -> None:
    """The lazily imported command list matches the modules in agent/cli that define a command."""
    import agent.cli

    here = Path(agent.cli.__file__).parent
    with_parser = {p.stem for p in here.glob("*.py") if "def add_parser(" in p.read_text()}
    assert sorted(with_parser) == sorted(agent.cli.COMMAND_NAMES)


def config_file(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text + f'\n[fleet]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def test_invalid_config_is_78_with_the_key_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value: exit 78, stderr names the key path, nothing on stdout, no traceback."""
    config = config_file(tmp_path, "[mqtt]\nport = 0\n")
    assert main(["config", "check", "--config", str(config)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"edge-agent: error: invalid configuration in {config}:\n  mqtt.port")
    assert "Traceback" not in err


def test_permission_problem_is_77_in_one_line_and_systemd_hears_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused config file: exit 77, one line with the fix, STATUS= and ERRNO=13 sent to $NOTIFY_SOCKET."""
    config = config_file(tmp_path)
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    with NotifyReceiver(tmp_path) as receiver:
        monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
        assert main(["probe", "--config", str(config)]) == 77
        message = receiver.wait_for("STATUS=", timeout=5)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"edge-agent: error: cannot read {config}: permission denied (")
    assert message.fields["STATUS"].startswith(f"failed: cannot read {config}")
    assert message.fields["ERRNO"] == "13"


def test_config_error_reaches_systemd_as_one_status_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` with an invalid config never builds a daemon, yet `systemctl status` shows why (no ERRNO)."""
    config = config_file(tmp_path, "[inference]\nmax_queue = -1\n")
    with NotifyReceiver(tmp_path) as receiver:
        monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
        assert main(["run", "--config", str(config)]) == 78
        message = receiver.wait_for("STATUS=", timeout=5)
    assert "\n" not in message.fields["STATUS"]
    assert "inference.max_queue" in message.fields["STATUS"]
    assert "ERRNO" not in message.fields
    capsys.readouterr()


def test_an_unexpected_error_is_1_with_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug keeps its traceback (it is what a report needs) and ends with the one-line reason."""

    def broken(*args: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr("agent.cli.probe.probe_device", broken)
    assert main(["probe", "--config", str(config_file(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1] == "edge-agent: error: internal error: RuntimeError: boom"


def test_errors_carry_the_journal_error_priority_under_journald(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When stderr is the journal stream, each error line starts with <3> (journalctl -p err shows it)."""
    import os
    import sys

    config = config_file(tmp_path, "[mqtt]\nport = 0\n")
    with (tmp_path / "stderr").open("w") as err:
        st = os.fstat(err.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr(sys, "stderr", err)
        assert main(["config", "check", "--config", str(config)]) == 78
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[0].startswith("<3>edge-agent: error: invalid configuration")
    assert all(line.startswith("<3>") for line in lines)


# -- config check ----------------------------------------------------------------------------------------


def test_check_prints_each_value_with_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Human output: a header naming the layers, then every value with default/file/fleet-override/env."""
    config = config_file(tmp_path, 'device_id = "pi-1"\n[mqtt]\nport = 1884\n')
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / OVERRIDES_FILE_NAME).write_text("[inference]\nmax_queue = 2\n")
    monkeypatch.setenv("EDGE_AGENT_LOG__LEVEL", "debug")
    assert main(["config", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"# file:           {config} (3 key(s))" in lines
    assert f"# fleet-override: {tmp_path / 'state' / OVERRIDES_FILE_NAME} (1 key(s))" in lines
    rows, section = {}, ""
    for line in lines:
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line:
            rows[section + line.split(" = ")[0]] = line.rsplit("  # ", 1)[1]
    assert rows["device_id"] == "file"
    assert rows["mqtt.port"] == "file"
    assert rows["inference.max_queue"] == "fleet-override"
    assert rows["log.level"] == "env:EDGE_AGENT_LOG__LEVEL"
    assert rows["mqtt.keepalive_s"] == "default"


def test_check_json_has_config_sources_and_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json: the effective config, every leaf key's full source label, and each layer's state."""
    config = config_file(tmp_path, 'device_id = "pi-1"\n')
    assert main(["config", "check", "--json", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["device_id"] == "pi-1"
    assert data["sources"]["device_id"] == f"file:{config}"
    assert data["sources"]["mqtt.port"] == "default"
    assert [(layer["layer"], layer["state"]) for layer in data["layers"]] == [
        ("file", "read"), ("fleet-override", "missing"), ("env", "missing")]


@pytest.mark.parametrize(
    ("policy", "shown"),
    [("refused", "# fleet commands: all refused (no fleet public key, fleet.allow_unsigned off)"),
     ("unsigned", "# fleet commands: UNSIGNED ONES RUN")],
)
def test_check_says_how_fleet_commands_are_treated(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, policy: str, shown: str) -> None:
    """config check names the fleet command policy in its header and as fleet_commands in --json."""
    if policy == "unsigned":
        monkeypatch.setenv("EDGE_AGENT_FLEET__ALLOW_UNSIGNED", "true")
    config = config_file(tmp_path, 'device_id = "pi-1"\n')
    assert main(["config", "check", "--config", str(config)]) == 0
    assert any(line.startswith(shown) for line in capsys.readouterr().out.splitlines())
    assert main(["config", "check", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["fleet_commands"]["policy"] == policy


def test_check_says_in_one_line_when_the_override_layer_was_not_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator outside the service's state dir still gets a valid check (exit 0) and one line saying why."""
    config = config_file(tmp_path)
    layer = tmp_path / "state" / OVERRIDES_FILE_NAME
    layer.parent.mkdir()
    layer.write_text("[inference]\nmax_queue = 2\n")
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == layer:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert main(["config", "check", "--config", str(config)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "NOT READ" in line]
    assert len(notes) == 1
    assert f"cannot read {layer}: permission denied" in notes[0]


# -- reset-overrides ---------------------------------------------------------------------------------------


def test_reset_overrides_prints_what_it_removed_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It lists the removed keys (secrets masked), deletes the layer, and a second run exits 0 with nothing to do."""
    config = config_file(tmp_path, "[inference]\nmax_queue = 4\n")
    layer = tmp_path / "state" / OVERRIDES_FILE_NAME
    layer.parent.mkdir()
    layer.write_text('[inference]\nmax_queue = 2\n[mqtt]\npassword = "hunter2"\n')
    assert main(["config", "reset-overrides", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [
        f"removed 2 fleet override(s) from {layer}:", "  inference.max_queue = 2", "  mqtt.password = **********"]
    assert "hunter2" not in out
    assert not layer.exists()
    assert main(["config", "reset-overrides", "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"no fleet overrides at {layer}: nothing to remove\n"


def test_reset_overrides_removes_a_corrupt_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A layer that stops the daemon (not TOML) is what reset is for: it goes, exit 0."""
    config = config_file(tmp_path)
    layer = tmp_path / "state" / OVERRIDES_FILE_NAME
    layer.parent.mkdir()
    layer.write_text("[inference\n")
    assert main(["config", "reset-overrides", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith(f"removed the corrupt fleet override file {layer}")
    assert not layer.exists()


# -- status ----------------------------------------------------------------------------------------------


def test_status_summary_shows_state_model_mode_queue_and_uptime() -> None:
    """The human summary of a retained status + telemetry: uptime counts on from the last reading; the
    fleet command policy is spelled out."""
    from agent.cli.fleet import DeviceView
    from agent.cli.status import _extra, render_status

    now = 1_700_000_100.0
    view = DeviceView(
        "pi-1",
        status={"state": "online", "groups": ["kitchen"], "model": "gemma-3-270m-it", "quant": "Q8_0",
                "n_ctx": 2048, "threads": 4, "since": now - 3600, "commands": "unsigned"},
        telemetry={"ts": now - 10, "queue_depth": 2, "mode": "degraded", "uptime_s": 7190,
                   "requests_served": 5, "requests_failed": 1},
    )
    summary = {**view.row(now, 120.0), **_extra(view, now)}
    assert summary["uptime_s"] == 7200
    rows = dict(line.split(None, 1) for line in render_status(summary, view, now).splitlines())
    assert rows == {
        "device": "pi-1 (groups: kitchen)",
        "state": "online, since 1h 00m ago",
        "model": "gemma-3-270m-it Q8_0, n_ctx 2048, 4 threads",
        "mode": "degraded",
        "commands": "UNSIGNED fleet commands run (fleet.allow_unsigned, no fleet key)",
        "queue": "2",
        "uptime": "2h 00m",
        "requests": "5 served, 1 failed",
        "telemetry": "10s ago",
    }
