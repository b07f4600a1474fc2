"""``config-set``: change dotted keys in the fleet override layer, validated by the same schema, persisted atomically.

The service never writes the provisioned file (``/etc/edge-agent/agent.toml`` is read-only under the
unit's ``ProtectSystem=strict`` and belongs to provisioning). A fleet change goes to the override
layer, ``<fleet.state_dir>/config-overrides.toml`` in the service's state, which wins over the file
and loses to ``EDGE_AGENT_*`` variables (see :func:`agent.settings.load_config`). Only the layer's
own contents are edited (never defaults, file values or environment values). The merged result is
validated with the settings model before anything touches the disk; a bad value is refused with its
key path and the layer stays as it was. The layer is rewritten from data (a round trip through
``tomllib`` is checked before the rename, so the new file always parses to what was validated);
removing its last key deletes the file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.errors import AgentError, ConfigError
from agent.permissions import denied, is_denied
from agent.settings import (
    DEFAULT_CONFIG_PATH,
    Settings,
    check_override_document,
    layered_settings,
    read_toml,
    redacted_dict,
)

UNSET = object()
"""Pass as a value to remove the key from the override layer (the file's value or the default applies again)."""


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """The outcome of a persisted edit: the new effective settings, which dotted keys changed, and where it went."""

    settings: Settings
    changed_keys: list[str]
    path: Path
    sources: dict[str, str] = field(default_factory=dict)
    """Every leaf key's source after the edit (see :func:`agent.settings.load_config`)."""
    shadowed: list[str] = field(default_factory=list)
    """Edited keys that an ``EDGE_AGENT_*`` variable still overrides (the edit has no effect until it goes)."""


def split_key(key: str) -> list[str]:
    """``"inference.max_queue"`` → ``["inference", "max_queue"]``; empty parts are an error."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"invalid config key {key!r}: use dotted names like 'inference.max_queue'")
    return parts


def read_document(path: Path, what: str = "config file") -> dict[str, Any]:
    """The file as TOML data; a missing file is an empty document."""
    return read_toml(path, what) or {}


def apply_to_document(document: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with each dotted key set (or removed for :data:`UNSET`); pure."""
    out = copy.deepcopy(dict(document))
    for key, value in changes.items():
        parts = split_key(key)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
            node = child
        if value is UNSET:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return out


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of leaf fields whose values differ between two settings objects."""
    out: list[str] = []
    for name in type(new).model_fields:
        a, b = getattr(old, name, None), getattr(new, name, None)
        path = f"{prefix}{name}"
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            out.extend(changed_keys(a, b, f"{path}."))
        elif a != b:
            out.append(path)
    return out


def edit_overrides(
    overrides_path: Path,
    changes: Mapping[str, Any],
    *,
    current: Settings,
    config_path: Path | None = None,
    schema: type[Settings] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConfigChange:
    """Validate ``changes`` merged over the file, then atomically rewrite the override layer; ConfigError otherwise.

    ``config_path`` is the provisioned file (read, never written; default /etc/edge-agent/agent.toml).
    """
    if not changes:
        raise ConfigError("config-set needs at least one key")
    model = schema or type(current)
    file_path = config_path or DEFAULT_CONFIG_PATH
    env = os.environ if environ is None else environ
    for key in changes:
        _check_sections(split_key(key), model)
        if split_key(key)[:2] == ["fleet", "state_dir"]:
            raise ConfigError(
                "fleet.state_dir cannot be set by config-set: it locates the override layer itself; "
                f"change it in {file_path}"
            )
    old = read_document(overrides_path, "fleet override file")
    check_override_document(old, overrides_path)
    # Validate exactly what will be written: TOML has no null, so None-valued keys are dropped first.
    document = _pruned(_comparable(apply_to_document(old, changes)))
    new, sources = layered_settings(
        read_document(file_path), document, env, config_path=file_path, overrides_path=overrides_path, schema=model
    )
    text = render_toml(document)
    if tomllib.loads(text) != document:
        # Defensive: never write a file that would read back differently from what was validated.
        raise ConfigError(f"cannot represent the new configuration as TOML: {sorted(changes)}")
    try:
        if document:
            atomic_write(overrides_path, text.encode("utf-8"), mode=0o600)
        else:
            remove_durably(overrides_path)
    except OSError as exc:
        if is_denied(exc):
            raise denied(overrides_path, "write", exc) from exc
        raise AgentError(f"cannot write {overrides_path}: {exc.strerror or exc}") from exc
    shadowed = [key for key in changes if sources.get(key, "").startswith("env:")]
    return ConfigChange(settings=new, changed_keys=changed_keys(current, new), path=overrides_path,
                        sources=sources, shadowed=shadowed)


def _check_sections(parts: list[str], model: type[BaseModel]) -> None:
    """Refuse ``device_id.x``: every part but the last must name a section of the schema."""
    current: Any = model
    for i, part in enumerate(parts[:-1]):
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return  # an unknown key: validation names it
        current = info.annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {'.'.join(parts)}")


def get_value(settings: Settings, key: str | None) -> Any:
    """The effective value at a dotted key (secrets masked); the whole config when ``key`` is None."""
    data: Any = redacted_dict(settings)
    if key is None:
        return data
    for part in split_key(key):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"{key}: unknown key")
        data = data[part]
    return data


# -- files -----------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write to a temp file in the same directory, fsync, rename over ``path``, fsync the directory.

    A reader (or a power cut) sees the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Delete ``path`` and fsync its directory; False when there was nothing to delete."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- TOML rendering (the subset a config file uses) -------------------------------------------------


def render_toml(document: Mapping[str, Any]) -> str:
    """Render nested tables of scalars and arrays as TOML; top-level keys first, then one table per section."""
    lines: list[str] = []
    _render_table(document, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _render_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict) and v is not None]
    tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
    if path and (scalars or not tables):
        lines.append("")
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars)
    for name, sub in tables:
        _render_table(sub, [*path, name], lines)


def _key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii():
        return key
    return json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ConfigError("config values must be finite numbers")
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise ConfigError(f"cannot write a {type(value).__name__} value to the config file")


def _pruned(document: dict[str, Any]) -> dict[str, Any]:
    """Drop tables left empty by removed keys (an empty ``[inference]`` says nothing)."""
    out: dict[str, Any] = {}
    for key, value in document.items():
        kept = _pruned(value) if isinstance(value, dict) else value
        if kept != {}:
            out[key] = kept
    return out


def _comparable(value: Any) -> Any:
    """The document as tomllib would read it back (None dropped, paths as strings, tuples as lists)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
