"""``config-set``: change dotted keys in the TOML config, validated by the same schema, persisted atomically.

The file's own contents are edited (not the effective settings), so defaults and ``EDGE_AGENT_*``
overrides are never written into it. The edited document is validated with the settings model before
anything touches the disk; a bad value is refused with its key path and the file stays as it was.
The file is rewritten from data: comments and layout are not preserved (a round trip through
``tomllib`` is checked before the rename, so the new file always parses to what was validated).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.errors import ConfigError
from agent.settings import Settings, env_overrides, format_validation_error, redacted_dict

UNSET = object()
"""Pass as a value to remove the key from the file (it falls back to its default)."""


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """The outcome of a persisted edit: the new effective settings and which dotted keys changed."""

    settings: Settings
    changed_keys: list[str]
    path: Path


def split_key(key: str) -> list[str]:
    """``"inference.max_queue"`` → ``["inference", "max_queue"]``; empty parts are an error."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"invalid config key {key!r}: use dotted names like 'inference.max_queue'")
    return parts


def read_document(path: Path) -> dict[str, Any]:
    """The file as TOML data; a missing file is an empty document."""
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


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


def validate_document(document: Mapping[str, Any], schema: type[Settings], source: str) -> Settings:
    """Validate like :func:`agent.settings.load_settings` does (``EDGE_AGENT_*`` overrides on top), naming key paths."""
    effective = copy.deepcopy(dict(document))
    _merge(effective, env_overrides(os.environ))
    try:
        return schema(**effective)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


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


def edit_config(
    path: Path, changes: Mapping[str, Any], *, current: Settings, schema: type[Settings] | None = None
) -> ConfigChange:
    """Validate ``changes`` against the schema, then atomically rewrite ``path``; raises ConfigError otherwise."""
    if not changes:
        raise ConfigError("config-set needs at least one key")
    model = schema or type(current)
    # Validate exactly what will be written: TOML has no null, so None-valued keys are dropped first.
    document = _comparable(apply_to_document(read_document(path), changes))
    new = validate_document(document, model, f"config-set for {path}")
    text = render_toml(document)
    if tomllib.loads(text) != document:
        # Defensive: never write a file that would read back differently from what was validated.
        raise ConfigError(f"cannot represent the new configuration as TOML: {sorted(changes)}")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    atomic_write(path, text.encode("utf-8"), mode=mode)
    return ConfigChange(settings=new, changed_keys=changed_keys(current, new), path=path)


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
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


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _comparable(value: Any) -> Any:
    """The document as tomllib would read it back (None dropped, paths as strings, tuples as lists)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
