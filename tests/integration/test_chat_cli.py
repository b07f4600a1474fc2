"""`edge-agent chat` and `edge-agent ask` as subprocesses against a real Mosquitto and the real daemon: what
they send (watched on the broker), what they print, and their exit codes."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.daemon import REPO, Client, write_config

pytestmark = pytest.mark.integration


def cli(*args: str, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, check=False)


def watch(client: Client) -> None:
    """See every request to dev1 and every reply to anyone, as the broker delivers them."""
    client.subscribe("edge/dev1/infer")
    client.subscribe("edge/dev1/reply/#")


def seen(client: Client) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(requests, replies) received so far by the watching client."""
    requests, replies = [], []
    while not client.messages.empty():
        message = client.messages.get()
        (requests if message.topic.endswith("/infer") else replies).append(json.loads(message.payload))
    return requests, replies


def test_chat_through_a_pipe_streams_answers_and_keeps_the_history(start_daemon, client: Client) -> None:
    """Two lines then /bye: two streamed requests; the second carries the system message, the first exchange
    (with the answer the device gave) and the new question; stdout is the two answers."""
    daemon = start_daemon()
    watch(client)
    done = cli("chat", "--config", str(daemon.config), "--system", "Answer briefly.", "--max-tokens", "6",
               "--temperature", "0", stdin="What is the capital of France?\nAnd of Germany?\n/bye\nignored\n")
    assert done.returncode == 0, done.stderr
    requests, replies = seen(client)
    assert len(requests) == 2
    assert all(r["stream"] is True for r in requests)
    finals = {r["id"]: r for r in replies if r.get("done")}
    first = finals[requests[0]["id"]]["text"]
    second = finals[requests[1]["id"]]["text"]
    assert requests[0]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": "What is the capital of France?"}]
    assert requests[1]["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Germany?"},
    ]
    assert any("delta" in r for r in replies)  # streamed, not only final replies
    assert done.stdout == first + "\n" + second + "\n"


def test_chat_json_writes_json_lines_only(start_daemon) -> None:
    """chat --json: every stdout line is a JSON object, each answer's chunks then its final reply."""
    daemon = start_daemon()
    done = cli("chat", "--config", str(daemon.config), "--json", "--max-tokens", "4", stdin="Hi\nAgain\n")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    finals = [m for m in lines if m.get("done")]
    assert len(finals) == 2
    assert all("delta" in m for m in lines if not m.get("done"))
    assert lines[-1] is finals[-1]


def test_ask_system_goes_first_and_json_is_one_document(start_daemon, client: Client) -> None:
    """ask --system TEXT sends [system, user]; --json prints exactly one JSON document (the final reply)."""
    daemon = start_daemon()
    watch(client)
    done = cli("ask", "--config", str(daemon.config), "--system", "You are terse.", "--json", "--max-tokens", "3",
               "Hello")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)  # the whole of stdout is one document
    assert reply["done"] is True
    assert reply["usage"]["completion_tokens"] == 3
    (request,), _ = seen(client)
    assert request["messages"] == [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Hello"}]


def test_ask_json_stream_is_json_lines_and_text_stream_is_text_only(start_daemon) -> None:
    """--json --stream: JSON Lines ending with the final reply; --stream alone: the answer's text only."""
    daemon = start_daemon()
    lines = cli("ask", "--config", str(daemon.config), "--json", "--stream", "--max-tokens", "4", "Hi")
    assert lines.returncode == 0, lines.stderr
    messages = [json.loads(line) for line in lines.stdout.splitlines()]
    assert messages[-1]["done"] is True
    assert all("delta" in m for m in messages[:-1]) and len(messages) >= 2
    text = cli("ask", "--config", str(daemon.config), "--stream", "--max-tokens", "4", "--temperature", "0", "Hi")
    final = cli("ask", "--config", str(daemon.config), "--max-tokens", "4", "--temperature", "0", "Hi")
    assert text.returncode == 0, text.stderr
    assert text.stdout == final.stdout  # the same text, streamed or not; no JSON in either
    assert not text.stdout.lstrip().startswith("{")


def test_ask_exits_68_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    """Nothing listens on the port: exit 68 (broker unreachable), one line on stderr, nothing on stdout."""
    config = write_config(tmp_path / "agent.toml", port=9, model_file=Path("unused"))
    for command in (["ask", "--timeout", "2", "Hi"], ["chat", "--timeout", "2"]):
        done = cli(command[0], "--config", str(config), *command[1:], stdin="Hi\n")
        assert done.returncode == 68, done.stdout + done.stderr
        assert done.stderr == "edge-agent: error: no connection to 127.0.0.1:9\n"
        assert done.stdout == ""


def test_ask_exits_124_when_no_answer_comes_in_time(tmp_path: Path, broker: Broker) -> None:
    """A device nobody runs: after --timeout, exit 124 (timeout) with one line naming the device."""
    config = write_config(tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"), device_id="ghost")
    done = cli("ask", "--config", str(config), "--timeout", "1", "--json", "Hi")
    assert done.returncode == 124, done.stdout + done.stderr
    assert done.stderr == "edge-agent: error: no answer from ghost within 1 s\n"
    assert done.stdout == ""


def test_ask_refused_as_too_large_exits_65(start_daemon) -> None:
    """The device answers too_large: exit 65 (bad request), the reply's code in the error line."""
    daemon = start_daemon()
    done = cli("ask", "--config", str(daemon.config), "--max-tokens", "5", "--prompt", "word " * 3000)
    assert done.returncode == 65, done.stdout + done.stderr
    assert done.stderr.startswith("edge-agent: error: too_large: ")


class Terminal:
    """`edge-agent chat` on a pseudo-terminal, as a person runs it (readline, prompt, Ctrl-C, Ctrl-D)."""

    def __init__(self, *args: str) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        """Everything up to and including the next ``text`` (the terminal's output since the last call)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout} s; the terminal shows:\n{self.seen}")
            self.seen += os.read(self.master, 65536).decode(errors="replace")
        before, _, self.seen = self.seen.partition(text)
        return before + text

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def interrupt(self) -> None:
        """Ctrl-C: what the terminal driver sends the foreground process (this pty is not the child's
        controlling terminal, so the key itself would not)."""
        self.proc.send_signal(signal.SIGINT)

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            os.close(self.master)


def test_chat_on_a_terminal_prompts_streams_and_ends_on_ctrl_d(start_daemon) -> None:
    """On a terminal: a greeting and a '>>> ' prompt; an answer comes back and the prompt again; Ctrl-D ends
    the session with exit 0."""
    daemon = start_daemon()
    term = Terminal("--config", str(daemon.config), "--max-tokens", "4")
    try:
        assert "chatting with dev1" in term.read_until(">>> ")
        term.type("Hello\r")
        answer = term.read_until(">>> ")
        assert answer.startswith("Hello\r\n") and len(answer) > len("Hello\r\n>>> ")
        term.type("\x04")
    finally:
        code = term.close()
    assert code == 0


def test_ctrl_c_stops_the_answer_on_the_device_and_the_chat_goes_on(start_daemon, client: Client) -> None:
    """Ctrl-C while an answer streams: the device is sent a cancel for that request, its final reply says
    cancelled, the prompt returns; /bye then ends the session with exit 0."""
    daemon = start_daemon(model="slow")
    client.subscribe("edge/dev1/infer/cancel")
    term = Terminal("--config", str(daemon.config), "--max-tokens", "1000")
    try:
        term.read_until(">>> ")
        term.type("Tell me a long story\r")
        term.read_until("Tell me a long story\r\n")
        time.sleep(0.5)  # some tokens in
        term.interrupt()
        term.read_until(">>> ")
        cancel = json.loads(client.messages.get(timeout=10).payload)
        term.type("/bye\r")
    finally:
        code = term.close()
    assert code == 0
    assert set(cancel) == {"id"}
    assert daemon.wait_event("request_done", finish_reason="cancelled", timeout=30)
