"""The operator CLI's pure parts: reply output shapes (text vs JSON), the chat session's history, the pull
progress bar, and the shell completion script generated from the parser tree."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import subprocess
from typing import Any

import pytest

from agent.__main__ import build_parser
from agent.cli.ask import ReplyOutput
from agent.cli.chat import ChatSession
from agent.cli.completion import completion_script, walk
from agent.cli.device_client import AnswerError, chat_messages
from agent.cli.progress import TransferBar, transfer_bar
from agent.errors import DeadlineExceededError

CHUNKS = [{"id": "r1", "seq": 0, "delta": "Par"}, {"id": "r1", "seq": 1, "delta": "is"}]
FINAL = {"id": "r1", "done": True, "text": "Paris", "finish_reason": "stop", "usage": {"completion_tokens": 2}}
ERROR = {"id": "r1", "done": True, "error": {"code": "overloaded", "message": "queue full", "retry_after_ms": 500}}


def write(output: ReplyOutput, final: dict[str, Any], *, stream: bool) -> None:
    if stream:
        for chunk in CHUNKS:
            output.chunk(chunk)
    output.final(final)


# -- reply output ------------------------------------------------------------------------------------------


def test_json_without_stream_is_exactly_one_json_document() -> None:
    """ask --json: stdout parses as one JSON value, the final reply."""
    out = io.StringIO()
    write(ReplyOutput(json_mode=True, stream=False, out=out), FINAL, stream=False)
    assert json.loads(out.getvalue()) == FINAL


def test_json_with_stream_is_json_lines_chunks_then_the_final_reply() -> None:
    """ask --json --stream: one compact object per line, every chunk in order, the final reply last."""
    out = io.StringIO()
    write(ReplyOutput(json_mode=True, stream=True, out=out), FINAL, stream=True)
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [*CHUNKS, FINAL]


def test_streamed_text_is_the_answer_only() -> None:
    """ask --stream: the deltas as they come and one newline; no JSON, no metadata on stdout."""
    out = io.StringIO()
    write(ReplyOutput(json_mode=False, stream=True, out=out), FINAL, stream=True)
    assert out.getvalue() == "Paris\n"


def test_text_without_stream_prints_the_final_text() -> None:
    out = io.StringIO()
    write(ReplyOutput(json_mode=False, stream=False, out=out), FINAL, stream=False)
    assert out.getvalue() == "Paris\n"


@pytest.mark.parametrize(("json_mode", "stream"), [(True, False), (True, True), (False, False), (False, True)])
def test_an_error_reply_raises_after_the_json_is_written(json_mode: bool, stream: bool) -> None:
    """An error reply ends in AnswerError (its wire code decides the exit code); in JSON mode it is also the
    stdout document, in text mode stdout gets none of it."""
    out = io.StringIO()
    with pytest.raises(AnswerError) as caught:
        ReplyOutput(json_mode=json_mode, stream=stream, out=out).final(ERROR)
    assert caught.value.code == "overloaded"
    assert "retry after 0.5 s" in str(caught.value)
    if json_mode:
        assert json.loads(out.getvalue()) == ERROR
    else:
        assert out.getvalue() == ""


def test_chat_messages_put_the_system_message_first() -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert chat_messages("be brief", history, "c") == [
        {"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "c"}]
    assert chat_messages(None, [], "c") == [{"role": "user", "content": "c"}]


# -- chat session ----------------------------------------------------------------------------------------------


class ScriptedClient:
    """Stands in for DeviceClient: records each request body and answers from a script."""

    def __init__(self, answers: list[dict[str, Any] | Exception]) -> None:
        self.answers = answers
        self.sent: list[dict[str, Any]] = []

    def send(self, body: dict[str, Any], *, stream: bool, timeout: float) -> str:
        self.sent.append(body)
        return f"r{len(self.sent)}"

    def collect(self, request_id: str, *, timeout: float, on_chunk: Any = None) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        on_chunk({"id": request_id, "seq": 0, "delta": answer["text"]})
        return {"id": request_id, "done": True, **answer}

    def cancel(self, request_id: str) -> None:
        raise AssertionError("not cancelled in these tests")


def session(client: ScriptedClient, out: io.StringIO, err: io.StringIO, **kw: Any) -> ChatSession:
    options: dict[str, Any] = {"system": "be brief", "body": {"max_tokens": 16, "temperature": 0.0},
                               "timeout": 5.0, "json_mode": False}
    options.update(kw)
    return ChatSession(client, out=out, err=err, **options)  # type: ignore[arg-type]


def test_each_turn_carries_the_conversation_so_far() -> None:
    """The second request holds system, the first exchange, then the new question; /bye ends the session."""
    client = ScriptedClient([{"text": "Paris"}, {"text": "Berlin"}])
    out, err = io.StringIO(), io.StringIO()
    code = session(client, out, err).run(["capital of France?\n", "\n", "and Germany?\n", "/bye\n", "never sent\n"])
    assert code == 0
    assert out.getvalue() == "Paris\nBerlin\n"
    assert client.sent[1]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "and Germany?"},
    ]
    assert len(client.sent) == 2


def test_clear_forgets_and_a_failed_turn_is_not_kept() -> None:
    """/clear empties the history; a turn that failed is reported on stderr, left out of the history, and its
    exit code is the session's."""
    client = ScriptedClient([{"text": "one"}, DeadlineExceededError("no answer"), {"text": "three"}])
    out, err = io.StringIO(), io.StringIO()
    code = session(client, out, err, system=None).run(["1", "/clear", "2", "3"])
    assert code == 124
    assert "edge-agent: error: no answer" in err.getvalue()
    assert client.sent[2]["messages"] == [{"role": "user", "content": "3"}]


def test_chat_json_is_json_lines_only() -> None:
    """chat --json: stdout is JSON Lines (chunks, then each final reply), nothing else."""
    client = ScriptedClient([{"text": "a"}, {"text": "b"}])
    out, err = io.StringIO(), io.StringIO()
    assert session(client, out, err, json_mode=True).run(["x", "y"]) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [m.get("done", False) for m in lines] == [False, True, False, True]


# -- progress -------------------------------------------------------------------------------------------------


def test_the_pull_bar_shows_bytes_percent_rate_and_eta() -> None:
    """One bar on the given stream: the label, 100% at the end, a rate in B/s and the elapsed<remaining pair."""
    stream = io.StringIO()
    bar = TransferBar("tiny:Q8_0", stream=stream, mininterval=0)
    total = 8 * 2**20
    for done in range(0, total + 1, 2**20):
        bar(done, total)
    bar.close()
    text = stream.getvalue()
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("tiny:Q8_0: 100%")
    assert "8.00M/8.00M" in last
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]", last), last
    assert text.endswith("\n")


def test_a_cache_hit_draws_no_bar_and_a_resumed_pull_starts_where_it_stands() -> None:
    """No callback, no output; the first callback at 6 of 8 MiB starts the bar there (rate = this run's bytes)."""
    stream = io.StringIO()
    TransferBar("x", stream=stream).close()
    assert stream.getvalue() == ""
    bar = TransferBar("x", stream=stream, mininterval=0)
    bar(6 * 2**20, 8 * 2**20)
    assert " 75%" in stream.getvalue()
    bar(8 * 2**20, 8 * 2**20)
    bar(8 * 2**20, 8 * 2**20)  # the last byte reported twice: still one bar, ended once
    assert stream.getvalue().count("\n") == 1
    assert stream.getvalue().rsplit("\r", 1)[-1].startswith("x: 100%")


def test_end_line_false_leaves_the_newline_to_the_caller() -> None:
    """end_line=False (pull writes its own newline after the transfer): the finished bar ends without one,
    and neither a later close() nor garbage collection adds any."""
    stream = io.StringIO()
    bar = TransferBar("x", stream=stream, mininterval=0, end_line=False)
    bar(2**20, 2**20)
    bar.close()
    del bar
    assert "100%" in stream.getvalue()
    assert "\n" not in stream.getvalue()


def test_a_terminal_that_reports_no_size_still_gets_a_bar() -> None:
    """A fresh pty (0 rows, 0 columns, as over some serial consoles) draws an 80-column bar, not nothing."""
    master, slave = pty.openpty()
    with os.fdopen(slave, "w", encoding="utf-8") as terminal:
        bar = TransferBar("x", stream=terminal, mininterval=0)
        bar(2**20, 2**20)
        terminal.flush()
        drawn = os.read(master, 65536).decode()
    os.close(master)
    assert "x: 100%" in drawn


def test_no_bar_off_a_terminal_or_in_json_mode() -> None:
    """transfer_bar draws only on a terminal, never with --json (stdout then holds only JSON, stderr stays quiet)."""
    assert not transfer_bar("x", stream=io.StringIO()).enabled

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert transfer_bar("x", stream=Tty()).enabled
    assert not transfer_bar("x", json_mode=True, stream=Tty()).enabled


# -- completion ---------------------------------------------------------------------------------------------------


def test_completion_names_every_command_and_option() -> None:
    """The script holds every command path and every option of the real parser tree."""
    parser = build_parser()
    nodes = walk(parser)
    paths = {n.path for n in nodes}
    assert {"ask", "chat", "status", "models ls", "models rm", "models prune", "config check", "fleet cmd",
            "completion", "pull", "plan", "run"} <= paths
    for shell in ("bash", "zsh"):
        script = completion_script(parser, shell)
        for node in nodes:
            if node.path:
                assert f'state="{node.path}"' in script
            for option in node.options:
                assert option in script


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being completed), running the generated function."""
    line = " ".join(f"'{w}'" for w in words)
    program = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _edge_agent; "
               'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_bash_script_completes_commands_actions_options_and_choices() -> None:
    """Run the generated function in bash: commands, a group's actions, options, fixed choices, and an
    option's value is skipped when finding the command path."""
    script = completion_script(build_parser(), "bash")
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    assert {"ask", "chat", "models", "completion", "status"} <= set(complete(script, "edge-agent", ""))
    assert complete(script, "edge-agent", "models", "") == ["ls", "rm", "prune"]
    assert complete(script, "edge-agent", "completion", "") == ["bash", "zsh"]
    assert "--system" in complete(script, "edge-agent", "chat", "--config", "x.toml", "--")
    assert complete(script, "edge-agent", "ask", "--js") == ["--json"]


def test_zsh_script_loads_through_bashcompinit() -> None:
    script = completion_script(build_parser(), "zsh")
    assert script.startswith("#compdef edge-agent\n")
    assert "bashcompinit" in script
    assert script.rstrip().endswith("complete -o default -F _edge_agent edge-agent")
