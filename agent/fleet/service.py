"""Fleet commands on the device: the dispatcher (:class:`FleetService`).

A command arrives on one of three topics (device, group, all). :class:`FleetService` authenticates
it (Ed25519 with the fleet public key; a device without a key refuses every command unless
``[fleet] allow_unsigned``), answers a redelivered id from the persisted result store instead of
running it again, refuses expired ones, validates the arguments, runs it (slow ones on one worker
thread, in order) and publishes one result to the caller's reply topic and to
``{prefix}/{device_id}/cmd/result``. Whatever happens to one command, the device carries on.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from agent.config.fleet import CommandPolicy, FleetSettings
from agent.errors import AgentError, BadRequestError
from agent.fleet.config_edit import edit_overrides, get_value, read_document
from agent.fleet.errors import ExpiredCommandError, UnknownCommandError
from agent.fleet.signing import (
    BadSignatureError,
    NoFleetKeyError,
    ReplayedCommandError,
    SignatureError,
    check_fresh,
    load_public_key,
    verify_payload,
)
from agent.fleet.store import JsonLru, NonceCache
from agent.fleet.wire import (
    CommandError,
    CommandRequest,
    CommandResult,
    ConfigGetArgs,
    ConfigSetArgs,
    ModelArgs,
    NoArgs,
    PlanArgs,
)
from agent.settings import DEFAULT_CONFIG_PATH, OVERRIDES_FILE_NAME, Settings, layered_settings
from agent.transport.limits import top_level_strings
from agent.transport.mqtt import Incoming, Publish
from agent.transport.topics import CommandTarget, FleetTopics, is_concrete_topic
from agent.transport.wire import decode_object, describe_error

if TYPE_CHECKING:  # cryptography loads only when a fleet key is configured (~7 MB RSS)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger("agent.fleet")


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
            data = decode_object(message.payload)
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


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(describe_error(exc, "args")) from exc


def _peek_id(data: Mapping[str, Any] | None) -> str | None:
    rid = data.get("id") if data is not None else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None
