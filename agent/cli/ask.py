"""``edge-agent ask "question"``: send one request over MQTT and print the answer.

Output (stdout carries either text or JSON, never both; notices and errors go to stderr):

* default: the answer's text once it is complete; ``--stream``: the text as it arrives;
* ``--json``: one JSON document, the final reply (``done: true``; an error reply too, then exit non-zero);
* ``--json --stream``: JSON Lines: each stream chunk (``{"id", "seq", "delta"}``) as it arrives, then the
  final reply, one compact object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from agent.cli.config_cmd import add_config_argument
from agent.cli.device_client import AnswerError, DeviceClient, Reply, chat_messages
from agent.errors import BadRequestError
from agent.settings import load_settings


def add_parser(subparsers: Any) -> None:
    ask = subparsers.add_parser(
        "ask",
        help="ask a device a question over MQTT and print the answer",
        description="Send one request to a device and print the answer. With --json stdout is one JSON "
        "document (the final reply), or JSON Lines with --stream (each chunk, then the final reply).",
    )
    add_config_argument(ask)
    ask.add_argument("question", help="the question (sent as a chat message)")
    add_request_arguments(ask, max_tokens=128)
    ask.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    ask.add_argument("--json", action="store_true",
                     help="print the final reply as one JSON document (with --stream: JSON Lines)")
    ask.add_argument("--prompt", action="store_true", help="send a plain prompt instead of a chat message")
    ask.set_defaults(func=_ask)


def add_request_arguments(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """The options ``ask`` and ``chat`` share: target device, system message, sampling, timeout."""
    parser.add_argument("--device", help="target device id (default: device_id from the config)")
    parser.add_argument("--system", metavar="TEXT", help="a system message sent before the conversation")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature (default: the served model's, see [generation] and models.toml)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each answer (default 120)")


def sampling_body(args: argparse.Namespace) -> dict[str, Any]:
    """max_tokens, and the temperature only when given: unset, the device uses the model's default."""
    body: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def _ask(args: argparse.Namespace) -> int:
    if args.prompt and args.system:
        raise BadRequestError("--system needs a chat message; it cannot go with --prompt")
    settings = load_settings(args.config, required=args.config is not None)
    body: dict[str, Any] = sampling_body(args)
    if args.prompt:
        body["prompt"] = args.question
    else:
        body["messages"] = chat_messages(args.system, [], args.question)
    output = ReplyOutput(json_mode=args.json, stream=args.stream)
    with DeviceClient(settings, args.device, connect_timeout=min(args.timeout, 15.0)) as client:
        final = client.request(body, timeout=args.timeout, on_chunk=output.chunk if args.stream else None)
    output.final(final)
    return 0


class ReplyOutput:
    """Writes replies to stdout in one of the documented shapes; raises :class:`AnswerError` for an error reply.

    Text mode writes the answer's text only; JSON mode writes JSON only (one document, or JSON Lines when
    streaming), so a program reading stdout never meets the other kind.
    """

    def __init__(self, *, json_mode: bool, stream: bool, out: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.stream = stream
        self.out = out if out is not None else sys.stdout
        self._open_line = False

    def chunk(self, message: Reply) -> None:
        if self.json_mode:
            self._line(message)
        else:
            delta = str(message.get("delta", ""))
            self.out.write(delta)
            self.out.flush()
            self._open_line = self._open_line or bool(delta)

    def final(self, reply: Reply) -> None:
        if self.json_mode:
            if self.stream:
                self._line(reply)
            else:
                self.out.write(json.dumps(reply, indent=2, ensure_ascii=False) + "\n")
                self.out.flush()
        elif self.stream:
            if self._open_line:
                self.out.write("\n")
                self.out.flush()
        elif "error" not in reply:
            self.out.write(str(reply.get("text", "")) + "\n")
            self.out.flush()
        self._open_line = False
        if "error" in reply:
            raise AnswerError(reply)

    def _line(self, message: Reply) -> None:
        self.out.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.out.flush()
