"""The model catalog (``models.toml``): which Hub repos and quant files the agent may choose from.

Format (the core keys ``repo``, ``revision``, ``n_ctx`` and ``files`` are what other tools rely on)::

    [models.gemma-3-270m-it]
    repo = "unsloth/gemma-3-270m-it-GGUF"   # Hub repo id
    revision = "main"                        # optional pin (branch, tag or commit)
    n_ctx = 2048                             # optional default context
    files = { Q8_0 = "gemma-3-270m-it-Q8_0.gguf" }  # optional; else discovered from the repo listing
    license = "gemma"                        # optional note shown by `plan`
    description = "..."                      # optional
    kind = "chat"                            # "chat" (instruct, has a template) or "base"

Validation errors name the key path (``models.gemma-3-270m-it.files.Q9_9``) like the config loader does.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.catalog.quants import is_weights_file, normalize_tag, parse_quant_tag, quality_rank, split_part
from agent.config.generation import GenerationDefaults
from agent.errors import ConfigError
from agent.settings import format_validation_error


#: The catalog shipped with the agent (top of the source tree).
def _default_catalog_path() -> Path:
    """The source tree's models.toml, else the copy a wheel installs under ``<prefix>/share/edge-agent``."""
    in_tree = Path(__file__).resolve().parents[2] / "models.toml"
    if in_tree.is_file():
        return in_tree
    return Path(sys.prefix) / "share" / "edge-agent" / "models.toml"


DEFAULT_CATALOG_PATH = _default_catalog_path()

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class CatalogEntry(BaseModel):
    """One model: a Hub repo and the quantized files it offers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str = Field(description="Hub repo id, 'owner/name'.")
    revision: str = Field(default="main", description="Branch, tag or commit to download from.")
    n_ctx: int | None = Field(default=None, ge=64, le=1_048_576, description="Default context for this model.")
    files: dict[str, str] | None = Field(
        default=None,
        description="Quant tag -> file name in the repo. Without it the quants are discovered by listing "
        "the repo and reading the quant tag from each file name.",
    )
    license: str | None = Field(default=None, description="Licence note (e.g. 'apache-2.0', 'gemma').")
    description: str | None = Field(default=None, description="One line for humans.")
    kind: Literal["chat", "base"] = Field(default="chat", description="'chat' = instruction-tuned with a template.")
    defaults: GenerationDefaults | None = Field(
        default=None,
        description="Sampling defaults and a default system prompt for this model (over [generation]; a "
        "request's own values win).",
    )

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO_RE.match(value):
            raise ValueError("must be a Hub repo id like 'owner/name'")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one quant (or be left out to discover them)")
        canonical: dict[str, str] = {}
        for tag, filename in value.items():
            norm = normalize_tag(tag)
            if norm is None:
                raise ValueError(f"unknown quant tag {tag!r} (see agent/catalog/quants.py for the ladder)")
            if not filename.endswith(".gguf"):
                raise ValueError(f"{tag}: file {filename!r} is not a .gguf file")
            if norm in canonical:
                raise ValueError(f"quant {norm} is listed twice")
            canonical[norm] = filename
        return canonical

    def quant_files(self) -> dict[str, str]:
        """The explicitly listed files, best quality first (empty when discovery is needed)."""
        files = self.files or {}
        return dict(sorted(files.items(), key=lambda kv: quality_rank(kv[0]) or 0))


class Catalog(BaseModel):
    """All entries of a ``models.toml``, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, CatalogEntry] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, CatalogEntry]) -> dict[str, CatalogEntry]:
        for name in value:
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"model name {name!r} must be letters, digits, '.', '_' or '-' (it is used as MODEL[:QUANT])"
                )
        return value

    def get(self, name: str) -> CatalogEntry:
        """The entry called ``name``; :class:`ConfigError` listing the known names otherwise."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "(none)"
            raise ConfigError(f"model {name!r} is not in the catalog; known models: {known}") from None


def parse_catalog(text: str, source: str = "models.toml") -> Catalog:
    """Parse and validate catalog TOML; :class:`ConfigError` names each bad key path."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {source}: {exc}") from exc
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, source)
        if _has_unquoted_dotted_name(data):
            message += '\n  hint: quote model names that contain a dot: [models."qwen2.5-0.5b-instruct"]'
        raise ConfigError(message) from exc


def _has_unquoted_dotted_name(data: dict[str, object]) -> bool:
    """TOML splits ``[models.qwen2.5-0.5b]`` at the dots: an entry without ``repo`` holding only tables."""
    models = data.get("models")
    if not isinstance(models, dict):
        return False
    return any(
        isinstance(v, dict) and "repo" not in v and v and all(isinstance(x, dict) for x in v.values())
        for v in models.values()
    )


def load_catalog(path: Path | None = None) -> Catalog:
    """Read ``path`` (default: the catalog shipped with the agent) and validate it."""
    catalog_path = path or DEFAULT_CATALOG_PATH
    try:
        text = catalog_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"catalog file not found: {catalog_path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read catalog {catalog_path}: {exc.strerror}") from exc
    return parse_catalog(text, str(catalog_path))


def hub_entry(repo: str) -> CatalogEntry:
    """A Hub repo named straight (``org/repo``, as ``llama-server -hf`` takes it) as a catalog entry: no pinned
    files (the quants are read from the repo listing), the main branch, the agent-wide sampling defaults."""
    return CatalogEntry(repo=repo, description=f"{repo} from the Hub (not in the catalog)")


def discover_quant_files(filenames: list[str]) -> dict[str, str]:
    """Quant tag -> file for a repo listing (what an entry without ``files`` uses).

    Only model weights count (not ``mmproj``/``imatrix``); a split model is listed by its first part
    (llama.cpp finds the rest); names without a known quant tag are skipped. When two files carry the
    same tag (e.g. in different folders), the shorter path wins, so the choice is stable.
    """
    found: dict[str, str] = {}
    for name in sorted(filenames, key=lambda n: (len(n), n)):
        if not is_weights_file(name):
            continue
        part = split_part(name)
        if part is not None and part[0] != 1:
            continue
        tag = parse_quant_tag(name)
        if tag is not None and tag not in found:
            found[tag] = name
    return dict(sorted(found.items(), key=lambda kv: quality_rank(kv[0]) or 0))
