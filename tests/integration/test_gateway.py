"""edge-agent gateway against real Mosquitto, real daemons and the official OpenAI and Ollama Python clients.

One fleet for the module (two devices in group 'kitchen', one slow device with one slot and no queue) and one
gateway subprocess (``python -m agent gateway``) with a bearer token from the environment. Each test states one
behaviour a client relies on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.support.broker import Broker, free_port, wait_port
from tests.support.daemon import REPO, Client, DaemonProcess, Daemons, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOKEN = "test-token-5b1e"  # noqa: S105 - a test fixture's token


@dataclass
class Fleet:
    broker: Broker
    daemons: dict[str, DaemonProcess]
    url: str
    gateway: subprocess.Popen[bytes]
    gateway_log: Path

    def openai(self, token: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token, max_retries=0, timeout=60)

    def ollama(self) -> ollama.Client:
        return ollama.Client(host=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def _gateway_config(path: Path, broker_port: int, timeout_s: float = 30) -> Path:
    path.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ntopic_prefix = "edge"\n'
                    '[log]\nlevel = "debug"\nformat = "json"\n'
                    f'[gateway]\nrequest_timeout_s = {timeout_s}\n')
    return path


def _start_gateway(base: Path, broker_port: int, port: int, timeout_s: float = 30) -> subprocess.Popen[bytes]:
    """``python -m agent gateway`` on ``port`` with the module's token from the environment; waits until it listens."""
    config = _gateway_config(base.with_suffix(".toml"), broker_port, timeout_s)
    with base.with_suffix(".log").open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "agent", "gateway", "--config", str(config), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "EDGE_AGENT_GATEWAY__TOKEN": TOKEN},
        )
    wait_port(port, timeout=20)
    return gateway


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("gateway")
    broker = Broker(work / "broker").start()
    daemons = Daemons()
    procs: dict[str, DaemonProcess] = {}
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for device, model, extra in (
            ("kitchen-1", "Q8_0", {}),
            ("kitchen-2", "Q8_0", {}),
            # One slot and no queue: a second request while one runs is refused 'overloaded'.
            ("slow-1", "slow", {"inference": {"parallel": 1, "max_queue": 0}}),
        ):
            groups = ["kitchen"] if device.startswith("kitchen") else ["slow"]
            config = write_config(work / f"{device}.toml", port=broker.port, model_file=tiny_models[model],
                                  device_id=device, top={"groups": groups},
                                  telemetry={"interval_s": 1.0,
                                             "buffer_dir": str(work / f"state-{device}" / "telemetry")},
                                  **extra)
            procs[device] = DaemonProcess(config=config, workdir=work)
            daemons.start(procs[device], wait=False)
        for daemon in procs.values():
            daemon.wait_event("agent_started", timeout=60)
        port = free_port()
        gateway = _start_gateway(work / "gw", broker.port, port)
        yield Fleet(broker, procs, f"http://127.0.0.1:{port}", gateway, work / "gw.log")
    finally:
        if gateway is not None:
            _stop(gateway)
        daemons.stop_all()
        broker.stop()


# -- OpenAI -------------------------------------------------------------------------------------------


def test_openai_chat_completion(fleet: Fleet) -> None:
    """A non-streaming chat completion to one device comes back as a chat.completion with usage and finish reason."""
    reply = fleet.openai().chat.completions.create(
        model="kitchen-1", messages=[{"role": "developer", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_completion_tokens=8, temperature=0, seed=1)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    assert reply.system_fingerprint == "edge-agent:kitchen-1"


def test_openai_streaming(fleet: Fleet) -> None:
    """A streamed completion arrives as chat.completion.chunk events (role first, text, finish, usage) until [DONE]."""
    stream = fleet.openai().chat.completions.create(
        model="kitchen-2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens <= 8


def test_openai_model_list_shows_devices_groups_and_fleet(fleet: Fleet) -> None:
    """GET /v1/models lists each live device, each group with a live member, and the fleet share."""
    ids = {m.id for m in fleet.openai().models.list()}
    assert {"kitchen-1", "kitchen-2", "slow-1", "group:kitchen", "group:slow", "fleet"} <= ids
    assert fleet.openai().models.retrieve("group:kitchen").id == "group:kitchen"


def test_group_and_fleet_routing(fleet: Fleet) -> None:
    """group:NAME is answered by a live member of that group; 'fleet' by some device of the fleet share."""
    client = fleet.openai()
    served = set()
    for _ in range(2):
        reply = client.chat.completions.create(model="group:kitchen", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
        served.add(reply.system_fingerprint)
    assert served <= {"edge-agent:kitchen-1", "edge-agent:kitchen-2"}
    fleet_reply = client.chat.completions.create(model="fleet", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4)
    assert fleet_reply.system_fingerprint in {"edge-agent:kitchen-1", "edge-agent:kitchen-2", "edge-agent:slow-1"}


def test_unknown_model_is_404(fleet: Fleet) -> None:
    """A model name that is no live device, group or fleet is a NotFoundError in OpenAI's error shape."""
    with pytest.raises(openai.NotFoundError) as info:
        fleet.openai().chat.completions.create(model="pantry-9", messages=[{"role": "user", "content": "Hi"}])
    assert "pantry-9" in info.value.message
    assert info.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_bad_token_is_401(fleet: Fleet) -> None:
    """A wrong bearer token is refused with 401 on the OpenAI and the Ollama routes."""
    with pytest.raises(openai.AuthenticationError):
        fleet.openai(token="wrong").models.list()  # noqa: S106
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=fleet.url, headers={"Authorization": "Bearer wrong"}).list()
    assert info.value.status_code == 401


def test_refused_fields_are_400(fleet: Fleet) -> None:
    """What the devices cannot honour (here n = 2) is refused with a 400 naming it, before any device sees it."""
    with pytest.raises(openai.BadRequestError) as info:
        fleet.openai().chat.completions.create(model="kitchen-1", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert "n" in info.value.message


def _slow_stream(fleet: Fleet) -> tuple[openai.Stream, str]:  # type: ignore[type-arg]
    """A long streamed generation on slow-1, once its text flows; and the request's id on the wire."""
    stream = fleet.openai().chat.completions.create(
        model="slow-1", messages=[{"role": "user", "content": "Tell me a long story"}], max_tokens=900,
        stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return stream, chunk.id.removeprefix("chatcmpl-")  # generating now
    raise AssertionError("the stream ended before any text")


def test_overloaded_is_429_with_retry_after(fleet: Fleet) -> None:
    """A device with its one slot busy and no queue refuses the next request: 429 with Retry-After."""
    stream, request_id = _slow_stream(fleet)
    try:
        with pytest.raises(openai.RateLimitError) as info:
            fleet.openai().chat.completions.create(model="slow-1", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4)
        assert info.value.status_code == 429
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["code"] == "overloaded"  # type: ignore[index]
    finally:
        stream.close()
        # The slot is free again once the cancelled request is done (the next test needs it).
        fleet.daemons["slow-1"].wait_event("request_done", timeout=15, id=request_id)


def test_client_disconnect_cancels_generation(fleet: Fleet) -> None:
    """Closing a stream mid-generation cancels the request on the device: it logs cancel_requested and ends the
    request with finish_reason 'cancelled' long before max_tokens."""
    daemon = fleet.daemons["slow-1"]
    stream, request_id = _slow_stream(fleet)
    stream.close()
    daemon.wait_event("cancel_requested", timeout=15, id=request_id)
    done = daemon.wait_event("request_done", timeout=15, id=request_id)
    assert done["finish_reason"] == "cancelled"
    assert done["tokens"] < 900


def _logged(path: Path, event: str) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == event]


def test_disconnect_while_waiting_for_a_whole_answer_cancels(fleet: Fleet) -> None:
    """A client that gives up on a non-streamed answer (here: its read timeout) gets the generation cancelled too."""
    before = {e["id"] for e in _logged(fleet.gateway_log, "gateway_request_cancelled")}
    with fleet.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/api/chat", timeout=1.5, json={
            "model": "slow-1", "stream": False, "messages": [{"role": "user", "content": "A long story"}],
            "options": {"num_predict": 900}})
    deadline = time.monotonic() + 10
    while not (cancelled := {e["id"] for e in _logged(fleet.gateway_log, "gateway_request_cancelled")} - before):
        assert time.monotonic() < deadline, "the gateway did not cancel"
        time.sleep(0.1)
    done = fleet.daemons["slow-1"].wait_event("request_done", timeout=15, id=cancelled.pop())
    assert done["finish_reason"] == "cancelled"


def test_timeout_is_504_and_cancels(fleet: Fleet, tmp_path: Path) -> None:
    """A request without its final reply within [gateway] request_timeout_s is a 504, and the device is told to
    stop (cancel_requested)."""
    port = free_port()
    gateway = _start_gateway(tmp_path / "gw-short", fleet.broker.port, port, timeout_s=0.5)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="slow-1", messages=[{"role": "user", "content": "A long story"}],
                                           max_tokens=900)
        assert info.value.status_code == 504
        assert info.value.body["code"] == "timeout"  # type: ignore[index]
    finally:
        _stop(gateway)
    cancelled = [e["id"] for e in _logged(tmp_path / "gw-short.log", "gateway_request_cancelled")]
    assert len(cancelled) == 1
    done = fleet.daemons["slow-1"].wait_event("request_done", timeout=15, id=cancelled[0])
    assert done["finish_reason"] == "cancelled"


def test_draining_device_is_503_and_left_out_of_its_group(fleet: Fleet) -> None:
    """A draining device answers 503 with Retry-After, and its group sends work to the other member."""
    mqtt = Client(fleet.broker.port)
    try:
        mqtt.publish("edge/kitchen-2/cmd/drain", {"id": "drain-gw"})
        mqtt.retained("edge/kitchen-2/status", state="draining")
        client = fleet.openai()
        refused: openai.APIStatusError | None = None
        deadline = time.monotonic() + 10
        while refused is None or refused.status_code != 503:  # the gateway sees the status a moment after us
            assert time.monotonic() < deadline, f"kitchen-2 not refused 503 while draining (last: {refused})"
            try:
                client.chat.completions.create(model="kitchen-2", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
            except openai.APIStatusError as exc:
                refused = exc  # 429 'overloaded' until the gateway knows it drains
            time.sleep(0.2)
        assert int(refused.response.headers["retry-after"]) >= 1
        for _ in range(3):
            reply = client.chat.completions.create(model="group:kitchen", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4)
            assert reply.system_fingerprint == "edge-agent:kitchen-1"
    finally:
        mqtt.publish("edge/kitchen-2/cmd/resume", {"id": "resume-gw"})
        mqtt.retained("edge/kitchen-2/status", state="online")
        mqtt.close()


# -- Ollama -------------------------------------------------------------------------------------------


def test_ollama_chat(fleet: Fleet) -> None:
    """ollama.chat answers with a message and Ollama's counters, streamed (chunks then done) and not."""
    client = fleet.ollama()
    reply = client.chat(model="kitchen-1", messages=[{"role": "user", "content": "Hi"}], stream=False,
                        options={"num_predict": 6, "temperature": 0, "num_ctx": 4096})
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply.done_reason in ("stop", "length") and reply.eval_count is not None and 0 < reply.eval_count <= 6
    parts = list(client.chat(model="group:kitchen:latest", messages=[{"role": "user", "content": "Hi"}],
                             stream=True, options={"num_predict": 6}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts)


def test_ollama_generate(fleet: Fleet) -> None:
    """ollama.generate answers a prompt through the model's template (and raw as plain completion)."""
    client = fleet.ollama()
    reply = client.generate(model="kitchen-2", prompt="Why is the sky blue?", system="Be brief.",
                            options={"num_predict": 6})
    assert reply.done and reply.response
    raw = list(client.generate(model="kitchen-2", prompt="Once upon a time", raw=True, stream=True,
                               options={"num_predict": 6}))
    assert raw[-1].done and "".join(r.response or "" for r in raw)


def test_ollama_list_show_ps_version(fleet: Fleet) -> None:
    """ollama list/ps/show describe the live targets, pull of one succeeds, /api/version answers; an unknown model
    is a 404."""
    client = fleet.ollama()
    names = {m.model for m in client.list().models}
    assert {"kitchen-1", "group:kitchen", "fleet"} <= names
    assert {m.model for m in client.ps().models} == names
    shown = client.show("group:kitchen")
    assert shown.modelinfo is not None and sorted(shown.modelinfo["edge_agent.devices"]) == ["kitchen-1", "kitchen-2"]
    assert shown.details is not None and shown.details.format == "gguf"
    assert client.pull("kitchen-1").status == "success"  # a live target: nothing to download
    with fleet.http() as http:
        assert http.get("/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 404


# -- the command ------------------------------------------------------------------------------------


def test_refuses_to_listen_beyond_loopback_without_token(tmp_path: Path) -> None:
    """Without a token, --host 0.0.0.0 stops before binding with a config error (exit 78) that names the fix."""
    config = _gateway_config(tmp_path / "gw.toml", free_port())
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_GATEWAY__TOKEN"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "agent", "gateway", "--config", str(config), "--host", "0.0.0.0"],  # noqa: S104
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=30)
    assert result.returncode == 78, result.stderr
    assert "token" in result.stderr and "loopback" in result.stderr
    assert time.monotonic() - started < 20
