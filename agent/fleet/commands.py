"""Fleet commands on the device: wire models, target topics, idempotency and the dispatcher.

A command arrives on one of three topics (device, group, all). :class:`FleetService` authenticates
it (Ed25519 with the fleet public key; a device without a key refuses every command unless
``[fleet] allow_unsigned``), answers a redelivered id from the persisted result store instead of
running it again, refuses expired ones, validates the arguments, runs it (slow ones on one worker
thread, in order) and publishes one result to the caller's reply topic and to
``{prefix}/{device_id}/cmd/result``. Whatever happens to one command, the device carries on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config.fleet import CommandPolicy, FleetSettings
from agent.errors import AgentError, BadRequestError, ConfigError
from agent.fleet.config_edit import UNSET, atomic_write, edit_overrides, get_value, read_document
from agent.fleet.signing import (
    BadSignatureError,
    NoFleetKeyError,
    ReplayedCommandError,
    SignatureError,
    check_fresh,
    load_public_key,
    sign_payload,
    verify_payload,
)
from agent.settings import DEFAULT_CONFIG_PATH, OVERRIDES_FILE_NAME, Settings, layered_settings
from agent.settings_base import validate_topic_level
from agent.transport.limits import check_payload, check_unicode, top_level_strings
from agent.transport.mqtt import Incoming, Publish
from agent.transport.topics import is_concrete_topic

if TYPE_CHECKING:  # cryptography loads only when a fleet key is configured (~7 MB RSS)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = structlog.get_logger("agent.fleet")

PROTOCOL_VERSION: Literal[1] = 1
RESULT_LEVEL = "result"
RESERVED_DEVICE_IDS = frozenset({"group", "fleet"})
"""Device ids that would make a device's topics collide with the group and fleet-wide ones."""


class ExpiredCommandError(AgentError):
    """The command's ``expires_at`` has passed; it was not run."""

    code = "expired"


class UnknownCommandError(BadRequestError):
    """No command of that name exists on this device."""

    code = "unknown_command"


# -- wire ------------------------------------------------------------------------------------------

class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandRequest(_Wire):
    """The payload published to a command topic."""

    v: Literal[1] = Field(PROTOCOL_VERSION, description="Protocol version.")
    id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$",
                    description="Command id: executed at most once per device; a redelivery gets the stored result.")
    args: dict[str, Any] = Field(default_factory=dict, description="Command arguments.")
    issued_at: float | None = Field(None, description="Unix time the operator issued it (required when signed).")
    expires_at: float | None = Field(None, description="Unix time after which devices refuse it with 'expired'.")
    nonce: str | None = Field(None, min_length=8, max_length=128, description="Random, unique per command (signed).")
    cmd: str | None = Field(None, description="Command name; must match the topic (required when signed).")
    target: str | None = Field(
        None, description="'all', 'group:NAME' or 'device:ID'; must match the topic (required when signed)."
    )
    reply_to: str | None = Field(None, min_length=1, description="Reply topic for MQTT 3.1.1 clients.")
    sig: str | None = Field(None, description="Base64 Ed25519 signature over the canonical payload.")


class CommandError(_Wire):
    code: str = Field(description="Stable machine code (expired, unsigned, bad_request, ...).")
    message: str = Field(description="What went wrong, for the operator.")


class CommandResult(_Wire):
    """Published to the Response Topic / ``reply_to`` and to ``{prefix}/{device_id}/cmd/result``."""

    v: Literal[1] = PROTOCOL_VERSION
    id: str | None
    device_id: str
    cmd: str
    ok: bool
    result: dict[str, Any] | None = None
    error: CommandError | None = None
    duplicate: bool = Field(False, description="True when this is the stored result of an id already executed.")

    def payload(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False).encode()


class NoArgs(_Wire):
    pass


class PlanArgs(_Wire):
    model: str | None = Field(None, min_length=1, description="Catalog name to plan for (default: configured).")
    quant: str | None = Field(None, min_length=1, description="Pinned quant to plan for.")


class ModelArgs(_Wire):
    model: str = Field(min_length=1, description="Catalog name, or 'auto' to let the fit decision choose.")
    quant: str | None = Field(None, min_length=1, description="Pin a quant (default: best that fits).")


class ConfigGetArgs(_Wire):
    key: str | None = Field(None, description="Dotted key, e.g. 'inference.max_queue'; whole config when absent.")


class ConfigSetArgs(_Wire):
    key: str | None = Field(None, description="Dotted key to set.")
    value: Any = Field(
        None, description="New value (JSON-typed); null removes the key from the fleet override layer."
    )
    values: dict[str, Any] | None = Field(None, description="Several dotted keys at once.")

    @model_validator(mode="after")
    def _one_form(self) -> ConfigSetArgs:
        if (self.key is None) == (self.values is None):
            raise ValueError("give either 'key' and 'value', or 'values'")
        if self.key is not None and "value" not in self.model_fields_set:
            raise ValueError("'value' is required with 'key' (null removes the key)")
        return self

    def changes(self) -> dict[str, Any]:
        items = self.values.items() if self.values is not None else [(self.key, self.value)]
        return {str(k): (UNSET if v is None else v) for k, v in items}


# -- targets ---------------------------------------------------------------------------------------

Scope = Literal["device", "group", "all"]


@dataclass(frozen=True, slots=True)
class CommandTarget:
    """Who a command was addressed to, and which command."""

    scope: Scope
    name: str
    group: str | None = None
    device: str | None = None

    @property
    def label(self) -> str:
        """The form a signed payload's ``target`` field must carry: 'all', 'group:NAME', 'device:ID'."""
        if self.scope == "all":
            return "all"
        return f"group:{self.group}" if self.scope == "group" else f"device:{self.device}"


def parse_target(spec: str) -> tuple[Scope, str | None]:
    """Operator notation → (scope, value): 'all', 'group:NAME', 'device:ID' or a bare device id."""
    if spec == "all":
        return "all", None
    kind, sep, value = spec.partition(":")
    if sep and kind in ("group", "device"):
        validate_topic_level(value, f"{kind} name")
        return ("group" if kind == "group" else "device"), value
    validate_topic_level(spec, "device id")
    return "device", spec


def target_label(scope: Scope, value: str | None) -> str:
    return CommandTarget(scope, "", group=value if scope == "group" else None,
                         device=value if scope == "device" else None).label


def command_topic(prefix: str, scope: Scope, value: str | None, name: str) -> str:
    """The topic an operator publishes command ``name`` to."""
    validate_topic_level(name, "command name")
    if scope == "all":
        return f"{prefix}/fleet/cmd/{name}"
    if scope == "group":
        return f"{prefix}/group/{value}/cmd/{name}"
    return f"{prefix}/{value}/cmd/{name}"


def result_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/cmd/{RESULT_LEVEL}"


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """The command topics one device listens to, and the pure matching of an arrived topic."""

    prefix: str
    device_id: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_topic_level(self.device_id, "device_id")
        if self.device_id in RESERVED_DEVICE_IDS:
            raise ConfigError(f"device_id {self.device_id!r} collides with fleet topics; choose another name")
        for group in self.groups:
            try:
                validate_topic_level(group, "group name")
            except ValueError as exc:
                raise ConfigError(f"groups: {exc}") from exc

    @property
    def result(self) -> str:
        return result_topic(self.prefix, self.device_id)

    def filters(self) -> list[str]:
        return [
            f"{self.prefix}/{self.device_id}/cmd/+",
            *(f"{self.prefix}/group/{g}/cmd/+" for g in self.groups),
            f"{self.prefix}/fleet/cmd/+",
        ]

    def match(self, topic: str) -> CommandTarget | None:
        """The target if ``topic`` is a command for this device, else None (including our own results)."""
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head):].split("/")
        if len(levels) == 3 and levels[0] == self.device_id and levels[1] == "cmd":
            target = CommandTarget("device", levels[2], device=self.device_id)
        elif len(levels) == 4 and levels[0] == "group" and levels[1] in self.groups and levels[2] == "cmd":
            target = CommandTarget("group", levels[3], group=levels[1])
        elif len(levels) == 3 and levels[0] == "fleet" and levels[1] == "cmd":
            target = CommandTarget("all", levels[2])
        else:
            return None
        if not target.name or target.name == RESULT_LEVEL:
            return None
        return target


# -- persisted, bounded stores ----------------------------------------------------------------------


class JsonLru:
    """A bounded, insertion-ordered map persisted as an append-only JSON-lines journal.

    Each put appends one fsynced line (O(1), no matter how many entries are kept); the journal is
    compacted by an atomic rewrite once it holds twice ``max_entries`` lines. A torn line (power cut
    mid-append) or an unreadable file is skipped and logged, never fatal: losing entries only weakens
    deduplication.

    Persisting is best effort: when the disk refuses a write (full, read-only, I/O error) the entry is
    still kept in memory and the put succeeds, so a device whose disk filled up still runs the commands
    that could repair it. One ``fleet_state_write_failed`` warning is logged per episode (not per put);
    the first write that works again also appends the entries the episode could not save and logs
    ``fleet_state_write_recovered``. A write cut short is truncated off again, so the journal holds
    whole lines only.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self._path = path
        self._max = max_entries
        self._lock = threading.Lock()
        self._data: OrderedDict[str, Any] = OrderedDict()
        self._lines = 0
        # A write failure episode: whether one is on, and the keys put since that are not on disk yet.
        self._failing = False
        self._unsaved: set[str] = set()
        self._load()

    def _load(self) -> None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("fleet_state_unreadable", path=str(self._path), error=str(exc))
            return
        skipped = 0
        # Split the bytes, not decoded text: a line torn inside a multi-byte character must cost that
        # line only, and str.splitlines() would also split at U+2028 inside a (non-ASCII) JSON string.
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                key, value = json.loads(line)
            except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
                skipped += 1
                continue
            self._data.pop(str(key), None)
            self._data[str(key)] = value
            self._lines += 1
        if skipped:
            log.warning("fleet_state_lines_skipped", path=str(self._path), skipped=skipped)
        self._trim()

    def get(self, key: str) -> Any:
        with self._lock:
            return self._data.get(key)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def put(self, key: str, value: Any) -> None:
        """Keep ``key`` (newest) and persist it, best effort: a refused write is logged, not raised."""
        with self._lock:
            self._put(key, value)

    def put_new(self, key: str, value: Any) -> bool:
        """Keep ``key`` like :meth:`put` unless it is already kept; False then (check and put are atomic)."""
        with self._lock:
            if key in self._data:
                return False
            self._put(key, value)
            return True

    def _put(self, key: str, value: Any) -> None:
        self._data.pop(key, None)
        self._data[key] = value
        self._trim()
        # After a failed write, the entries the disk refused go out with the next one that works.
        keys = [k for k in self._data if k in self._unsaved or k == key] if self._unsaved else [key]
        try:
            if self._lines + len(keys) > 2 * self._max:
                self._compact()
            else:
                self._append(keys)
        except OSError as exc:
            self._write_failed(key, exc)
            return
        if self._failing:
            log.info("fleet_state_write_recovered", path=str(self._path), saved_late=len(keys) - 1)
            self._failing = False
            self._unsaved.clear()

    def _trim(self) -> None:
        while len(self._data) > self._max:
            key, _ = self._data.popitem(last=False)
            self._unsaved.discard(key)

    def _write_failed(self, key: str, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            # Once per episode: a full disk stays full, and every command would log it again.
            log.warning(
                "fleet_state_write_failed",
                path=str(self._path),
                error=exc.strerror or str(exc),
                errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                effect="commands still run; what they record is kept in memory only, so a restart before "
                "the disk accepts writes again forgets it (free space where fleet.state_dir is)",
            )
        self._unsaved.add(key)

    @staticmethod
    def _line(key: str, value: Any) -> bytes:
        return (json.dumps([key, value], separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    def _append(self, keys: list[str]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered, so a failed write leaves no pending bytes that a later close would still try to write.
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            # A torn last line (a crash, or a cut that could not be undone) stays a separate, skipped line.
            torn = start > 0 and os.pread(fd, 1, start - 1) != b"\n"
            data = memoryview(b"\n" * torn + b"".join(self._line(k, self._data[k]) for k in keys))
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:
                # Cut a half-written line back off (truncating never needs space): the next start reads
                # whole lines only, and the next append does not begin in the middle of one.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self._lines += len(keys)

    def _compact(self) -> None:
        atomic_write(self._path, b"".join(self._line(k, v) for k, v in self._data.items()))
        self._lines = len(self._data)


class NonceCache:
    """Nonces of accepted signed commands: the newest ``max_entries``, however the wall clock moves.

    Entries are forgotten by count only, oldest accepted first, never by comparing their ``issued_at``
    with the clock. Pruning by the clock is unsafe on a device whose clock steps: a command accepted
    while the clock is 1 h ahead would prune every nonce issued before it, and once the clock steps
    back, a command captured before the jump is inside the window again with an unknown nonce, so a
    replay would run (once its id has left the result store). No clock rule can tell that a nonce will
    never be inside the window again, because the clock may step anywhere; a count can. ``issued_at`` is
    still stored (journal format unchanged) for whoever reads the file.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self._store = JsonLru(path, max_entries)

    def seen(self, nonce: str) -> bool:
        return nonce in self._store

    def use(self, nonce: str, issued_at: float) -> bool:
        """Record ``nonce`` as used; False if it already was (a replay). Check and record are atomic.

        Recorded in memory before this returns, whether or not the disk accepted it, so the command may
        run and a replay arriving meanwhile is refused.
        """
        return self._store.put_new(nonce, issued_at)


# -- what commands need from the daemon --------------------------------------------------------------


class DeviceControl(Protocol):
    """The daemon's side of fleet commands. Methods return JSON-able dicts and raise AgentError subclasses.

    ``plan``, ``set_model``, ``pull``, ``reload`` and ``apply_settings`` are called on the fleet worker
    thread (they may take long); the others on the thread that calls :meth:`FleetService.handle`.
    ``restart`` must only schedule a clean exit: the result is published after it returns.
    """

    def status(self) -> dict[str, Any]: ...
    def plan(self, args: dict[str, Any]) -> dict[str, Any]: ...
    def set_model(self, name: str, quant: str | None) -> dict[str, Any]: ...
    def pull(self, name: str, quant: str | None) -> dict[str, Any]: ...
    def reload(self) -> dict[str, Any]: ...
    def drain(self) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...
    def restart(self) -> dict[str, Any]: ...
    def apply_settings(self, new: Settings, changed_keys: list[str]) -> dict[str, Any]:
        """Apply what can be applied live; return ``{"applied": [...], "restart_required": [...]}``."""
        ...


# -- the dispatcher --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    topic: str
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Command:
    args: type[BaseModel]
    slow: bool
    run: Callable[[Any], dict[str, Any]]


@dataclass
class _Job:
    request: CommandRequest
    target: CommandTarget
    args: BaseModel
    message: Incoming
    started: float
    replies: list[_Reply] = field(default_factory=list)
    acked: bool = False


_STOP = object()


class FleetService:
    """Receives fleet commands for one device, runs each id once, and publishes its result."""

    def __init__(
        self,
        settings: Settings,
        control: DeviceControl,
        publish: Publish,
        config_path: Path | None,
        state_dir: Path,
        *,
        ack: Callable[[Incoming], None] | None = None,
        clock: Callable[[], float] = time.time,
        overrides_path: Path | None = None,
    ) -> None:
        """``config_path`` is the provisioned file (read only; default /etc/edge-agent/agent.toml);
        ``config-set`` persists into ``overrides_path`` (default ``state_dir/config-overrides.toml``)."""
        fleet: FleetSettings = settings.fleet
        self._settings = settings
        self._fleet = fleet
        self._control = control
        self._publish = publish
        self._ack = ack
        self._config_path = config_path or DEFAULT_CONFIG_PATH
        self._overrides_path = overrides_path or state_dir / OVERRIDES_FILE_NAME
        self._sources: dict[str, str] | None = None
        self._clock = clock
        self.topics = FleetTopics(settings.mqtt.topic_prefix, settings.device_id,
                                  tuple(settings.groups))
        key_path = fleet.resolved_public_key()
        self._public_key: Ed25519PublicKey | None = load_public_key(key_path) if key_path else None
        self._policy: CommandPolicy = fleet.command_policy()
        # Unauthenticated senders get answers only on our own result topic (never one they chose)
        # unless unsigned commands are allowed anyway.
        self._require_signature = self._policy != "unsigned"
        _log_policy(self._policy, key_path, fleet)
        self._results = JsonLru(state_dir / "results.jsonl", fleet.result_cache_size)
        self._nonces = NonceCache(state_dir / "nonces.jsonl", fleet.nonce_cache_size)
        self._pending: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        # The command being handled on the arrival thread, and whether it was acknowledged yet.
        self._arriving: Incoming | None = None
        self._arriving_acked = False
        self._worker: threading.Thread | None = None
        self._commands: dict[str, _Command] = {
            "ping": _Command(NoArgs, False, self._ping),
            "status": _Command(NoArgs, False, self._status),
            "plan": _Command(PlanArgs, True, lambda a: control.plan(a.model_dump(exclude_none=True))),
            "set-model": _Command(ModelArgs, True, lambda a: control.set_model(a.model, a.quant)),
            "pull": _Command(ModelArgs, True, lambda a: control.pull(a.model, a.quant)),
            "reload": _Command(NoArgs, True, lambda a: control.reload()),
            "config-get": _Command(ConfigGetArgs, False, self._config_get),
            "config-set": _Command(ConfigSetArgs, True, self._config_set),
            "drain": _Command(NoArgs, False, lambda a: control.drain()),
            "resume": _Command(NoArgs, False, lambda a: control.resume()),
            "restart": _Command(NoArgs, False, lambda a: control.restart()),
        }

    @property
    def command_names(self) -> list[str]:
        return sorted(self._commands)

    @property
    def signature_required(self) -> bool:
        """True unless unsigned commands are run (``allow_unsigned`` on a device without a key)."""
        return self._require_signature

    @property
    def policy(self) -> CommandPolicy:
        """``signed``, ``unsigned`` (allow_unsigned, no key) or ``refused`` (no key): see FleetSettings."""
        return self._policy

    def subscriptions(self) -> list[tuple[str, int]]:
        """Topic filters to subscribe (QoS 1): this device's, each of its groups', and the fleet-wide one."""
        return [(f, 1) for f in self.topics.filters()]

    def close(self, timeout: float = 10.0) -> None:
        """Let the worker finish the running slow command (bounded), then stop it."""
        if self._worker is not None:
            self._jobs.put(_STOP)
            self._worker.join(timeout)
            self._worker = None

    # -- arrival (caller's thread; never blocks on a slow command) ----------------------------------

    def handle(self, message: Incoming) -> bool:
        """Process ``message`` if it is a command for this device; False for any other topic."""
        target = self.topics.match(message.topic)
        if target is None:
            return False
        self._arriving, self._arriving_acked = message, False
        try:
            if self._policy == "refused":
                # Nothing could authenticate it: refuse before parsing more than the top-level id.
                peeked = _peek_id(top_level_strings(message.payload, ("id",)))
                self._refuse(message, target, peeked, NoFleetKeyError(NO_KEY_MESSAGE), [_Reply(self.topics.result)])
            else:
                self._arrive(message, target)
        except Exception as exc:
            # A bug in one command must not take the daemon down, nor leave its message unacknowledged
            # (the broker would hold its flow-control slot and redeliver it after every reconnect).
            log.exception("fleet_command_crashed", topic=message.topic)
            if not self._arriving_acked:
                self._crashed(message, exc)
        finally:
            self._arriving = None
        return True

    def refuse(self, message: Incoming, error: AgentError) -> bool:
        """Answer a command that is not run (over the size/depth limits, quarantined, its handling
        crashed) on this device's result topic and where the caller asked, and acknowledge it.

        Never parses the payload beyond its top level. With signatures required, the unauthenticated
        payload's ``reply_to`` is not used. True when a result was published.
        """
        target = self.topics.match(message.topic)
        if target is None:
            self._acknowledge(message)
            return False
        fields = top_level_strings(message.payload, ("id", "reply_to"))
        replies = [_Reply(self.topics.result)]
        if not self._require_signature:
            replies += self._requested(message, fields)
        self._refuse(message, target, _peek_id(fields), error, replies)
        return True

    def _crashed(self, message: Incoming, exc: Exception) -> None:
        try:
            self.refuse(message, AgentError(f"internal error ({type(exc).__name__}); the command was not run"))
        except Exception:
            log.exception("fleet_command_refuse_failed", topic=message.topic)
            self._acknowledge(message)

    def _arrive(self, message: Incoming, target: CommandTarget) -> None:
        now = self._clock()
        own = [_Reply(self.topics.result)]
        data: dict[str, Any] | None = None
        try:
            data = _decode_object(message.payload)
            request = _validate(CommandRequest, data)
            signed = self._authenticate(request, data, target)
        except SignatureError as exc:
            # Unauthenticated: answer only on our own result topic, never on a topic the sender chose.
            self._refuse(message, target, _peek_id(data), exc, own)
            return
        except BadRequestError as exc:
            # Not decodable (not UTF-8, not JSON): the top-level id/reply_to may still be read safely.
            peeked = data if data is not None else top_level_strings(message.payload, ("id", "reply_to"))
            replies = own if self._require_signature else own + self._requested(message, peeked)
            self._refuse(message, target, _peek_id(peeked), exc, replies)
            return
        replies = own + self._requested(message, data)
        # Under the lock the worker holds while it stores a result and retires the job, so an id is
        # always either stored, pending, or new: never run twice, never answered zero times.
        with self._lock:
            stored = self._results.get(request.id)
            pending = self._pending.get(request.id) if stored is None else None
            if pending is not None:
                # Still running: the result will go to this caller too, once.
                pending.replies.extend(r for r in replies if r not in pending.replies)
        if stored is not None:
            log.info("fleet_command_duplicate", id=request.id, cmd=target.name)
            self._send({**stored, "duplicate": True}, replies)
            self._acknowledge(message)
            return
        if pending is not None:
            self._acknowledge(message)
            return
        try:
            if signed:
                self._check_replay(request, now)
        except SignatureError as exc:
            self._refuse(message, target, request.id, exc, own)
            return
        try:
            if request.expires_at is not None and now > request.expires_at:
                raise ExpiredCommandError(f"command expired {now - request.expires_at:.1f} s ago; not run")
            command = self._commands.get(target.name)
            if command is None:
                raise UnknownCommandError(
                    f"unknown command {target.name!r}; known: {', '.join(self.command_names)}"
                )
            args = _validate(command.args, request.args)
        except AgentError as exc:
            self._finish(_Job(request, target, NoArgs(), message, now, replies), exc)
            return
        job = _Job(request, target, args, message, now, replies)
        log.debug("fleet_command_received", id=request.id, cmd=target.name, scope=target.scope)
        if command.slow:
            with self._lock:
                self._pending[request.id] = job
            self._ensure_worker()
            self._jobs.put(job)
        else:
            self._finish(job, self._execute(command, job))

    def _authenticate(self, request: CommandRequest, data: dict[str, Any], target: CommandTarget) -> bool:
        """Verify the signature and its binding to the topic; True if the command was signed and verified."""
        signed = request.sig is not None and self._public_key is not None
        if self._require_signature or signed:
            assert self._public_key is not None  # guaranteed by __init__ when required
            verify_payload(data, self._public_key)
            if request.cmd is None or request.target is None:
                raise BadSignatureError("signed commands must carry 'cmd' and 'target' (bound to the topic)")
        for field_name, expected in (("cmd", target.name), ("target", target.label)):
            got = getattr(request, field_name)
            if got is not None and got != expected:
                error = BadSignatureError if signed else BadRequestError
                raise error(f"payload {field_name} {got!r} does not match the topic ({expected!r})")
        return signed

    def _check_replay(self, request: CommandRequest, now: float) -> None:
        check_fresh(request.issued_at, now, self._fleet.signature_window_s)
        if request.nonce is None:
            raise BadSignatureError("signed commands must carry a 'nonce'")
        assert request.issued_at is not None  # check_fresh raised otherwise
        # Recorded before the command runs (in memory at least, even on a full disk): a replay arriving
        # while it runs is refused.
        if not self._nonces.use(request.nonce, request.issued_at):
            raise ReplayedCommandError(f"nonce {request.nonce!r} was already used; refusing a replay")

    # -- execution ---------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="fleet-commands", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            assert isinstance(job, _Job)  # only jobs and _STOP are queued
            try:
                self._finish(job, self._execute(self._commands[job.target.name], job))
            except Exception as exc:
                log.exception("fleet_command_crashed", id=job.request.id, cmd=job.target.name)
                with self._lock:
                    self._pending.pop(job.request.id, None)
                if not job.acked:
                    self._crashed(job.message, exc)

    def _execute(self, command: _Command, job: _Job) -> dict[str, Any] | AgentError:
        try:
            return command.run(job.args)
        except AgentError as exc:
            return exc
        except Exception as exc:
            log.exception("fleet_command_failed", id=job.request.id, cmd=job.target.name)
            return AgentError(f"{type(exc).__name__}: {exc}")

    def _finish(self, job: _Job, outcome: dict[str, Any] | AgentError) -> None:
        """Store the result under the id (so it is never run again), publish it, then acknowledge."""
        result = _result(job.request.id, self.topics.device_id, job.target.name, outcome)
        body = result.model_dump(mode="json", exclude_none=True)
        with self._lock:
            self._results.put(job.request.id, body)
            replies = list(job.replies)
            self._pending.pop(job.request.id, None)
        self._send(body, replies)
        self._acknowledge(job.message)
        job.acked = True
        log.info(
            "fleet_command_done",
            id=job.request.id,
            cmd=job.target.name,
            scope=job.target.scope,
            ok=result.ok,
            code=result.error.code if result.error else None,
            ms=round((self._clock() - job.started) * 1000, 1),
        )

    def _refuse(
        self, message: Incoming, target: CommandTarget, rid: str | None, exc: AgentError, replies: list[_Reply]
    ) -> None:
        """Answer a command that was not run and is not remembered (it may be retried correctly)."""
        log.warning("fleet_command_refused", id=rid, cmd=target.name, topic=message.topic, code=exc.code,
                    reason=str(exc))
        self._send(_result(rid, self.topics.device_id, target.name, exc).model_dump(mode="json", exclude_none=True),
                   replies)
        self._acknowledge(message)

    def _send(self, body: dict[str, Any], replies: list[_Reply]) -> None:
        payload = json.dumps(body, ensure_ascii=False).encode()
        for reply in replies:
            self._publish(reply.topic, payload, qos=1, correlation_data=reply.correlation)

    def _acknowledge(self, message: Incoming) -> None:
        if message is self._arriving:
            self._arriving_acked = True
        if self._ack is not None:
            self._ack(message)

    def _requested(self, message: Incoming, data: Mapping[str, Any] | None) -> list[_Reply]:
        """The caller's reply address: the MQTT 5 Response Topic, else the payload's ``reply_to``."""
        topic = message.response_topic
        if topic is None and data is not None and isinstance(data.get("reply_to"), str):
            topic = data["reply_to"]
        if topic is None or not is_concrete_topic(topic) or topic == self.topics.result:
            return []
        return [_Reply(topic, message.correlation_data)]

    # -- commands implemented here -------------------------------------------------------------------

    def _ping(self, args: NoArgs) -> dict[str, Any]:
        return {"pong": True, "time": round(self._clock(), 3), "groups": list(self.topics.groups)}

    def _status(self, args: NoArgs) -> dict[str, Any]:
        status = dict(self._control.status())
        status.setdefault("device_id", self.topics.device_id)
        status.setdefault("groups", list(self.topics.groups))
        status.setdefault("signature_required", self._require_signature)
        status.setdefault("commands", self._policy)
        return status

    def _config_get(self, args: ConfigGetArgs) -> dict[str, Any]:
        value = get_value(self._settings, args.key)
        out: dict[str, Any] = {"key": args.key, "value": value}
        sources = self._current_sources()
        if args.key in sources:
            out["source"] = sources[args.key]
        elif sources:
            prefix = f"{args.key}." if args.key else ""
            out["sources"] = {k: v for k, v in sources.items() if k.startswith(prefix)}
        return out

    def _current_sources(self) -> dict[str, str]:
        """Each key's layer, read once from disk (best effort: a layer unreadable now just leaves them out)."""
        if self._sources is None:
            try:
                _, self._sources = layered_settings(
                    read_document(self._config_path),
                    read_document(self._overrides_path, "fleet override file"),
                    os.environ,
                    config_path=self._config_path,
                    overrides_path=self._overrides_path,
                    schema=type(self._settings),
                )
            except AgentError as exc:
                log.warning("config_sources_unavailable", error=str(exc))
                self._sources = {}
        return self._sources

    def _config_set(self, args: ConfigSetArgs) -> dict[str, Any]:
        changes = args.changes()
        change = edit_overrides(self._overrides_path, changes, current=self._settings, config_path=self._config_path)
        applied: dict[str, Any] = {"applied": [], "restart_required": []}
        if change.changed_keys:
            applied = dict(self._control.apply_settings(change.settings, change.changed_keys))
        self._settings = change.settings
        self._sources = change.sources
        result: dict[str, Any] = {
            "persisted": str(change.path),
            "layer": "fleet-override",
            "changed": change.changed_keys,
            **applied,
            "sources": {k: change.sources[k] for k in changes if k in change.sources},
        }
        if change.shadowed:
            result["shadowed_by_env"] = change.shadowed
        return result


# -- operator side -----------------------------------------------------------------------------------


def build_command(
    name: str,
    args: Mapping[str, Any],
    scope: Scope,
    value: str | None,
    *,
    key: Ed25519PrivateKey | None = None,
    ttl_s: float | None = None,
    command_id: str | None = None,
    reply_to: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A command payload ready to publish (signed when ``key`` is given), bound to its name and target."""
    issued = round(time.time() if now is None else now, 3)
    payload: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": command_id or uuid.uuid4().hex,
        "cmd": name,
        "target": target_label(scope, value),
        "args": dict(args),
        "issued_at": issued,
        "nonce": uuid.uuid4().hex,
    }
    if ttl_s is not None:
        payload["expires_at"] = round(issued + ttl_s, 3)
    if reply_to is not None:
        payload["reply_to"] = reply_to
    return sign_payload(payload, key) if key is not None else payload


# -- helpers -----------------------------------------------------------------------------------------

NO_KEY_MESSAGE = (
    "this device has no fleet public key and refuses every fleet command: provision the 'fleet_pubkey' "
    "credential (or set fleet.public_key) and sign commands with 'edge-agent fleet cmd --key', or set "
    "fleet.allow_unsigned = true to run unsigned commands"
)


def _log_policy(policy: CommandPolicy, key_path: Path | None, fleet: FleetSettings) -> None:
    """Say at every start how commands are authenticated; loudly when anyone on the broker may run them."""
    if policy == "unsigned":
        log.warning(
            "fleet_unsigned_commands_allowed",
            reason="fleet.allow_unsigned = true and no fleet public key",
            risk="anyone who can publish to this device's command topics can run fleet commands on it",
            fix="provision the 'fleet_pubkey' credential (or fleet.public_key) and remove fleet.allow_unsigned",
        )
    elif policy == "refused":
        log.warning("fleet_commands_refused_no_key", fix=NO_KEY_MESSAGE.split(": ", 1)[1])
    else:
        if fleet.allow_unsigned:
            log.warning("fleet_allow_unsigned_ignored", public_key=str(key_path),
                        reason="a fleet public key is present: signatures are required")
        log.info("fleet_signed_commands_required", public_key=str(key_path))



def _result(rid: str | None, device_id: str, cmd: str, outcome: dict[str, Any] | AgentError) -> CommandResult:
    if isinstance(outcome, AgentError):
        return CommandResult(id=rid, device_id=device_id, cmd=cmd, ok=False, duplicate=False,
                             error=CommandError(code=outcome.code, message=str(outcome)))
    return CommandResult(id=rid, device_id=device_id, cmd=cmd, ok=True, result=outcome, duplicate=False)


def _decode_object(payload: bytes) -> dict[str, Any]:
    check_payload(payload, None)  # bounded nesting before json.loads recurses into it
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequestError("payload is not UTF-8") from exc
    except ValueError as exc:
        raise BadRequestError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequestError("payload must be a JSON object")
    check_unicode(payload, data)
    return data


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "args"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _peek_id(data: Mapping[str, Any] | None) -> str | None:
    rid = data.get("id") if data is not None else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None
