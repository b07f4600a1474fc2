"""Write the wire JSON Schemas into docs/schemas/ (``python -m agent.transport.schemas [DIR]``).

The schemas are generated from the pydantic models so the documentation cannot drift from the code;
a test fails when the committed files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from agent.transport import telemetry, wire

SCHEMA_MODELS: dict[str, type[BaseModel]] = {**wire.SCHEMA_MODELS, **telemetry.SCHEMA_MODELS}
"""Every wire model whose schema is published: requests, replies and status, then telemetry and events."""


def render_schemas() -> dict[str, str]:
    """File name → schema text, deterministic."""
    return {
        f"{name}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in SCHEMA_MODELS.items()
    }


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "schemas"
    for p in write_schemas(target):
        print(p)
