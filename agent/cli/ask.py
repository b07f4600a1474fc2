"""``edge-agent ask "question"``: send one request over MQTT and print the answer.

It is also the reference client: it uses the MQTT 5 Response Topic and Correlation Data when the
configured protocol is 5, and the payload's ``reply_to`` for 3.1.1.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import uuid
from typing import Any

from agent.cli.config_cmd import add_config_argument
from agent.errors import AgentError, DeadlineExceededError, TransportError
from agent.settings import load_settings
from agent.transport.mqtt import Incoming, LinkEvent, MqttLink
from agent.transport.topics import DeviceTopics


class AnswerError(AgentError):
    """The agent answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def add_parser(subparsers: Any) -> None:
    ask = subparsers.add_parser("ask", help="ask a device a question over MQTT and print the answer")
    add_config_argument(ask)
    ask.add_argument("question", help="the question (sent as a chat message)")
    ask.add_argument("--device", help="target device id (default: device_id from the config)")
    ask.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    ask.add_argument("--json", action="store_true", help="print the final reply as JSON")
    ask.add_argument("--prompt", action="store_true", help="send a plain prompt instead of a chat message")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.7)
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    ask.set_defaults(func=_ask)


def _ask(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    topics = DeviceTopics(settings.mqtt.topic_prefix, args.device or settings.device_id)
    client_id = f"edge-ask-{uuid.uuid4().hex[:12]}"
    reply_topic = topics.default_reply(client_id)
    request_id = uuid.uuid4().hex
    events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
    link = MqttLink(settings.mqtt, client_id, events.put)
    link.subscribe([(reply_topic, 1)])
    link.start()
    try:
        if not link.wait_connected(min(args.timeout, 15.0)):
            raise TransportError(f"no connection to {settings.mqtt.host}:{settings.mqtt.port}")
        if not link.wait_subscribed(5.0):
            raise TransportError("the broker did not acknowledge the reply subscription")
        payload: dict[str, Any] = {
            "id": request_id,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": args.stream,
        }
        if args.prompt:
            payload["prompt"] = args.question
        else:
            payload["messages"] = [{"role": "user", "content": args.question}]
        v5 = settings.mqtt.protocol == "5"
        if not v5:
            payload["reply_to"] = reply_topic
        link.publish(
            topics.infer,
            json.dumps(payload).encode(),
            qos=1,
            response_topic=reply_topic if v5 else None,
            correlation_data=request_id.encode() if v5 else None,
        )
        final = _collect(events, request_id, args.stream, time.monotonic() + args.timeout)
    finally:
        link.stop()
    if "error" in final:
        raise AnswerError(final["error"].get("code", "internal"), final["error"].get("message", ""))
    if args.json:
        print(json.dumps(final, indent=2, ensure_ascii=False))
    elif args.stream:
        print()
    else:
        print(final.get("text", ""))
    return 0


def _collect(events: queue.SimpleQueue[LinkEvent], request_id: str, stream: bool, deadline: float) -> dict[str, Any]:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError("no answer before the timeout")
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if not isinstance(event, Incoming):
            continue
        try:
            message = json.loads(event.payload)
        except ValueError:
            continue
        if not isinstance(message, dict) or message.get("id") not in (request_id, None):
            continue
        if message.get("done"):
            return message
        if stream and "delta" in message:
            sys.stdout.write(message["delta"])
            sys.stdout.flush()
