"""The gateway's HTTP routes (Starlette): authentication, the OpenAI and Ollama endpoints, streaming, disconnects.

Thin on purpose: bodies are translated by :mod:`agent.gateway.openai_api` / :mod:`agent.gateway.ollama_api`,
targets resolved by :mod:`agent.gateway.targets`, requests carried by :mod:`agent.gateway.mqtt_client`.

A streamed answer's HTTP status is only sent once the device's first reply arrived, so a refusal
(``overloaded``, ``too_large``, ``timeout``, ...) is still an HTTP error with its status; a failure after text
started is reported inside the stream (an ``error`` event or line). When the client disconnects, the request is
cancelled on the device at once (a task watches the connection while the device works).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agent.gateway import ollama_api, openai_api
from agent.gateway.errors import GatewayError, bad_request
from agent.gateway.mqtt_client import ClientGone, Exchange, GatewayClient

log = structlog.get_logger("agent.gateway")

Handler = Callable[[Request], Awaitable[Response]]
ErrorShape = Callable[[GatewayError], dict[str, Any]]


# -- errors, auth ------------------------------------------------------------------------------------


def _shape_for(path: str) -> ErrorShape:
    return openai_api.error_body if path.startswith("/v1/") else ollama_api.error_body


def error_response(error: GatewayError, shape: ErrorShape) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="edge-agent"'
    return JSONResponse(shape(error), status_code=error.status, headers=headers)


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body read (a device refuses far less: inference.max_payload_bytes, 64 KiB by default)."""


async def _json(request: Request) -> Any:
    """The body as JSON, read up to :data:`MAX_BODY_BYTES` (413 beyond, 400 when it is not JSON)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise GatewayError(413, "too_large", f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise GatewayError(413, "too_large", f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the request body is not JSON: {exc}") from exc


# -- streaming ---------------------------------------------------------------------------------------


async def _until_disconnect(receive: Receive, exchange: Exchange) -> None:
    """Wait for the client to go away, then cancel its request on the device (runs beside the work)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not exchange.finished:  # cancel now: the handler may be busy sending, not reading replies
                exchange.owner.cancel(exchange)
            exchange.abort(ClientGone())
            return


@contextlib.asynccontextmanager
async def _watching(receive: Receive, exchange: Exchange) -> AsyncIterator[None]:
    watcher = asyncio.create_task(_until_disconnect(receive, exchange))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


class ExchangeStream(Response):
    """A streamed answer: ``render`` turns each reply into bytes; the exchange is closed (and cancelled on the
    device unless it finished) whatever ends the stream."""

    def __init__(self, exchange: Exchange, first: dict[str, Any],
                 render: Callable[[dict[str, Any] | GatewayError], list[bytes]], media_type: str) -> None:
        # Like StreamingResponse: no body, so no Content-Length (Response.__init__ would declare 0).
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.exchange = exchange
        self.first = first
        self.pieces = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = self.exchange
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with _watching(receive, exchange):
                message: dict[str, Any] | None = self.first
                while message is not None:
                    for piece in self.pieces(message):
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if message.get("done"):
                        break
                    try:
                        message = await exchange.next()
                    except GatewayError as exc:
                        for piece in self.pieces(exc):
                            await send({"type": "http.response.body", "body": piece, "more_body": True})
                        message = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass  # the client left: closing below cancels the work
        finally:
            exchange.close()


async def _first(request: Request, exchange: Exchange) -> dict[str, Any]:
    """The first reply (a chunk or the final), watching the client meanwhile; the exchange is closed on failure."""
    try:
        async with _watching(request.receive, exchange):
            return await exchange.next()
    except BaseException:
        exchange.close()
        raise


async def _final(request: Request, exchange: Exchange) -> dict[str, Any]:
    try:
        async with _watching(request.receive, exchange):
            return await exchange.final()
    finally:
        exchange.close()


def _sse(data: Mapping[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _line(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


# -- the application ---------------------------------------------------------------------------------


class Gateway:
    """The routes over one :class:`GatewayClient`."""

    def __init__(self, client: GatewayClient, token: str | None) -> None:
        self.client = client
        self.token = token

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the bearer token, with every :class:`GatewayError` answered in the API's shape."""

        async def run(request: Request) -> Response:
            shape = _shape_for(request.url.path)
            started = time.monotonic()
            if not _authorized(request, self.token):
                return error_response(GatewayError(401, "unauthorized", "missing or wrong bearer token"), shape)
            try:
                response = await handler(request)
            except GatewayError as exc:
                log.info("gateway_request_failed", path=request.url.path, status=exc.status, code=exc.code,
                         message=exc.message, ms=round((time.monotonic() - started) * 1000, 1))
                return error_response(exc, shape)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except Exception:  # a bug: the client still gets its API's error shape, the log the traceback
                log.exception("gateway_handler_crashed", path=request.url.path)
                return error_response(GatewayError(500, "internal", "internal error in the gateway"), shape)
            return response

        return run

    def _open(self, model: str, payload: dict[str, Any]) -> Exchange:
        target = self.client.directory.resolve(model, self.client.in_flight)
        return self.client.open(target, payload)

    # -- OpenAI -----------------------------------------------------------------------------------

    async def openai_models(self, request: Request) -> Response:
        return JSONResponse(openai_api.model_list(self.client.directory.listing()))

    async def openai_model(self, request: Request) -> Response:
        entry = self.client.directory.entry(request.path_params["model"])
        return JSONResponse(openai_api.model_object(entry))

    async def openai_chat(self, request: Request) -> Response:
        req = openai_api.parse_request(await _json(request))
        request_id = uuid.uuid4().hex
        exchange = self._open(req.model, openai_api.to_wire(req, request_id))
        if not req.stream:
            final = await _final(request, exchange)
            return JSONResponse(openai_api.completion(request_id, req.model, final))
        first = await _first(request, exchange)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        opened = [False]

        def render(message: dict[str, Any] | GatewayError) -> list[bytes]:
            out = []
            if not opened[0]:
                opened[0] = True
                out.append(_sse(openai_api.chunk(request_id, req.model, created, {"role": "assistant", "content": ""})))
            if isinstance(message, GatewayError):
                out.append(_sse(openai_api.error_body(message)))
            elif message.get("done"):
                out.extend(_sse(c) for c in openai_api.final_chunks(request_id, req.model, created, message,
                                                                     include_usage))
                out.append(_sse("[DONE]"))
            elif message.get("delta"):
                out.append(_sse(openai_api.chunk(request_id, req.model, created, {"content": message["delta"]})))
            return out

        return ExchangeStream(exchange, first, render, "text/event-stream")

    # -- Ollama -----------------------------------------------------------------------------------

    async def ollama_tags(self, request: Request) -> Response:
        return JSONResponse(ollama_api.tags(self.client.directory.listing()))

    async def ollama_ps(self, request: Request) -> Response:
        return JSONResponse(ollama_api.running(self.client.directory.listing()))

    async def ollama_show(self, request: Request) -> Response:
        req = ollama_api.parse(ollama_api.ShowRequest, await _json(request))
        return JSONResponse(ollama_api.show(self.client.directory.entry(req.target)))

    async def ollama_pull(self, request: Request) -> Response:
        # Clients (Home Assistant's setup) pull a model they do not see as present. A live target has nothing to
        # download: success at once; anything else is a 404. Devices change models by fleet command, not here.
        req = ollama_api.parse(ollama_api.PullRequest, await _json(request))
        self.client.directory.resolve(req.target)
        if req.stream:
            return Response(_line(ollama_api.pulled()), media_type="application/x-ndjson")
        return JSONResponse(ollama_api.pulled())

    async def ollama_version(self, request: Request) -> Response:
        return JSONResponse(ollama_api.version())

    async def ollama_chat(self, request: Request) -> Response:
        req = ollama_api.parse(ollama_api.ChatRequest, await _json(request))
        return await self._ollama(request, req, chat=True)

    async def ollama_generate(self, request: Request) -> Response:
        req = ollama_api.parse(ollama_api.GenerateRequest, await _json(request))
        return await self._ollama(request, req, chat=False)

    async def _ollama(self, request: Request, req: ollama_api.ChatRequest | ollama_api.GenerateRequest,
                      *, chat: bool) -> Response:
        if ollama_api.is_load_request(req):
            self.client.directory.resolve(req.model)  # 404 for an unknown model, as Ollama
            return JSONResponse(ollama_api.load_reply(req.model, chat))
        request_id = uuid.uuid4().hex
        payload = (ollama_api.chat_to_wire(req, request_id) if isinstance(req, ollama_api.ChatRequest)
                   else ollama_api.generate_to_wire(req, request_id))
        exchange = self._open(req.model, payload)
        final_of = ollama_api.chat_final if chat else ollama_api.generate_final
        chunk_of = ollama_api.chat_chunk if chat else ollama_api.generate_chunk
        if not req.stream:
            final = await _final(request, exchange)
            return JSONResponse(final_of(req.model, final, streamed=False))
        first = await _first(request, exchange)

        def render(message: dict[str, Any] | GatewayError) -> list[bytes]:
            if isinstance(message, GatewayError):
                return [_line(ollama_api.error_body(message))]
            if message.get("done"):
                return [_line(final_of(req.model, message, streamed=True))]
            return [_line(chunk_of(req.model, str(message.get("delta", ""))))] if message.get("delta") else []

        return ExchangeStream(exchange, first, render, "application/x-ndjson")


def build_app(client: GatewayClient, token: str | None) -> Starlette:
    """The ASGI application over a started :class:`GatewayClient` (the caller owns its lifecycle)."""
    gw = Gateway(client, token)

    async def root(request: Request) -> Response:
        # Ollama's liveness check (clients probe it before anything else); says nothing about the fleet.
        return PlainTextResponse("edge-agent gateway is running")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = f"{request.method} {request.url.path} is not supported by the edge-agent gateway (docs/gateway.md)"
        return error_response(GatewayError(status, "not_found" if status == 404 else "not_supported", message),
                              _shape_for(request.url.path))

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/v1/models", gw.guarded(gw.openai_models), methods=["GET"]),
        Route("/v1/models/{model:path}", gw.guarded(gw.openai_model), methods=["GET"]),
        Route("/v1/chat/completions", gw.guarded(gw.openai_chat), methods=["POST"]),
        Route("/api/tags", gw.guarded(gw.ollama_tags), methods=["GET"]),
        Route("/api/ps", gw.guarded(gw.ollama_ps), methods=["GET"]),
        Route("/api/show", gw.guarded(gw.ollama_show), methods=["POST"]),
        Route("/api/version", gw.guarded(gw.ollama_version), methods=["GET"]),
        Route("/api/pull", gw.guarded(gw.ollama_pull), methods=["POST"]),
        Route("/api/chat", gw.guarded(gw.ollama_chat), methods=["POST"]),
        Route("/api/generate", gw.guarded(gw.ollama_generate), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
