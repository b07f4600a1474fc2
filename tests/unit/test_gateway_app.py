"""The gateway's HTTP layer in process (Starlette's TestClient) over a directory with no broker behind it: auth,
error shapes, body limits and routes that exist in neither API. Requests that reach a device are covered by
tests/integration/test_gateway.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from agent.gateway.app import MAX_BODY_BYTES, build_app
from agent.gateway.errors import GatewayError
from agent.gateway.targets import Directory

TOKEN = "t0ken"  # noqa: S105 - a test's token
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _NoBroker(SimpleNamespace):
    """Stands in for GatewayClient: a directory with one live device; opening a request is refused 503."""

    def open(self, target: Any, payload: dict[str, Any]) -> Any:
        raise GatewayError(503, "unavailable", "the gateway has no broker connection; try again shortly", 5)


@pytest.fixture
def http() -> Iterator[TestClient]:
    directory = Directory("edge")
    directory.observe("edge/pi-1/status", json.dumps({"state": "online", "device_id": "pi-1"}).encode())
    app = build_app(_NoBroker(directory=directory, in_flight={}), TOKEN)  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client


def test_root_is_open(http: TestClient) -> None:
    """GET / answers without a token (Ollama clients' liveness probe) and says nothing about the fleet."""
    assert http.get("/").text == "edge-agent gateway is running"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}])
def test_token_required(http: TestClient, headers: dict[str, str]) -> None:
    """Without the right bearer token: 401 with WWW-Authenticate, in each API's error shape."""
    openai = http.get("/v1/models", headers=headers)
    assert openai.status_code == 401 and openai.headers["www-authenticate"].startswith("Bearer")
    assert openai.json()["error"]["type"] == "authentication_error"
    ollama = http.get("/api/tags", headers=headers)
    assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)


def test_lists_with_token(http: TestClient) -> None:
    """With the token the model lists answer from the directory."""
    assert [m["id"] for m in http.get("/v1/models", headers=AUTH).json()["data"]] == ["pi-1", "fleet"]
    assert [m["name"] for m in http.get("/api/tags", headers=AUTH).json()["models"]] == ["pi-1", "fleet"]
    assert http.get("/v1/models/nope", headers=AUTH).status_code == 404


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/chat/completions", b"not json", 400),
    ("/api/chat", b"[1, 2]", 400),
    ("/api/chat", b'{"model": "pi-1", "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}', 400),
    ("/api/generate", b'{"model": "ghost", "prompt": "hi"}', 404),
    ("/api/chat", b'{"model": "ghost"}', 404),
])
def test_bad_requests(http: TestClient, path: str, body: bytes, status: int) -> None:
    """Bodies that are not JSON objects, refused fields and unknown models fail before any MQTT."""
    assert http.post(path, content=body, headers=AUTH).status_code == status


def test_load_request_answers_at_once(http: TestClient) -> None:
    """Ollama's load call (no messages) for a live model is answered done/load without asking the device."""
    reply = http.post("/api/chat", json={"model": "pi-1:latest"}, headers=AUTH).json()
    assert reply["done"] is True and reply["done_reason"] == "load"


def test_body_limit(http: TestClient) -> None:
    """A body over the limit is refused 413 before it is parsed."""
    big = b'{"model": "pi-1", "prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert http.post("/api/generate", content=big, headers=AUTH).status_code == 413


def test_no_broker_is_503_with_retry_after(http: TestClient) -> None:
    """A request the gateway cannot send keeps the client's API shape and says when to retry."""
    reply = http.post("/v1/chat/completions", headers=AUTH,
                      json={"model": "pi-1", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
    assert reply.json()["error"]["code"] == "unavailable"


def test_pull_of_a_live_target_succeeds(http: TestClient) -> None:
    """Pulling a live target (Home Assistant's setup does) succeeds at once; pulling anything else is a 404."""
    assert http.post("/api/pull", json={"model": "pi-1:latest", "stream": False}, headers=AUTH).json() == {
        "status": "success"}
    streamed = http.post("/api/pull", json={"name": "pi-1"}, headers=AUTH)
    assert [json.loads(line) for line in streamed.text.splitlines()] == [{"status": "success"}]
    assert http.post("/api/pull", json={"model": "llama3"}, headers=AUTH).status_code == 404


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/push"), ("POST", "/v1/completions"),
                                              ("GET", "/v1/chat/completions")])
def test_unsupported_routes(http: TestClient, method: str, path: str) -> None:
    """Endpoints the gateway does not provide answer 404/405 in the API's error shape, naming docs/gateway.md."""
    reply = http.request(method, path, headers=AUTH)
    assert reply.status_code in (404, 405)
    body = reply.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert "gateway.md" in message
