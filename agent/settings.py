"""Configuration: typed sections, loaded once from layers, each value traceable to the layer it came from.

Layers, lowest first: defaults < the provisioned file (``/etc/edge-agent/agent.toml``, owned by
provisioning, never written by the service) < fleet overrides (``<fleet.state_dir>/config-overrides.toml``,
written by the fleet ``config-set`` command) < ``EDGE_AGENT_*`` environment variables.
:func:`load_config` returns the settings with every leaf key's source; :func:`load_settings` only the
settings. Nothing reads the environment at import time, so tests build a :class:`Settings` directly
and pass it in. Every field has a description: the same text documents the file
(``docs/configuration.md``) and ``edge-agent config check``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from agent.config.adapt import AdaptSettings
from agent.config.cloud import CloudSettings
from agent.config.fleet import FleetSettings
from agent.config.gateway import GatewaySettings
from agent.config.generation import GenerationSettings
from agent.config.mqtt import MqttSettings
from agent.config.telemetry import TelemetrySettings
from agent.errors import ConfigError, PermissionDeniedError
from agent.permissions import denied, is_denied
from agent.settings_base import RESERVED_DEVICE_IDS, Section, validate_topic_level

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
ENV_PREFIX = "EDGE_AGENT_"

def _default_device_id() -> str:
    """The hostname, made safe to use as one topic level."""
    name = socket.gethostname().split(".")[0] or "edge-agent"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


class ModelSettings(Section):
    path: Path | None = Field(
        None,
        description="Serve this local GGUF file as is (no fit decision, no pull). With 'name' also set, the file is "
        "taken as that catalog model: its sampling defaults apply. Leave empty to choose from the catalog.",
    )
    name: str | None = Field(
        None,
        description="Catalog entry to serve (models.toml), or a Hub repo straight as 'org/repo' (its GGUF files' "
        "quant tags are read from the listing): the agent measures the device, picks the quant that fits, pulls "
        "it from the Hub and loads it. 'NAME:QUANT' pins the quant, like 'quant'.",
    )
    quant: str | None = Field(None, description="Pin a quant of the catalog entry (e.g. Q4_K_M) instead of choosing.")
    catalog: Path | None = Field(None, description="Your own models.toml; default: the catalog shipped with the agent.")
    n_ctx: int = Field(2048, ge=64, le=1_048_576, description="Context window in tokens.")
    threads: int = Field(0, ge=0, le=1024, description="Generation threads; 0 = physical cores.")
    n_batch: int = Field(512, ge=8, le=65536, description="Prompt-processing batch size.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template to use instead of the one in the GGUF file. Without either, "
        "the model only accepts the plain 'prompt' form.",
    )
    seed: int = Field(-1, description="Sampling seed; -1 = random.")

    @model_validator(mode="before")
    @classmethod
    def _quant_in_name(cls, data: Any) -> Any:
        """'org/repo:Q4_K_M' (as llama-server -hf takes it) is name 'org/repo' with quant 'Q4_K_M'."""
        if not (isinstance(data, dict) and isinstance(data.get("name"), str) and ":" in data["name"]):
            return data
        name, _, quant = data["name"].partition(":")
        if not name or not quant:
            raise ValueError("name: give NAME or NAME:QUANT (e.g. 'unsloth/gemma-3-270m-it-GGUF:Q4_K_M')")
        if data.get("quant") not in (None, quant):
            raise ValueError(f"name pins quant {quant!r} but quant is {data['quant']!r}: give one")
        return {**data, "name": name, "quant": quant}

    kv_type: Literal["f16", "q8_0"] = Field(
        "f16",
        description="KV cache element type. q8_0 halves the cache (it needs flash attention, which is then "
        "turned on); measure before choosing it (docs/performance.md).",
    )
    use_mmap: bool | None = Field(
        None,
        description="Map the model file instead of reading it. Unset: mapped unless most of its weights are "
        "repacked for this CPU (then the mapped pages would be paid a second time; docs/fit.md).",
    )


class InferenceSettings(Section):
    """Config ``[inference]``: admission, limits and replies. Every key applies live (fleet ``config-set``),
    except ``parallel`` and ``max_parallel``, which size the loaded context and apply at the next model load."""

    parallel: int | None = Field(
        None, ge=1, le=64,
        description="Requests decoded together on the loaded model (continuous batching; each slot holds "
        "model.n_ctx tokens of KV cache). Unset: the fit decision picks the most slots the memory budget holds, "
        "at most max_parallel. 1 = one request at a time. Applies at the next model load.",
    )
    max_parallel: int = Field(
        4, ge=1, le=64,
        description="The most slots the fit decision picks when 'parallel' is unset. Applies at the next model load.",
    )
    prefill_chunk: int = Field(
        128, ge=8, le=65536,
        description="Most prompt tokens of a waiting request evaluated in one step beside the running ones "
        "(chunked prefill: a long prompt delays the others' next token by one chunk, not by its whole length).",
    )

    max_queue: int = Field(
        8, ge=0, le=10_000,
        description="Requests waiting behind the running one; one more is refused with 'overloaded' "
        "(counted in telemetry limits.queue_full).",
    )
    max_payload_bytes: int = Field(
        65_536, ge=256,
        description="Larger payloads (any topic) are refused with 'too_large' before parsing "
        "(limits.payload_bytes).",
    )
    max_json_elements: int = Field(
        4096, ge=16,
        description="Most JSON elements in a payload (any topic), counted before parsing as commas and opening "
        "brackets outside strings; more is refused with 'too_large' (limits.json_elements). A request with 64 "
        "messages counts about 200.",
    )
    max_messages: int = Field(
        64, ge=1,
        description="Most chat messages in one request; more is refused with 'too_large' right after parsing "
        "(limits.messages).",
    )
    max_stop_sequences: int = Field(
        8, ge=0,
        description="Most stop sequences in one request; more is refused with 'bad_request' (limits.stop).",
    )
    max_stop_chars: int = Field(
        64, ge=1,
        description="Longest stop sequence in characters (the stream holds back that much text while it "
        "matches); longer is refused with 'bad_request' (limits.stop).",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description="Most prompt tokens (after the chat template and tokenizer), checked before the prompt is "
        "evaluated; more is refused with 'too_large' giving both numbers (limits.prompt_tokens). Unset: the "
        "context (model.n_ctx) is the only bound. Set it to cap prompt-evaluation time below what fits.",
    )
    max_tokens_limit: int = Field(
        1024, ge=1,
        description="Upper bound on a request's max_tokens: larger values are clamped, not refused "
        "(limits.max_tokens_clamped).",
    )
    rate_per_client_per_s: float = Field(
        10.0, ge=0,
        description="Requests per second admitted from one caller, a token bucket per reply address (MQTT 5 "
        "Response Topic, else the payload's reply_to: subscribers never see the sender's client id); more is "
        "refused with 'rate_limited' and retry_after_ms (limits.rate_limited). 0 = off. Requests relayed by "
        "edge devices on the cloud's shared topic are not metered (one relay speaks for many callers).",
    )
    rate_burst: int = Field(
        20, ge=1, description="Requests one caller may send at once before rate_per_client_per_s applies."
    )
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none.")
    dedup_window_s: float = Field(
        600.0, ge=0, description="A request id seen again within this window is not served twice."
    )
    stream_interval_ms: float = Field(
        30.0,
        ge=0,
        description="Streamed text arriving faster than this is sent as one chunk (the first piece always "
        "goes at once); 0 = one message per token.",
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long the running generation may take to finish."
    )


class HardwareSettings(Section):
    sys_root: Path = Field(Path("/sys"), description="Root of sysfs (tests point it at fixture trees).")
    proc_root: Path = Field(Path("/proc"), description="Root of procfs (tests point it at fixture trees).")


class HubSettings(Section):
    cache_dir: Path | None = Field(
        None,
        description="Hugging Face cache. Default: HF_HUB_CACHE, HF_HOME/hub, $STATE_DIRECTORY/hf-cache "
        "(systemd), else /var/lib/edge-agent/hf-cache — never $HOME.",
    )
    token: SecretStr | None = Field(
        None,
        description="Hub token for gated models (or an absolute path to a file holding it). Prefer the "
        "systemd credential 'hf_token'; HF_TOKEN also works.",
    )
    endpoint: str | None = Field(None, description="Hub URL; default HF_ENDPOINT, else https://huggingface.co.")
    offline: bool = Field(False, description="Never touch the network; serve only what the cache has (HF_HUB_OFFLINE).")
    min_free_bytes: int = Field(
        256 * 2**20, ge=0, description="Disk space that must remain free after a download."
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of each Hub request.")
    retries: int = Field(5, ge=0, description="Consecutive cut downloads without progress before giving up.")


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="'auto' = JSON lines when stdout is not a TTY (journald), console otherwise."
    )


class Settings(Section):
    """The whole agent configuration (the file's top level)."""

    device_id: str = Field(
        default_factory=_default_device_id,
        description="This device's name: one MQTT topic level. Default: the hostname.",
    )
    role: Literal["edge", "cloud"] = Field(
        "edge",
        description="'edge' serves its own topics; 'cloud' also takes offloaded requests from the cloud infer "
        "topic as an MQTT 5 shared subscription.",
    )
    groups: list[str] = Field(
        default_factory=list, description="Fleet groups this device belongs to; one MQTT topic level each."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)  # type: ignore[arg-type]
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    inference: InferenceSettings = Field(default_factory=InferenceSettings)  # type: ignore[arg-type]
    hardware: HardwareSettings = Field(default_factory=HardwareSettings)  # type: ignore[arg-type]
    hub: HubSettings = Field(default_factory=HubSettings)  # type: ignore[arg-type]
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)  # type: ignore[arg-type]
    generation: GenerationSettings = Field(default_factory=GenerationSettings)  # type: ignore[arg-type]
    adapt: AdaptSettings = Field(default_factory=AdaptSettings)  # type: ignore[arg-type]
    cloud: CloudSettings = Field(default_factory=CloudSettings)  # type: ignore[arg-type]
    fleet: FleetSettings = Field(default_factory=FleetSettings)  # type: ignore[arg-type]
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)  # type: ignore[arg-type]
    log: LogSettings = Field(default_factory=LogSettings)  # type: ignore[arg-type]

    @field_validator("device_id")
    @classmethod
    def _device_id_is_topic_level(cls, value: str) -> str:
        validate_topic_level(value, "device_id")
        if value in RESERVED_DEVICE_IDS:
            raise ValueError(f"device_id {value!r} is reserved for fleet-wide topics")
        return value

    @field_validator("groups")
    @classmethod
    def _groups_are_topic_levels(cls, value: list[str]) -> list[str]:
        for group in value:
            validate_topic_level(group, "each group")
        return value


def format_validation_error(
    exc: ValidationError, source: str, origin: Callable[[tuple[str, ...]], str | None] | None = None
) -> str:
    """Render pydantic errors as one line per key path, the way an operator reads a config file.

    ``origin`` names the layer a key came from; lines for keys set by another layer than ``source``
    (a fleet override, an environment variable) end with ``[that layer]``.
    """
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        detail = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        label = origin(tuple(str(p) for p in err["loc"])) if origin is not None else None
        where = f" [{label}]" if label and label != f"file:{source}" else ""
        lines.append(f"  {path}: {msg}{detail}{where}")
    return "\n".join(lines)


# -- layers ------------------------------------------------------------------------------------------

OVERRIDES_FILE_NAME = "config-overrides.toml"
"""The fleet override layer's file name inside ``[fleet] state_dir`` (written by fleet ``config-set``)."""

LayerState = Literal["read", "missing", "unreadable"]


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One configuration layer as loaded: which file (or the environment) and whether it could be read."""

    kind: Literal["file", "fleet-override", "env"]
    where: str
    state: LayerState
    detail: str | None = None
    """Why an unreadable layer was skipped (one line with the fix)."""
    keys: tuple[str, ...] = ()
    """Dotted keys this layer sets."""


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """Effective settings plus where each value came from (``edge-agent config check`` prints both)."""

    settings: Settings
    config_path: Path
    overrides_path: Path
    layers: tuple[LayerInfo, ...]
    sources: Mapping[str, str]
    """Every leaf key (dotted) → ``default``, ``file:PATH``, ``fleet-override:PATH`` or ``env:VARIABLE``."""
    overrides: Mapping[str, Any]
    """The fleet override document as read (empty when missing or unreadable)."""

    def layer(self, kind: str) -> LayerInfo:
        return next(layer for layer in self.layers if layer.kind == kind)


def read_toml(path: Path, what: str = "config file") -> dict[str, Any] | None:
    """The file as TOML data, or None when it does not exist.

    Raises :class:`ConfigError` for a syntax error and :class:`PermissionDeniedError` (one line with
    the fix) when this user may not read it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if is_denied(exc):
            raise denied(path, "read", exc) from exc
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {what} {path}: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array/table: a damaged file
        raise ConfigError(f"invalid TOML in {what} {path}: nested too deep") from exc


def overrides_path_for(document: Mapping[str, Any], env: Mapping[str, Any]) -> Path:
    """``<fleet.state_dir>/config-overrides.toml``, the state dir taken from the environment, else the file."""
    for layer in (env, document):
        fleet = layer.get("fleet")
        if isinstance(fleet, Mapping) and isinstance(fleet.get("state_dir"), str | Path):
            return Path(fleet["state_dir"]) / OVERRIDES_FILE_NAME
    default = FleetSettings.model_fields["state_dir"].default
    return Path(default) / OVERRIDES_FILE_NAME


def fleet_overrides_path(settings: Settings) -> Path:
    """Where this configuration's fleet override layer lives (``fleet.state_dir`` is never an override)."""
    return settings.fleet.state_dir / OVERRIDES_FILE_NAME


def check_override_document(document: Mapping[str, Any], path: Path) -> None:
    """The override layer may not move itself: ``fleet.state_dir`` belongs in the provisioned file."""
    fleet = document.get("fleet")
    if isinstance(fleet, Mapping) and "state_dir" in fleet:
        raise ConfigError(
            f"fleet.state_dir cannot be a fleet override ({path}): it locates the override layer itself; "
            "set it in the provisioned config file"
        )


def layered_settings(
    file_doc: Mapping[str, Any],
    override_doc: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    config_path: Path,
    overrides_path: Path,
    schema: type[Settings] = Settings,
) -> tuple[Settings, dict[str, str]]:
    """Merge defaults < file < fleet overrides < ``EDGE_AGENT_*``, validate, and name each leaf key's source.

    Raises :class:`ConfigError` with one line per bad key path, marked with its layer when that is
    not the file.
    """
    env_doc, env_names = _env_layer(environ)
    labelled: list[tuple[Mapping[str, Any], Callable[[tuple[str, ...]], str]]] = [
        (file_doc, lambda _: f"file:{config_path}"),
        (override_doc, lambda _: f"fleet-override:{overrides_path}"),
        (env_doc, lambda key: f"env:{_env_name(env_names, key)}"),
    ]

    def origin(key: tuple[str, ...]) -> str | None:
        for doc, label in reversed(labelled):
            found = _set_at(doc, key)
            if found is not None:
                return str(label(found))
        return None

    data: dict[str, Any] = {}
    for doc, _ in labelled:
        _deep_merge(data, copy.deepcopy(dict(doc)))
    try:
        settings = schema(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(config_path), origin)) from exc
    sources = {".".join(key): origin(key) or "default" for key in leaf_keys(schema)}
    return settings, sources


def load_config(
    path: Path | None = None,
    *,
    required: bool = False,
    environ: Mapping[str, str] | None = None,
    strict_overrides: bool = False,
) -> LoadedConfig:
    """Load every layer: defaults < the provisioned file < fleet overrides < ``EDGE_AGENT_*`` variables.

    A missing file is an error only when ``required`` (the operator named it). A missing override
    file is an empty layer. An override file this user may not read (an operator outside the service's
    0700 state directory) is skipped and reported in :attr:`LoadedConfig.layers`, unless
    ``strict_overrides`` (the daemon), where it raises :class:`PermissionDeniedError`. A corrupt
    override file is a :class:`ConfigError` naming it, always.
    """
    env = os.environ if environ is None else environ
    config_path = path or DEFAULT_CONFIG_PATH
    file_doc = read_toml(config_path)
    if file_doc is None and required:
        raise ConfigError(f"config file not found: {config_path}")
    env_doc, _ = _env_layer(env)
    overrides_path = overrides_path_for(file_doc or {}, env_doc)
    override_doc: dict[str, Any] = {}
    override_state: LayerState = "missing"
    detail: str | None = None
    try:
        read = read_toml(overrides_path, "fleet override file")
    except PermissionDeniedError as exc:
        if strict_overrides:
            raise
        override_state, detail = "unreadable", str(exc)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (fix it, or clear the layer: edge-agent config reset-overrides)") from exc
    else:
        if read is not None:
            override_doc, override_state = read, "read"
    check_override_document(override_doc, overrides_path)
    settings, sources = layered_settings(
        file_doc or {}, override_doc, env, config_path=config_path, overrides_path=overrides_path
    )
    layers = (
        LayerInfo("file", str(config_path), "read" if file_doc is not None else "missing", keys=_dotted(file_doc)),
        LayerInfo("fleet-override", str(overrides_path), override_state, detail, keys=_dotted(override_doc)),
        LayerInfo("env", f"{ENV_PREFIX}*", "read" if env_doc else "missing", keys=_dotted(env_doc)),
    )
    return LoadedConfig(settings, config_path, overrides_path, layers, sources, override_doc)


def load_settings(path: Path | None = None, *, required: bool = False) -> Settings:
    """The effective settings of :func:`load_config` (what one-shot commands need).

    Raises :class:`ConfigError` naming each bad key path, :class:`PermissionDeniedError` when the
    config file is not readable by this user.
    """
    return load_config(path, required=required).settings


def leaf_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf field of a settings model as a key path (sections are walked, not reported)."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_keys(ann, (*prefix, name))
        else:
            yield (*prefix, name)


def leaf_paths(document: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Key paths of the values a TOML document sets (tables are walked)."""
    for key, value in document.items():
        if isinstance(value, Mapping):
            yield from leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _dotted(document: Mapping[str, Any] | None) -> tuple[str, ...]:
    return tuple(".".join(key) for key in leaf_paths(document or {}))


def _set_at(document: Mapping[str, Any], key: tuple[str, ...]) -> tuple[str, ...] | None:
    """Where ``document`` sets ``key``: the key itself, a value above it (``groups`` for ``groups.0``), or None."""
    node: Any = document
    for i, part in enumerate(key):
        if not isinstance(node, Mapping):
            return key[:i]
        if part not in node:
            return None
        node = node[part]
    return key


def _env_name(names: Mapping[tuple[str, ...], str], key: tuple[str, ...]) -> str:
    for end in range(len(key), 0, -1):
        if key[:end] in names:
            return names[key[:end]]
    return f"{ENV_PREFIX}{'__'.join(key).upper()}"


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``EDGE_AGENT_<SECTION>__<KEY>=value`` as nested data (values that look like JSON lists/objects are parsed).

    Done by hand rather than with pydantic-settings: that package costs the resident daemon ~7 MB of
    RSS (measured), and this is all of it we need.
    """
    return _env_layer(environ)[0]


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The environment layer's data, and which variable set each key path."""
    out: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        value: Any = raw
        if raw[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
            names[tuple(path)] = name
    return out, names


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def redacted_dict(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data with secrets masked (for printing)."""
    return settings.model_dump(mode="json")  # SecretStr dumps as '**********'
