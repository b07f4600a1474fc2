"""``edge-agent chat``: an interactive conversation with a device over MQTT.

Each line typed (or read from a pipe) is one user turn; the answer streams to stdout and both go into the
history that every later request carries (after the ``--system`` message, when given). ``/bye`` (or
``/exit``, ``/quit``) or Ctrl-D ends the session, ``/clear`` forgets the history, Ctrl-C stops the answer
being generated (the device is told to cancel it) and, at the prompt, only says how to leave.

With ``--json`` stdout carries JSON Lines only, the same as ``ask --json --stream`` per turn: each stream
chunk, then the final reply; the prompt goes to stderr. A failed turn is one ``edge-agent: error:`` line on
stderr and the session goes on; the exit code is 0 when every turn was answered, else the code of the last
failure (see ``edge-agent --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, TextIO

from agent.cli.ask import ReplyOutput, add_request_arguments, sampling_body
from agent.cli.config_cmd import add_config_argument
from agent.cli.device_client import DeviceClient, Reply, chat_messages
from agent.cli.exit_codes import EXIT_OK, exit_code_for
from agent.errors import AgentError
from agent.settings import load_settings

EXIT_WORDS = frozenset({"/bye", "/exit", "/quit"})
HELP_TEXT = "/bye (or Ctrl-D) ends the chat, /clear forgets the conversation, Ctrl-C stops an answer"
CANCEL_WAIT_S = 5.0
"""How long a cancelled answer's final reply is waited for before the prompt comes back."""


def add_parser(subparsers: Any) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="chat with a device over MQTT (history, --system, streaming; /bye or Ctrl-D to leave)",
        description="An interactive conversation with a device: each line is a user turn, answers stream "
        "as they are generated, and every request carries the conversation so far. " + HELP_TEXT + ". "
        "Reads lines from a pipe too. With --json stdout is JSON Lines (each chunk, then each final reply).",
    )
    add_config_argument(chat)
    add_request_arguments(chat, max_tokens=256)
    chat.add_argument("--json", action="store_true", help="write JSON Lines (chunks and final replies) to stdout")
    chat.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    with DeviceClient(settings, args.device, connect_timeout=min(args.timeout, 15.0)) as client:
        session = ChatSession(client, system=args.system, body=sampling_body(args), timeout=args.timeout,
                              json_mode=args.json)
        if interactive:
            print(f"chatting with {client.topics.device_id}; {HELP_TEXT}", file=sys.stderr)
        return session.run(_lines(interactive, prompt_on_stderr=args.json))


class ChatSession:
    """The conversation: the history, one request per turn, and how each answer is written."""

    def __init__(self, client: DeviceClient, *, system: str | None, body: dict[str, Any], timeout: float,
                 json_mode: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.client = client
        self.system = system
        self.history: list[dict[str, str]] = []
        self.body = dict(body)  # max_tokens and the sampling the operator gave
        self.timeout = timeout
        self.json_mode = json_mode
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def run(self, lines: Any) -> int:
        code = EXIT_OK
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text in EXIT_WORDS:
                break
            if text == "/clear":
                self.history.clear()
                self.err.write("(conversation cleared)\n")
                continue
            if text in ("/?", "/help"):
                self.err.write(HELP_TEXT + "\n")
                continue
            try:
                self.turn(text)
            except AgentError as exc:
                # One failed turn does not end the conversation; the exit code remembers it.
                code = exit_code_for(exc)
                self.err.write(f"edge-agent: error: {exc}\n")
                self.err.flush()
        return code

    def turn(self, user: str) -> Reply:
        """One exchange: send the history plus ``user``, stream the answer, keep both when it succeeded."""
        output = ReplyOutput(json_mode=self.json_mode, stream=True, out=self.out)
        body = {**self.body, "messages": chat_messages(self.system, self.history, user)}
        request_id = self.client.send(body, stream=True, timeout=self.timeout)
        try:
            final = self.client.collect(request_id, timeout=self.timeout, on_chunk=output.chunk)
        except KeyboardInterrupt:
            self.client.cancel(request_id)
            final = self.client.collect(request_id, timeout=CANCEL_WAIT_S, on_chunk=output.chunk)
        output.final(final)  # raises AnswerError for an error reply: the turn is not kept
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": str(final.get("text", ""))}]
        return final


def _lines(interactive: bool, *, prompt_on_stderr: bool) -> Any:
    """The user's lines: ``input()`` with a prompt on a terminal (Ctrl-C there only explains), else stdin."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            if prompt_on_stderr:
                # stdout is for JSON only: the prompt goes to stderr, input() gets none.
                sys.stderr.write(">>> ")
                sys.stderr.flush()
                yield input()
            else:
                yield input(">>> ")
        except EOFError:
            sys.stderr.write("\n")
            return
        except KeyboardInterrupt:
            sys.stderr.write("\n(" + HELP_TEXT + ")\n")


def _enable_line_editing() -> None:
    """Line editing and the session's input history (up arrow) when the readline module exists."""
    # Not built on every platform (musl, some minimal Pythons): then input() works without editing.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401, PLC0415 - importing it is what turns line editing on for input()
