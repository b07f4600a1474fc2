"""Render docs/configuration.md from the settings models (``python -m agent.settings_doc``).

The field descriptions are the single source for the documentation; a test fails when the
committed file is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.settings import Settings

HEADER = """# Configuration

`/etc/edge-agent/agent.toml` (or `--config PATH`). Every key can also be set by an environment variable
`EDGE_AGENT_<SECTION>__<KEY>` (top-level keys: `EDGE_AGENT_<KEY>`), which wins over the file, e.g.
`EDGE_AGENT_MQTT__PORT=1884`. Unknown keys and bad values stop the agent at start with the key's path;
`edge-agent config check [--config PATH]` validates a file and prints the effective configuration with
each value's source and secrets redacted. Secrets are best given as systemd credentials (see docs/deploy.md).

## Layers and sources

Each value comes from the highest of four layers:

| layer (lowest first) | where | written by |
|---|---|---|
| `default` | the tables below | the code |
| `file:PATH` | `/etc/edge-agent/agent.toml` (`root:edge-agent` 0640) | provisioning (never the service) |
| `fleet-override:PATH` | `<fleet.state_dir>/config-overrides.toml` (the service user's, 0600) | fleet `config-set` |
| `env:EDGE_AGENT_...` | the service's environment (unit `Environment=`, drop-ins) | the unit, an operator |

With the default `fleet.state_dir` the override file is `/var/lib/edge-agent/fleet/config-overrides.toml`.
Fleet overrides win over the file and **survive reprovisioning**: a value changed over the fleet stays
changed until it is removed (`config-set` with `value: null`) or the whole layer is cleared with
`edge-agent config reset-overrides --config /etc/edge-agent/agent.toml` (as root or the service user; it
prints what it removed, exits 0 either way, and a running agent keeps the values until it restarts).
`fleet.state_dir` cannot be an override (it locates the layer). `edge-agent config check` names every
value's layer (`--json`: `config`, `sources`, `layers`); run by an operator who cannot read the service's
state directory it says, in its header, that the override layer was not read and why. A corrupt override
file stops the daemon at start (exit 78) with an error naming the file.

This page is generated from the code (`python -m agent.settings_doc`).
"""


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value: Any = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return ""
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = str(value)
    try:
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value}`"


def _type_name(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def render() -> str:
    lines = [HEADER, "## Top level", "", "| key | type | default | description |", "|---|---|---|---|"]
    sections: list[tuple[str, type[BaseModel]]] = []
    for name, info in Settings.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sections.append((name, ann))
            continue
        default = "the hostname" if name == "device_id" else _default(info)
        lines.append(f"| `{name}` | {_type_name(info)} | {default} | {info.description or ''} |")
    for name, model in sections:
        lines += ["", f"## [{name}]", "", "| key | type | default | description |", "|---|---|---|---|"]
        for key, info in model.model_fields.items():
            lines.append(f"| `{key}` | {_type_name(info)} | {_default(info)} | {info.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    default_target = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_target
    target.write_text(render(), encoding="utf-8")
    print(target)
