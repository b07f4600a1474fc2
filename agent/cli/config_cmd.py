"""``edge-agent config check|reset-overrides``: effective settings with each value's source; clear fleet overrides."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agent.config.fleet import PUBKEY_CREDENTIAL
from agent.errors import AgentError, ConfigError
from agent.permissions import denied, is_denied
from agent.settings import (
    DEFAULT_CONFIG_PATH,
    LoadedConfig,
    Settings,
    env_overrides,
    leaf_paths,
    load_config,
    overrides_path_for,
    read_toml,
    redacted_dict,
)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--config PATH`` option every command that reads the config shares."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default {DEFAULT_CONFIG_PATH}; fleet overrides and EDGE_AGENT_* variables win over it)",
    )


def add_parser(subparsers: Any) -> None:
    config = subparsers.add_parser("config", help="inspect the configuration, clear fleet overrides")
    inner = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = inner.add_parser(
        "check",
        help="validate and print the effective config with each value's source (secrets redacted)",
        description="Load every layer (defaults < config file < fleet overrides < EDGE_AGENT_* variables), "
        "validate the result and print each value with the layer it came from.",
    )
    add_config_argument(check)
    check.add_argument("--json", action="store_true", help="print JSON: config, sources and layers")
    check.set_defaults(func=_check)
    reset = inner.add_parser(
        "reset-overrides",
        help="delete the fleet override layer (what fleet config-set wrote); the config file applies again",
        description="Delete <fleet.state_dir>/config-overrides.toml and print what it held. Exits 0 whether "
        "or not there was anything. A running agent keeps the values until it restarts.",
    )
    add_config_argument(reset)
    reset.set_defaults(func=_reset_overrides)


# -- check -------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    loaded = load_config(args.config, required=args.config is not None)
    if args.json:
        print(json.dumps(check_json(loaded), indent=2))
    else:
        print(render_check(loaded))
    return 0


def check_json(loaded: LoadedConfig) -> dict[str, Any]:
    """``config check --json``: the effective config, each leaf key's source, and each layer's state."""
    return {
        "config": redacted_dict(loaded.settings),
        "fleet_commands": fleet_commands(loaded.settings),
        "sources": dict(loaded.sources),
        "layers": [
            {"layer": layer.kind, "where": layer.where, "state": layer.state, "detail": layer.detail,
             "keys": list(layer.keys)}
            for layer in loaded.layers
        ],
    }


def render_check(loaded: LoadedConfig) -> str:
    """TOML-shaped text: a header naming each layer, then every value with its source as a comment."""
    lines = ["# layers, lowest first: default < file < fleet-override < env"]
    for layer in loaded.layers:
        if layer.kind == "env":
            state = f"{len(layer.keys)} set" if layer.keys else "none set"
            lines.append(f"# env:            {layer.where} ({state})")
        elif layer.state == "unreadable":
            note = "NOT READ, values below may differ from the daemon's:"
            lines.append(f"# {layer.kind + ':':<15} {note} {layer.detail}")
        else:
            state = f"{len(layer.keys)} key(s)" if layer.state == "read" else "not present"
            lines.append(f"# {layer.kind + ':':<15} {layer.where} ({state})")
    lines.append(f"# fleet commands: {fleet_commands(loaded.settings)['summary']}")
    rows: list[tuple[str, str]] = []
    _rows(redacted_dict(loaded.settings), (), loaded.sources, rows)
    width = min(max((len(text) for text, _ in rows), default=0), 60)
    return "\n".join(lines + [f"{text:<{width}}  # {source}" if source else text for text, source in rows])


def fleet_commands(settings: Settings) -> dict[str, Any]:
    """How the daemon would treat fleet commands with these settings: ``policy`` and a one-line ``summary``.

    Run outside the service, the ``fleet_pubkey`` credential its unit loads is not visible here, so a
    policy other than ``signed`` says so.
    """
    fleet = settings.fleet
    policy = fleet.command_policy()
    key = fleet.resolved_public_key()
    summary = {
        "signed": f"only signed ones run (fleet public key {key})",
        "unsigned": "UNSIGNED ONES RUN (fleet.allow_unsigned on, no fleet public key): anyone who can "
                    "publish to this device's command topics controls it",
        "refused": "all refused (no fleet public key, fleet.allow_unsigned off)",
    }[policy]
    if policy != "signed" and not os.environ.get("CREDENTIALS_DIRECTORY"):
        summary += f"; the service itself may get a key as the '{PUBKEY_CREDENTIAL}' credential from its unit"
    return {"policy": policy, "public_key": str(key) if key else None, "summary": summary}


def _rows(data: Mapping[str, Any], path: tuple[str, ...], sources: Mapping[str, str],
          rows: list[tuple[str, str]]) -> None:
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
            continue
        label = sources.get(".".join((*path, key)), "default")
        rows.append((f"{key} = {_toml_value(value)}", _short(label)))
    for key, table in tables:
        rows.append(("", ""))
        rows.append((f"[{'.'.join((*path, key))}]", ""))
        _rows(table, (*path, key), sources, rows)


def _short(label: str) -> str:
    """``file:/etc/...`` → ``file`` (the header names the path); env labels keep the variable's name."""
    kind, _, _ = label.partition(":")
    return label if kind == "env" else kind


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    return json.dumps(value)


# -- reset-overrides -----------------------------------------------------------------------------------


def _reset_overrides(args: argparse.Namespace) -> int:
    config_path = args.config or DEFAULT_CONFIG_PATH
    path = overrides_path_for(read_toml(config_path) or {}, env_overrides(os.environ))
    try:
        document = read_toml(path, "fleet override file")
    except ConfigError as exc:
        # A corrupt layer is exactly what this command is for: remove it all the same.
        removed = _remove(path)
        print(f"removed the corrupt fleet override file {path} ({exc})" if removed else f"no file at {path}")
        return 0
    removed = _remove(path)
    keys = list(leaf_paths(document or {}))
    if not removed:
        print(f"no fleet overrides at {path}: nothing to remove")
        return 0
    print(f"removed {len(keys)} fleet override(s) from {path}:")
    for key in keys:
        print(f"  {'.'.join(key)} = {_masked(key, document or {})}")
    print("a running agent keeps them until it restarts (systemctl restart edge-agent)")
    return 0


def _remove(path: Path) -> bool:
    from agent.fleet.config_edit import remove_durably  # noqa: PLC0415 - only this action writes

    try:
        return remove_durably(path)
    except OSError as exc:
        if is_denied(exc):
            raise denied(path, "write", exc) from exc
        raise AgentError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def _masked(key: tuple[str, ...], document: Mapping[str, Any]) -> str:
    value: Any = document
    for part in key:
        value = value[part]
    return "**********" if _is_secret(key) else json.dumps(value)


def _is_secret(key: tuple[str, ...]) -> bool:
    model: Any = Settings
    for part in key:
        info = getattr(model, "model_fields", {}).get(part)
        if info is None:
            return False
        model = info.annotation
    return "SecretStr" in str(model) or model is SecretStr
