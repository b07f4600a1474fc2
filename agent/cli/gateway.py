"""``edge-agent gateway``: serve the OpenAI and Ollama HTTP APIs in front of the fleet (docs/gateway.md).

Operator side, like ``fleet``: it needs the config's ``[mqtt]`` (the broker) and ``[gateway]`` (token, address),
and the optional ``gateway`` extra (starlette, uvicorn), imported only when this command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import structlog

from agent.cli.config_cmd import add_config_argument
from agent.errors import ConfigError, TransportError
from agent.logs import configure_logging
from agent.settings import Settings, load_settings
from agent.transport.tls import is_loopback

log = structlog.get_logger("agent.gateway")


def add_parser(subparsers: Any) -> None:
    gateway = subparsers.add_parser(
        "gateway", help="serve the OpenAI and Ollama HTTP APIs, answered by devices over MQTT"
    )
    add_config_argument(gateway)
    gateway.add_argument("--host", help="address to listen on (default [gateway] host, 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="TCP port (default [gateway] port, 11434; 0 = any free port)")
    gateway.set_defaults(func=_gateway)


def check_bind(host: str, token: object) -> None:
    """Refuse to listen beyond this machine without a token: anyone who can reach the port could use the fleet."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"the gateway would listen on {host} without authentication: set [gateway] token (or "
            "EDGE_AGENT_GATEWAY__TOKEN), or listen on a loopback address (127.0.0.1)"
        )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; :class:`TransportError` saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _gateway(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, required=args.config is not None)
    host = args.host or settings.gateway.host
    port = settings.gateway.port if args.port is None else args.port
    check_bind(host, settings.gateway.token)
    try:
        import uvicorn  # noqa: PLC0415 - the optional 'gateway' extra, loaded only by this command

        from agent.gateway.app import build_app  # noqa: PLC0415
        from agent.gateway.mqtt_client import GatewayClient  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(f"edge-agent gateway needs the 'gateway' extra ({exc.name} is missing): "
                          "pip install 'edge-agent[gateway]'") from exc
    configure_logging(settings.log.level, settings.log.format)
    sock = listen(host, port)
    return asyncio.run(_serve(settings, sock, uvicorn, build_app, GatewayClient))


async def _serve(settings: Settings, sock: socket.socket, uvicorn: Any, build_app: Any, client_type: Any) -> int:
    client = client_type(settings)
    await client.start()
    token = settings.gateway.token.get_secret_value() if settings.gateway.token is not None else None
    app = build_app(client, token)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    bound = sock.getsockname()
    log.info("gateway_listening", host=bound[0], port=bound[1], auth=token is not None,
             broker=f"{settings.mqtt.host}:{settings.mqtt.port}", client_id=client.client_id)
    try:
        await server.serve(sockets=[sock])
    finally:
        client.stop()
        sock.close()
    return 0
