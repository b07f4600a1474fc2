"""``edge-agent models ls|rm|prune``: what the Hugging Face cache holds, which file is loaded, and removals.

The cache is the daemon's (``[hub] cache_dir``, else ``HF_HUB_CACHE``, ``HF_HOME/hub``,
``$STATE_DIRECTORY/hf-cache``, ``/var/lib/edge-agent/hf-cache``: :func:`agent.catalog.hub.resolve_cache_dir`).
It is read and changed only through huggingface_hub's own cache API: ``scan_cache_dir`` lists it,
``HFCacheInfo.delete_revisions`` removes whole revisions (their snapshot, refs, and the repo when it was the
last one) and ``HFCacheInfo.delete_files`` single files of a revision that keeps others; a blob is deleted
only when nothing else in the cache links to it, and ``expected_freed_size`` is what is reported.

Which file is *loaded* comes from the device's retained status on the broker (its model name and quant,
matched against the cached GGUF headers) when the broker answers, else from the config (``[model] path``,
or ``[model] name`` with a pinned ``quant``); the output names the source. Files the config uses (the
``[model] path``, or the ``[model] name`` entry's quants at its revision; only the pinned one with
``[model] quant``) are *configured*. ``prune`` removes the GGUF files that are neither, in repos that hold
GGUF files (other tools' repos in a shared cache are left alone); ``rm`` refuses the loaded file unless
``--force``. A repo with a download in progress (``*.edge-agent-partial``, ``*.incomplete``) is never
removed as a whole, so the partial file survives for the pull to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CachedFileInfo, HFCacheInfo, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from agent.catalog.catalog import Catalog, CatalogEntry, load_catalog
from agent.catalog.gguf_header import read_local
from agent.catalog.hub import PARTIAL_SUFFIX, resolve_cache_dir
from agent.catalog.quants import is_weights_file, normalize_tag, parse_quant_tag
from agent.cli.config_cmd import add_config_argument
from agent.errors import AgentError, BadRequestError, NotFoundError, TransportError
from agent.settings import Settings, load_settings
from agent.transport.wire import LIVE_STATES

_COMMIT = re.compile(r"[0-9a-f]{40}")
_PARTIALS = (f"*{PARTIAL_SUFFIX}", "*.incomplete")


# -- what the cache holds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModelFile:
    """One file of one cached revision, with what the agent makes of it."""

    repo: str
    revision: str
    refs: tuple[str, ...]
    file: str
    """Path inside the repo (``sub/x.gguf``)."""
    quant: str | None
    size: int
    path: Path
    blob: Path
    catalog_names: tuple[str, ...]
    info: CachedFileInfo = field(repr=False, compare=False)

    @property
    def is_gguf(self) -> bool:
        return self.file.lower().endswith(".gguf")

    def as_dict(self, use: str) -> dict[str, Any]:
        return {"repo": self.repo, "file": self.file, "quant": self.quant, "size_bytes": self.size,
                "revision": self.revision, "refs": list(self.refs), "catalog": list(self.catalog_names),
                "path": str(self.path), "use": use or None}


@dataclass
class Loaded:
    """Which cached file the device serves, and how we know (``status``, ``config`` or ``none``)."""

    source: str
    detail: str
    model: str | None = None
    quant: str | None = None
    paths: frozenset[Path] = frozenset()
    """Snapshot paths of the loaded file (more than one when several revisions link the same name)."""

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "detail": self.detail, "model": self.model, "quant": self.quant,
                "paths": sorted(str(p) for p in self.paths)}


@dataclass
class CacheView:
    """The scanned cache, its rows, and what is loaded and configured."""

    cache_dir: Path
    info: HFCacheInfo | None
    files: list[CachedModelFile]
    loaded: Loaded
    configured: frozenset[Path]
    partials: list[tuple[Path, int]]
    warnings: list[str]

    def use(self, row: CachedModelFile) -> str:
        """``loaded``, ``configured`` or ``""`` (unused)."""
        if row.path in self.loaded.paths:
            return "loaded"
        return "configured" if row.path in self.configured else ""

    def total_bytes(self) -> int:
        return self.info.size_on_disk if self.info is not None else 0


def scan(cache_dir: Path, catalog: Catalog) -> tuple[HFCacheInfo | None, list[CachedModelFile], list[str]]:
    """huggingface_hub's scan of ``cache_dir`` as rows (model repos only), plus its warnings.

    A missing cache is an empty one. The agent's own bookkeeping directory (``.edge-agent``) is not a repo,
    so huggingface_hub's warning about it is left out.
    """
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None, [], []
    by_repo: dict[str, list[tuple[str, CatalogEntry]]] = defaultdict(list)
    for name, entry in catalog.models.items():
        by_repo[entry.repo].append((name, entry))
    rows: list[CachedModelFile] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        entries = by_repo.get(repo.repo_id, [])
        for revision in repo.revisions:
            for f in revision.files:
                rel = f.file_path.relative_to(revision.snapshot_path).as_posix()
                rows.append(CachedModelFile(
                    repo=repo.repo_id, revision=revision.commit_hash, refs=tuple(sorted(revision.refs)), file=rel,
                    quant=_quant_of(rel, entries), size=f.size_on_disk, path=f.file_path, blob=f.blob_path,
                    catalog_names=tuple(name for name, _ in entries), info=f,
                ))
    rows.sort(key=lambda r: (r.repo, r.file, r.revision))
    warnings = [str(w) for w in info.warnings if "/.edge-agent" not in str(w)]
    return info, rows, warnings


def _quant_of(file: str, entries: list[tuple[str, CatalogEntry]]) -> str | None:
    for _, entry in entries:
        for tag, name in (entry.files or {}).items():
            if name == file:
                return tag
    return parse_quant_tag(file) if file.lower().endswith(".gguf") else None


def partial_downloads(cache_dir: Path, repo: str | None = None) -> list[tuple[Path, int]]:
    """Unfinished downloads (ours and huggingface_hub's) in ``blobs/`` of one repo or all."""
    folder = "models--" + repo.replace("/", "--") if repo else "*"
    found: list[tuple[Path, int]] = []
    for pattern in _PARTIALS:
        for path in cache_dir.glob(f"{folder}/blobs/{pattern}"):
            try:
                found.append((path, path.stat().st_size))
            except OSError:
                continue
    return sorted(found)


# -- loaded and configured ---------------------------------------------------------------------------------


def configured_paths(settings: Settings, catalog: Catalog, rows: list[CachedModelFile]) -> frozenset[Path]:
    """The cached files the config uses: ``[model] path``, or the ``[model] name`` entry's files."""
    model = settings.model
    if model.path is not None:
        return frozenset(r.path for r in rows if _same_file(r.path, model.path))
    if not model.name or model.name not in catalog.models:
        return frozenset()
    entry = catalog.models[model.name]
    pinned = normalize_tag(model.quant) if model.quant else None
    return frozenset(r.path for r in rows if _entry_file(r, entry, pinned))


def _entry_file(row: CachedModelFile, entry: CatalogEntry, quant: str | None) -> bool:
    if row.repo != entry.repo or not _at_revision(row, entry.revision):
        return False
    if entry.files is not None and row.file not in entry.files.values():
        return False
    if entry.files is None and not is_weights_file(row.file):
        return False
    return quant is None or row.quant == quant


def _at_revision(row: CachedModelFile, revision: str) -> bool:
    return row.revision == revision if _COMMIT.fullmatch(revision) else revision in row.refs


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or a.resolve() == b.resolve()
    except OSError:
        return False


def loaded_from_status(status: dict[str, Any], where: str, rows: list[CachedModelFile]) -> Loaded:
    """The cached file a retained status names: its ``model`` (the GGUF's general.name, else the file's stem)
    and ``quant``, matched against the cached GGUF files' headers."""
    state = str(status.get("state", "?"))
    model, quant = status.get("model"), status.get("quant")
    if state not in LIVE_STATES or not model:
        return Loaded("status", f"{where}: {state}, no model loaded")
    matches = frozenset(r.path for r in rows if r.is_gguf and (not quant or r.quant == quant)
                        and _gguf_name(r) == model)
    detail = f"{where}: {state}, serving {model}{' ' + str(quant) if quant else ''}"
    if not matches:
        detail += " (not a file of this cache)"
    return Loaded("status", detail, str(model), str(quant) if quant else None, matches)


def _gguf_name(row: CachedModelFile) -> str:
    # What the daemon reports as the model (agent/engine/llama.py): general.name, else the file's stem.
    try:
        name = read_local(row.path).name
    except (AgentError, OSError):
        name = None
    return name or Path(row.file).stem


def loaded_from_config(settings: Settings, catalog: Catalog, rows: list[CachedModelFile], why: str) -> Loaded:
    """What the config says is loaded when the broker did not answer: ``[model] path``, or a pinned quant."""
    model = settings.model
    if model.path is not None:
        paths = frozenset(r.path for r in rows if _same_file(r.path, model.path))
        where = "in this cache" if paths else "not in this cache"
        return Loaded("config", f"{why}; [model] path = {model.path} ({where})", model.path.stem, None, paths)
    if model.name and model.name in catalog.models and model.quant:
        entry, quant = catalog.models[model.name], normalize_tag(model.quant)
        paths = frozenset(r.path for r in rows if _entry_file(r, entry, quant))
        return Loaded("config", f"{why}; [model] name = {model.name}, quant = {model.quant}", model.name,
                      quant, paths)
    if model.name:
        return Loaded("config", f"{why}; [model] name = {model.name} (the quant is chosen at start: unknown)",
                      model.name)
    return Loaded("none", f"{why}; the config names no model")


def find_loaded(settings: Settings, device: str | None, catalog: Catalog, rows: list[CachedModelFile],
                timeout: float) -> Loaded:
    """Ask the broker for the device's retained status; fall back to the config when it cannot answer."""
    if timeout <= 0:
        return loaded_from_config(settings, catalog, rows, "broker not asked (--timeout 0)")
    from agent.cli.fleet import Operator  # noqa: PLC0415 - the MQTT client only when the broker is asked
    from agent.cli.status import read_view  # noqa: PLC0415
    from agent.transport.topics import DeviceTopics  # noqa: PLC0415

    topics = DeviceTopics(settings.mqtt.topic_prefix, device or settings.device_id)
    where = f"retained status of {topics.device_id} on {settings.mqtt.host}:{settings.mqtt.port}"
    try:
        view = read_view(Operator(settings), topics, timeout)
    except TransportError as exc:
        return loaded_from_config(settings, catalog, rows, f"broker unreachable ({exc})")
    if not view.status:
        return loaded_from_config(settings, catalog, rows, f"no {where}")
    return loaded_from_status(view.status, where, rows)


def read_cache(settings: Settings, *, device: str | None, timeout: float) -> CacheView:
    """Scan the daemon's cache and work out what is loaded and configured."""
    cache_dir = resolve_cache_dir(settings.hub.cache_dir, os.environ)
    catalog = load_catalog(settings.model.catalog)
    info, rows, warnings = scan(cache_dir, catalog)
    loaded = find_loaded(settings, device, catalog, rows, timeout)
    return CacheView(cache_dir, info, rows, loaded, configured_paths(settings, catalog, rows),
                     partial_downloads(cache_dir) if info is not None else [], warnings)


# -- removal -------------------------------------------------------------------------------------------------


@dataclass
class Removal:
    """Files to remove: whole revisions where every file goes (and no download is pending in the repo),
    single files otherwise; ``expected_freed_bytes`` is huggingface_hub's count of the blobs it frees."""

    files: list[CachedModelFile]
    whole_revisions: list[str]
    expected_freed_bytes: int


def plan_removal(view: CacheView, selected: list[CachedModelFile]) -> Removal:
    """How to remove ``selected`` with huggingface_hub's strategies (nothing is changed yet)."""
    if view.info is None or not selected:
        return Removal([], [], 0)
    chosen = {r.path for r in selected}
    whole: list[str] = []
    for repo in view.info.repos:
        if partial_downloads(view.cache_dir, repo.repo_id):
            continue  # removing the repo whole would delete the download a pull resumes
        whole.extend(rev.commit_hash for rev in repo.revisions
                     if rev.files and all(f.file_path in chosen for f in rev.files))
    # One strategy over every selected file counts each blob once, shared or not, like the deletion will.
    expected = view.info.delete_files(*(r.info for r in selected)).expected_freed_size
    return Removal(sorted(selected, key=lambda r: (r.repo, r.file, r.revision)), sorted(whole), expected)


def execute_removal(view: CacheView, removal: Removal) -> None:
    """Delete: the whole revisions first, then the remaining single files, found again in a fresh scan
    (a blob two strategies computed from one scan would each keep for the other's sake)."""
    if removal.whole_revisions and view.info is not None:
        view.info.delete_revisions(*removal.whole_revisions).execute()
    whole = set(removal.whole_revisions)
    rest = {r.path for r in removal.files if r.revision not in whole}
    if rest:
        fresh = scan_cache_dir(view.cache_dir)
        files = [f for repo in fresh.repos for rev in repo.revisions for f in rev.files if f.file_path in rest]
        if files:
            fresh.delete_files(*files).execute()


def select(view: CacheView, target: str, revision: str | None) -> list[CachedModelFile]:
    """The cached files ``target`` names: ``NAME[:QUANT]`` with NAME a catalog entry or a repo id (org/name)."""
    name, _, quant_text = target.partition(":")
    quant = None
    if quant_text:
        quant = normalize_tag(quant_text)
        if quant is None:
            raise BadRequestError(f"{target}: unknown quant tag {quant_text!r}")
    if "/" in name:
        match = [r for r in view.files if r.repo == name]
    else:
        match = [r for r in view.files if name in r.catalog_names]
    if quant is not None:
        match = [r for r in match if r.quant == quant]
    if revision is not None:
        match = [r for r in match if r.revision.startswith(revision) or revision in r.refs]
    if not match:
        at = f" at revision {revision}" if revision else ""
        raise NotFoundError(f"nothing cached matches {target}{at} in {view.cache_dir} (see edge-agent models ls)")
    return match


def prunable(view: CacheView) -> list[CachedModelFile]:
    """What ``prune`` removes: in repos holding GGUF files, every revision none of whose files is used (as a
    whole), and the unused GGUF files of the others."""
    used = {r.path for r in view.files if view.use(r)}
    revisions: dict[tuple[str, str], list[CachedModelFile]] = defaultdict(list)
    gguf_repos = {r.repo for r in view.files if r.is_gguf}
    for r in view.files:
        if r.repo in gguf_repos:
            revisions[(r.repo, r.revision)].append(r)
    out: list[CachedModelFile] = []
    for files in revisions.values():
        if not any(f.path in used for f in files):
            out.extend(files)
        else:
            out.extend(f for f in files if f.is_gguf and f.path not in used)
    return out


# -- the commands ----------------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    models = subparsers.add_parser(
        "models",
        help="list, remove and prune the models in the Hugging Face cache",
        description="The daemon's Hugging Face cache: what is cached (repo, file, quant, size, revision), which "
        "file the device has loaded (from its retained status on the broker, else from the config), and what a "
        "removal frees. Uses huggingface_hub's cache scan and deletion.",
    )
    inner = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = inner.add_parser("ls", help="list the cached model files, their sizes and which one is loaded")
    rm = inner.add_parser(
        "rm",
        help="remove cached models: NAME[:QUANT] (catalog name or org/repo)",
        description="Remove the cached files a target names (all its revisions, or --revision). The loaded model "
        "is kept unless --force; nothing matching exits 66.",
    )
    rm.add_argument("targets", nargs="+", metavar="TARGET",
                    help="a catalog name or repo id, optionally with a quant: gemma-3-270m-it:Q8_0, org/repo:Q4_K_M")
    rm.add_argument("--revision", help="only this revision (a commit id or its prefix, or a ref such as main)")
    rm.add_argument("--force", action="store_true", help="remove the loaded model too (it is downloaded again "
                    "at the next start)")
    prune = inner.add_parser(
        "prune",
        help="remove every cached GGUF the config does not use (keeps the loaded one)",
        description="Remove, in repos that hold GGUF files, every GGUF file that is neither loaded nor configured "
        "([model] path, or the [model] name entry's quants at its revision; only the pinned one with [model] "
        "quant). A revision with nothing kept goes whole, with its refs. Other repos are left alone.",
    )
    for parser in (ls, rm, prune):
        add_config_argument(parser)
        parser.add_argument("--device", help="whose retained status tells what is loaded (default: device_id)")
        parser.add_argument("--timeout", type=float, default=3.0,
                            help="seconds to wait for the broker (default 3; 0: do not ask, use the config)")
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    for parser in (rm, prune):
        parser.add_argument("--dry-run", action="store_true",
                            help="show what would be removed and what that frees; remove nothing")
    ls.set_defaults(func=_ls)
    rm.set_defaults(func=_rm)
    prune.set_defaults(func=_prune)


def _view(args: argparse.Namespace) -> CacheView:
    settings = load_settings(args.config, required=args.config is not None)
    return read_cache(settings, device=args.device, timeout=args.timeout)


def _ls(args: argparse.Namespace) -> int:
    view = _view(args)
    if args.json:
        print(json.dumps(ls_json(view), indent=2))
    else:
        print(render_ls(view))
    return 0


def _rm(args: argparse.Namespace) -> int:
    view = _view(args)
    selected: dict[Path, CachedModelFile] = {}
    for target in args.targets:
        selected.update((r.path, r) for r in select(view, target, args.revision))
    loaded = [r for r in selected.values() if view.use(r) == "loaded"]
    if loaded and not args.force:
        raise BadRequestError(f"{loaded[0].repo}/{loaded[0].file} is the loaded model ({view.loaded.detail}); "
                              "add --force to remove it anyway")
    return _remove(view, list(selected.values()), args, kept=[])


def _prune(args: argparse.Namespace) -> int:
    view = _view(args)
    remove = prunable(view)
    gone = {r.path for r in remove}
    kept = [r for r in view.files if r.path not in gone and view.use(r)]
    return _remove(view, remove, args, kept=kept)


def _remove(view: CacheView, selected: list[CachedModelFile], args: argparse.Namespace,
            kept: list[CachedModelFile]) -> int:
    removal = plan_removal(view, selected)
    if not args.dry_run:
        execute_removal(view, removal)
    if args.json:
        print(json.dumps(removal_json(view, removal, kept, dry_run=args.dry_run), indent=2))
    else:
        print(render_removal(view, removal, kept, dry_run=args.dry_run))
    return 0


# -- output ----------------------------------------------------------------------------------------------------


def ls_json(view: CacheView) -> dict[str, Any]:
    """``models ls --json``: the cache, what is loaded (and how we know), every cached file."""
    return {
        "cache_dir": str(view.cache_dir),
        "total_bytes": view.total_bytes(),
        "loaded": view.loaded.as_dict(),
        "files": [r.as_dict(view.use(r)) for r in view.files],
        "partial_downloads": [{"path": str(p), "size_bytes": n} for p, n in view.partials],
        "warnings": view.warnings,
    }


def removal_json(view: CacheView, removal: Removal, kept: list[CachedModelFile], *, dry_run: bool) -> dict[str, Any]:
    """``models rm|prune --json``: what was (or would be) removed, what it frees, what was kept and why."""
    return {
        "cache_dir": str(view.cache_dir),
        "dry_run": dry_run,
        "loaded": view.loaded.as_dict(),
        "removed": [r.as_dict(view.use(r)) for r in removal.files],
        "whole_revisions": removal.whole_revisions,
        "expected_freed_bytes": removal.expected_freed_bytes,
        "kept": [r.as_dict(view.use(r)) for r in kept],
    }


def render_ls(view: CacheView) -> str:
    """A table of the cached files, then the cache's total and the loaded model's source."""
    lines: list[str] = []
    if view.files:
        rows = [("REPO", "FILE", "QUANT", "SIZE", "REVISION", "USE")]
        rows += [(r.repo, r.file, r.quant or "-", human(r.size), _revision(r), view.use(r) or "-") for r in view.files]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    else:
        lines.append("no models cached")
    count = len(view.files)
    lines.append(f"cache {view.cache_dir}: {count} file{'s' if count != 1 else ''}, {human(view.total_bytes())}")
    lines.append(f"loaded: {view.loaded.detail} [source: {view.loaded.source}]")
    if view.partials:
        size = sum(n for _, n in view.partials)
        lines.append(f"unfinished downloads: {len(view.partials)} ({human(size)}; the next pull resumes them)")
    lines += [f"warning: {w}" for w in view.warnings]
    return "\n".join(lines)


def render_removal(view: CacheView, removal: Removal, kept: list[CachedModelFile], *, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    if not removal.files:
        lines = ["nothing to remove"]
    else:
        lines = [f"{verb}:"]
        lines += [f"  {r.repo}  {r.file}  {r.quant or '-'}  {human(r.size)}  {_revision(r)}" for r in removal.files]
        freed = "would free" if dry_run else "freed"
        lines.append(f"{freed} {human(removal.expected_freed_bytes)}")
    if kept:
        lines.append("kept:")
        lines += [f"  {r.repo}  {r.file}  ({view.use(r)})" for r in kept]
    lines.append(f"loaded: {view.loaded.detail} [source: {view.loaded.source}]")
    return "\n".join(lines)


def _revision(row: CachedModelFile) -> str:
    return row.revision[:8] + (f" ({', '.join(row.refs)})" if row.refs else "")


def human(n: int) -> str:
    """Bytes in binary units, one decimal: ``278.8 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"

