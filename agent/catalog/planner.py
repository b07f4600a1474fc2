"""From "serve gemma-3-270m-it" to a verified local GGUF: list quants, estimate each, choose, pull.

The estimate for a quant that is not downloaded yet comes from its GGUF header, read from the Hub
with HTTP Range requests (the header is at the start of the file), so the choice is made before
downloading gigabytes. The decision itself is :func:`agent.catalog.fit.choose` (pure); this module is
the thin I/O around it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import structlog

from agent.catalog.catalog import Catalog, CatalogEntry, discover_quant_files, hub_entry, load_catalog
from agent.catalog.estimate import MemoryEstimate, default_repack_types, estimate_memory, repack_types_for
from agent.catalog.fit import Budget, Candidate, FitDecision, budget_from_conditions, choose, fmt_bytes, most_slots
from agent.catalog.gguf_header import INITIAL_READ_BYTES, GgufInfo, NeedMoreBytes, parse_header, read_local
from agent.catalog.hub import (
    HubError,
    HubStore,
    LocalModel,
    resolve_cache_dir,
    resolve_endpoint,
    resolve_offline,
    resolve_token,
)
from agent.catalog.quants import normalize_tag
from agent.errors import ConfigError, ModelUnavailableError
from agent.hardware.conditions import Conditions
from agent.hardware.probe import read_cpu_features
from agent.settings import ModelSettings, Settings

log = structlog.get_logger("agent.planner")

MAX_HEADER_BYTES = 64 * 2**20  # a header larger than this is not a model we can serve on a board


def configured_n_ctx(model: ModelSettings) -> int | None:
    """The context size to plan with when none is asked for: ``[model] n_ctx`` when the config sets it,
    else None (the catalog entry's ``n_ctx``, else 2048). The daemon and ``edge-agent plan`` both use this."""
    return model.n_ctx if "n_ctx" in model.model_fields_set else None


@dataclass(frozen=True, slots=True)
class QuantOption:
    """One quant file of a catalog entry with its header and estimate."""

    quant: str
    file: str
    info: GgufInfo
    estimate: MemoryEstimate


@dataclass(frozen=True, slots=True)
class Plan:
    """The fit decision for one catalog model and what the engine should load it with."""

    model: str
    entry: CatalogEntry
    n_ctx: int  # tokens per slot
    decision: FitDecision  # decision.slots: how many slots
    options: dict[str, QuantOption]  # per quant; the chosen one estimated with its slots
    kv_type: str = "f16"

    @property
    def parallel(self) -> int:
        """Slots: sequences the engine decodes together (each n_ctx tokens of one unified KV cache)."""
        return self.decision.slots

    @property
    def use_mmap(self) -> bool | None:
        """Whether the chosen file is mapped (:func:`agent.catalog.estimate.load_with_mmap` or the config)."""
        chosen = self.decision.chosen
        return self.options[chosen.quant].estimate.use_mmap if chosen else None

    @property
    def chosen(self) -> QuantOption:
        candidate = self.decision.require()
        return self.options[candidate.quant]

    def as_dict(self) -> dict[str, object]:
        """The JSON shape of ``edge-agent plan --json`` (and the fleet ``plan`` command)."""
        chosen = self.decision.chosen
        option = self.options.get(chosen.quant) if chosen else None
        return {
            "model": self.model,
            "repo": self.entry.repo,
            "revision": self.entry.revision,
            "n_ctx": self.n_ctx,
            "parallel": self.parallel,
            "kv_type": self.kv_type,
            "use_mmap": self.use_mmap,
            "kv_per_slot_bytes": option.estimate.kv_per_slot_bytes if option else None,
            "quant": chosen.quant if chosen else None,
            "file": chosen.file if chosen else None,
            "estimate_bytes": option.estimate.estimate_bytes if option else None,
            "estimate_terms": option.estimate.terms() if option else None,
            "budget_bytes": self.decision.budget_bytes,
            "budget": self.decision.budget.explain(),
            "notes": list(self.decision.notes),
            "candidates": [
                {
                    "quant": v.candidate.quant,
                    "file": v.candidate.file,
                    "estimate_bytes": v.candidate.estimate_bytes,
                    "verdict": v.verdict.value,
                    "reason": v.reason,
                    "margin_bytes": v.margin_bytes,
                }
                for v in self.decision.verdicts
            ],
        }


class Planner:
    """Plans and pulls catalog models for this device."""

    def __init__(
        self,
        catalog: Catalog,
        hub: HubStore,
        *,
        arch: str | None = None,
        repack_types: frozenset[str] | None = None,
        kv_type: str = "f16",
        use_mmap: bool | None = None,
        parallel: int | None = None,
        max_parallel: int = 1,
    ) -> None:
        """``repack_types``: what this device's llama.cpp repacks (default: by ``arch``'s assumed features,
        or this machine's CPU features when ``arch`` is None too). ``kv_type``, ``use_mmap`` (None: decided
        per file), ``parallel`` (None: the most slots that fit, at most ``max_parallel``) are the config's
        ``[model]`` and ``[inference]`` keys."""
        self._catalog = catalog
        self._hub = hub
        if repack_types is None:
            repack_types = default_repack_types(arch or platform.machine()) if arch else default_repack_types()
        self._repack = repack_types
        self._kv_type = kv_type
        self._use_mmap = use_mmap
        self._parallel = parallel
        self._max_parallel = max(1, max_parallel)

    def entry(self, name: str) -> CatalogEntry:
        """The catalog entry ``name``, or for ``org/repo`` not in the catalog the Hub repo itself."""
        if "/" in name and name not in self._catalog.models:
            return hub_entry(name)
        return self._catalog.get(name)

    def quant_files(self, entry: CatalogEntry) -> dict[str, str]:
        """Tag → file: the catalog's list, or discovered from the repo listing."""
        if entry.files:
            return entry.quant_files()
        listing = [f.path for f in self._hub.list_files(entry.repo, entry.revision)]
        files = discover_quant_files(listing)
        if not files:
            raise ModelUnavailableError(f"{entry.repo}@{entry.revision} has no GGUF files with a quant tag")
        return files

    def header(self, entry: CatalogEntry, filename: str) -> GgufInfo:
        """The GGUF header: from the cache when the file is there, else by Range requests to the Hub."""
        local = self._hub.local(entry.repo, filename, entry.revision, verify=False)
        if local is not None:
            return read_local(local)
        size = INITIAL_READ_BYTES
        while True:
            buf = self._hub.read_range(entry.repo, filename, entry.revision, 0, size)
            try:
                return parse_header(buf)
            except NeedMoreBytes as more:
                if len(buf) < size or more.needed > MAX_HEADER_BYTES:
                    raise ModelUnavailableError(
                        f"{entry.repo}/{filename}: GGUF header is truncated or too large"
                    ) from more
                size = max(more.needed, size * 2)

    def plan(
        self,
        name: str,
        conditions: Conditions,
        *,
        n_ctx: int | None = None,
        n_batch: int = 512,
        quant: str | None = None,
        extra_cap_steps: int = 0,
        reserve_bytes: int | None = None,
    ) -> Plan:
        """Estimate every quant of ``name`` and choose one for these conditions (``quant`` pins it)."""
        entry = self.entry(name)
        ctx = n_ctx or entry.n_ctx or 2048
        files = self.quant_files(entry)
        if quant is not None:
            tag = normalize_tag(quant)
            if tag is None or tag not in files:
                raise ConfigError(f"model.quant: {quant!r} is not offered for {name} (have: {', '.join(files)})")
            files = {tag: files[tag]}
        slots = self._parallel or 1

        def estimate(info: GgufInfo, n_seq: int, kv_type: str = self._kv_type) -> MemoryEstimate:
            return estimate_memory(info, ctx, n_seq=n_seq, n_batch=n_batch, kv_type=kv_type,
                                   use_mmap=self._use_mmap, repack_types=self._repack)

        options: dict[str, QuantOption] = {}
        for tag, filename in files.items():
            try:
                info = self.header(entry, filename)
            except (HubError, ModelUnavailableError) as exc:
                log.warning("plan_header_unavailable", model=name, quant=tag, file=filename, error=str(exc))
                continue
            options[tag] = QuantOption(quant=tag, file=filename, info=info, estimate=estimate(info, slots))
        if not options:
            raise ModelUnavailableError(
                f"no quant of {name} could be inspected (offline with nothing cached, or the Hub is unreachable)"
            )
        budget: Budget = budget_from_conditions(conditions, reserve_bytes=reserve_bytes)
        candidates = [
            Candidate(model=name, quant=o.quant, estimate_bytes=o.estimate.estimate_bytes, file=o.file)
            for o in options.values()
        ]
        decision = choose(candidates, budget, conditions=conditions, extra_cap_steps=extra_cap_steps)
        if decision.chosen is not None:
            # Quality first: the quant was chosen with one slot (or the configured ones); now the most slots
            # that still fit with it.
            option = options[decision.chosen.quant]
            if self._parallel is None:
                slots = most_slots(lambda n: estimate(option.info, n).estimate_bytes, budget.bytes,
                                   self._max_parallel)
                option = replace(option, estimate=estimate(option.info, slots))
                options[option.quant] = option
            decision = decision.with_slots(slots, option.estimate.estimate_bytes,
                                           self._slots_note(option, slots, budget.bytes, estimate))
        log.info(
            "plan_made",
            model=name,
            quant=decision.chosen.quant if decision.chosen else None,
            parallel=decision.slots,
            budget_bytes=decision.budget_bytes,
            candidates=len(candidates),
        )
        return Plan(model=name, entry=entry, n_ctx=ctx, decision=decision, options=options, kv_type=self._kv_type)

    def _slots_note(
        self, option: QuantOption, slots: int, budget: int, estimate: Callable[[GgufInfo, int, str], MemoryEstimate]
    ) -> str:
        """Why this many slots: configured, the cap, or what one more would need."""
        per_slot = fmt_bytes(option.estimate.kv_per_slot_bytes)
        if self._parallel is not None:
            return f"slots: {slots} (inference.parallel), KV {per_slot} per slot ({self._kv_type})"
        if slots >= self._max_parallel:
            return f"slots: {slots}, the cap (inference.max_parallel), KV {per_slot} per slot ({self._kv_type})"
        more = estimate(option.info, slots + 1, self._kv_type).estimate_bytes - budget
        note = (
            f"slots: {slots} of at most {self._max_parallel}, KV {per_slot} per slot ({self._kv_type}); "
            f"{slots + 1} would need {fmt_bytes(more)} more"
        )
        if self._kv_type == "f16":
            # The KV type is a lever the operator pulls (its speed is measured apart, docs/performance.md).
            q8 = most_slots(lambda n: estimate(option.info, n, "q8_0").estimate_bytes, budget, self._max_parallel)
            if q8 > slots:
                note += f"; with [model] kv_type = \"q8_0\": {q8} slots"
        return note

    def ensure_present(
        self, plan: Plan, *, progress: Callable[[int, int], None] | None = None
    ) -> LocalModel:
        """Pull (or find in the cache) the chosen file, sha256-verified."""
        option = plan.chosen
        return self._hub.pull(plan.entry.repo, option.file, plan.entry.revision, progress=progress)


_SIZE_UNITS = {
    "": 1, "B": 1,
    "K": 1000, "KB": 1000, "KIB": 1024,
    "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
    "G": 1000**3, "GB": 1000**3, "GIB": 1024**3,
    "T": 1000**4, "TB": 1000**4, "TIB": 1024**4,
}


def parse_size(text: str) -> int:
    """``1.5GiB``, ``800MB``, ``800M`` or a plain byte count → bytes (ValueError otherwise)."""
    s = text.strip().replace(" ", "").upper()
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:]
    if unit not in _SIZE_UNITS or not number:
        raise ValueError(f"not a size: {text!r} (use e.g. 1.5GiB, 800MB or a byte count)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 1.5GiB, 800MB or a byte count)") from None
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return int(value * _SIZE_UNITS[unit])


def hub_from_settings(settings: Settings, environ: Mapping[str, str]) -> HubStore:
    """The Hub store as configured ([hub] section, then the HF_* environment, never $HOME)."""
    hub = settings.hub
    return HubStore(
        cache_dir=resolve_cache_dir(hub.cache_dir, environ),
        token=resolve_token(hub.token.get_secret_value() if hub.token else None, environ),
        offline=resolve_offline(hub.offline, environ),
        endpoint=resolve_endpoint(hub.endpoint, environ),
        min_free_bytes=hub.min_free_bytes,
        timeout_s=hub.timeout_s,
        retries=hub.retries,
    )


def planner_from_settings(settings: Settings, environ: Mapping[str, str]) -> Planner:
    """The planner as configured: catalog, Hub, ``[model] kv_type``/``use_mmap``, ``[inference] parallel``/
    ``max_parallel``, and the repack set of this device's CPU (features from ``[hardware] proc_root``)."""
    return Planner(
        load_catalog(settings.model.catalog),
        hub_from_settings(settings, environ),
        repack_types=repack_types_for(platform.machine(), read_cpu_features(settings.hardware.proc_root)),
        kv_type=settings.model.kv_type,
        use_mmap=settings.model.use_mmap,
        parallel=settings.inference.parallel,
        max_parallel=settings.inference.max_parallel,
    )
