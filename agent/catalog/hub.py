"""The Hugging Face Hub boundary: list a repo, read the start of a file, pull a file into the HF cache.

This is the only module that imports ``huggingface_hub`` (and its HTTP client). Everything above it sees
:class:`RemoteFile`, :class:`LocalModel` and the :class:`HubError` tree, never a ``huggingface_hub`` type.

Why pulls do not simply call ``hf_hub_download``: huggingface_hub 2.4 downloads into a temporary file
whose name is unique to the process and deletes it when the call fails, so an interrupted multi-GB pull
starts again from zero on the next start (a SIGKILL also leaves that temporary file behind for good).
It also verifies only the size, and only *warns* when the disk is too small. So the bytes are moved
here: into ``blobs/<sha256>.edge-agent-partial`` in the standard cache, resumed with HTTP ``Range``
across retries and process restarts, hashed while they arrive, and renamed into ``blobs/<sha256>`` only
when the digest matches the Hub's LFS oid. ``hf_hub_download`` then writes the ``refs/`` and
``snapshots/`` entries exactly as every other Hub tool expects (the blob is already there, so it only
makes one HEAD request), and the file is shared with ``hf``, transformers, llama.cpp's ``-hf`` and others.

A file counts as present only after its digest was checked once; the check is remembered in
``<cache>/.edge-agent/verified/`` keyed by blob, size and mtime, so later starts do not re-hash gigabytes.

Settings are passed in (nothing is read from the environment here except by the explicit ``resolve_*``
helpers), because ``huggingface_hub`` itself reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` into module
constants at import time; we give it ``endpoint=`` on every call instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import urlsplit

import httpx2
import structlog
from huggingface_hub import (
    HfApi,
    RepoFile,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
    hf_raise_for_status,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # public, lazily re-exported
from pydantic import BaseModel, ConfigDict

from agent.errors import AgentError

log = structlog.get_logger(__name__)

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
DEFAULT_CACHE_DIR: Final = Path("/var/lib/edge-agent/hf-cache")
PARTIAL_SUFFIX: Final = ".edge-agent-partial"
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1: Final = re.compile(r"[0-9a-f]{40}")
_FSYNC_EVERY: Final = 64 * 1024 * 1024  # bytes between fsyncs of the partial file: bounds loss on power cut
_HASH_CHUNK: Final = 4 * 1024 * 1024
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` while a pull transfers bytes (from the pull's thread)."""


# -- errors ------------------------------------------------------------------------------------------


class HubError(AgentError):
    """Talking to the Hugging Face Hub (or reading its cache) failed."""

    code = "hub_error"


class HubUnreachableError(HubError, ConnectionError):
    """The Hub could not be reached (network down, DNS, timeout, dropped connection) and nothing usable is cached."""

    code = "hub_unreachable"


class OfflineError(HubError, FileNotFoundError):
    """Offline mode is on and the requested file (or listing) is not in the local cache."""

    code = "hub_offline"


class HubAuthError(HubError, PermissionError):
    """The Hub refused our credentials (missing, invalid or insufficient token)."""

    code = "hub_forbidden"


class GatedRepoError(HubAuthError):
    """The repo is gated: accept its licence on the Hub and give the agent a token of that account."""

    code = "hub_gated"


class NotFoundOnHubError(HubError, FileNotFoundError):
    """The repo, revision or file does not exist on the Hub (or is private and invisible to our token)."""

    code = "hub_not_found"


class ChecksumMismatchError(HubError, ValueError):
    """The downloaded bytes do not match the expected sha256; they were deleted."""

    code = "hub_checksum_mismatch"


class DiskFullError(HubError, OSError):
    """Not enough free disk space for the download where the cache lives."""

    code = "disk_full"


# -- value types -------------------------------------------------------------------------------------


class RemoteFile(BaseModel):
    """One file of a Hub repo at a revision."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str | None = None
    """The LFS oid (sha256 of the content); ``None`` for small files kept in git."""


class LocalModel(BaseModel):
    """A verified file in the local HF cache, the result of :meth:`HubStore.pull`."""

    model_config = ConfigDict(frozen=True)

    repo: str
    filename: str
    revision: str
    commit: str | None
    """Commit id the file was resolved at (``None`` only when served from cache without a ref)."""
    path: Path
    """The snapshot path (a symlink into ``blobs/``), what llama.cpp should open."""
    size: int
    sha256: str | None
    downloaded_bytes: int
    """Bytes transferred by this pull; 0 when the cache already had the file."""
    from_cache: bool


# -- settings helpers (the only places that look at the environment, and only when called) -----------


def resolve_endpoint(configured: str | None, environ: Mapping[str, str]) -> str:
    """The Hub endpoint: config, else ``HF_ENDPOINT``, else huggingface.co (no trailing slash)."""
    return (configured or environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_offline(configured: bool, environ: Mapping[str, str]) -> bool:
    """Offline when config says so or ``HF_HUB_OFFLINE`` is truthy (as huggingface_hub reads it)."""
    return configured or environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def resolve_cache_dir(configured: Path | None, environ: Mapping[str, str]) -> Path:
    """The HF hub cache: config, ``HF_HUB_CACHE``, ``HF_HOME/hub``, systemd ``$STATE_DIRECTORY/hf-cache``, default.

    Never depends on ``$HOME``: under systemd there may be none, which is how other servers lose their cache.
    """
    if configured is not None:
        return configured
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"])
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]) / "hub"
    if environ.get("STATE_DIRECTORY"):
        # systemd StateDirectory= may list several paths separated by ':'; the first is ours.
        return Path(environ["STATE_DIRECTORY"].split(":")[0]) / "hf-cache"
    return DEFAULT_CACHE_DIR


def resolve_token(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The Hub token: config, systemd credential ``hf_token``, ``HF_TOKEN``, or the file at ``HF_TOKEN_PATH``.

    A configured value or ``HF_TOKEN`` that is an absolute path to an existing file is read from that file.
    """

    def from_value(value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        value = value.strip()
        if value.startswith("/") and Path(value).is_file():
            return Path(value).read_text().strip() or None
        return value

    if token := from_value(configured):
        return token
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / "hf_token").is_file():
        return (Path(credentials) / "hf_token").read_text().strip() or None
    if token := from_value(environ.get("HF_TOKEN")):
        return token
    token_path = environ.get("HF_TOKEN_PATH")
    if token_path and Path(token_path).is_file():
        return Path(token_path).read_text().strip() or None
    return None


# -- the store ---------------------------------------------------------------------------------------


class HubStore:
    """Pulls files from one Hub endpoint into one HF cache directory, with resume and sha256 verification.

    Thread-safe for different files; two pulls of the same blob (threads or processes) serialise on a lock
    file. ``offline=True`` guarantees no network call at all.
    """

    def __init__(
        self,
        *,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        token: str | None = None,
        offline: bool = False,
        endpoint: str | None = None,
        min_free_bytes: int = 0,
        timeout_s: float = 30.0,
        retries: int = 5,
        retry_wait_s: float = 2.0,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.offline = offline
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.min_free_bytes = min_free_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        # False (not None) so huggingface_hub never falls back to a token it finds on the machine by itself.
        self._token: str | bool = token or False

    # -- listing and range reads ---------------------------------------------------------------------

    def list_files(self, repo: str, revision: str = "main") -> list[RemoteFile]:
        """Every file of ``repo`` at ``revision`` with its size and LFS sha256 (offline: the cached snapshot)."""
        if self.offline:
            return self._list_cached(repo, revision)
        api = HfApi(endpoint=self.endpoint, token=self._token)
        try:
            entries = list(api.list_repo_tree(repo, revision=revision, recursive=True))
        except Exception as exc:
            raise self._convert(exc, repo, None, revision) from exc
        files = [
            RemoteFile(path=e.path, size=e.size, sha256=e.lfs.sha256 if e.lfs else None)
            for e in entries
            if isinstance(e, RepoFile)  # folders are listed too
        ]
        return sorted(files, key=lambda f: f.path)

    def read_range(
        self, repo: str, filename: str, revision: str = "main", start: int = 0, length: int = 65536
    ) -> bytes:
        """Bytes ``[start, start+length)`` of a file (fewer at the end of the file), without downloading the rest.

        Served from the cache when the file is already there, else with one HTTP Range request (following the
        Hub's redirect to its CDN, where the token is not sent).
        """
        if start < 0 or length <= 0:
            raise ValueError("read_range needs start >= 0 and length > 0")
        cached = self.local(repo, filename, revision, verify=False)
        if cached is not None:
            with cached.open("rb") as f:
                f.seek(start)
                return f.read(length)
        if self.offline:
            raise OfflineError(f"offline mode: {repo}/{filename}@{revision} is not in the cache at {self.cache_dir}")
        url = hf_hub_url(repo, filename, revision=revision, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token)
        headers["Range"] = f"bytes={start}-{start + length - 1}"
        headers["Accept-Encoding"] = "identity"
        try:
            with get_session().stream("GET", url, headers=headers, timeout=self.timeout_s) as response:
                if response.status_code == 416:  # start is at or past the end of the file
                    return b""
                if response.status_code >= 400:
                    response.read()
                hf_raise_for_status(response)
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= length:  # a server that ignored Range (200): stop early
                        break
                return bytes(data[:length])
        except Exception as exc:
            raise self._convert(exc, repo, filename, revision) from exc

    # -- cache lookups -------------------------------------------------------------------------------

    def local(self, repo: str, filename: str, revision: str = "main", *, verify: bool = True) -> Path | None:
        """The cached file for ``revision`` (branch, tag or commit), or ``None``; never touches the network.

        With ``verify`` (the default) the file is returned only when its content matches the blob's digest
        (checked once, then remembered). Without it nothing is hashed, but online a file that changed on disk
        since it was verified is not returned either: it cannot be trusted even for a header read, and the
        Hub can serve those bytes again (offline it is returned, so a header read can say what is wrong).
        """
        found = try_to_load_from_cache(repo, filename, cache_dir=self.cache_dir, revision=revision)
        if not isinstance(found, str) or not os.path.isfile(found):
            return None
        path = Path(found)
        blob = Path(os.path.realpath(path))
        if verify and not self._verified(repo, blob):
            return None
        if not verify and not self.offline and self._changed_since_verified(repo, blob):
            log.warning("cache_blob_changed", repo=repo, file=filename, blob=str(blob))
            return None
        return path

    # -- pull ----------------------------------------------------------------------------------------

    def pull(
        self,
        repo: str,
        filename: str,
        revision: str = "main",
        *,
        expected_sha256: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> LocalModel:
        """Make ``repo/filename@revision`` present and verified in the cache; return where it is.

        Resumes a partial download left by an earlier attempt (this process or a previous one), verifies the
        sha256 against ``expected_sha256`` or the Hub's LFS oid, and never leaves a half-written or unverified
        file where :meth:`local` would find it. Offline, or when the Hub is unreachable, a verified cached
        copy is returned without error.
        """
        started = time.monotonic()
        log.info("pull_started", repo=repo, file=filename, revision=revision)
        try:
            try:
                model = self._pull(repo, filename, revision, expected_sha256, progress)
            except OSError as exc:
                if isinstance(exc, HubError) or exc.errno not in _DISK_FULL:
                    raise
                # Out of space after the bytes landed (lock, verification record): still our disk-full error,
                # so the CLI and the daemon report it as such, not as an internal error with a traceback.
                raise DiskFullError(
                    f"disk full while writing {repo}/{filename} into the cache at {self.cache_dir}"
                    f"{f' ({exc.filename})' if exc.filename else ''}; free some space and pull again"
                ) from exc
        except HubError as exc:
            log.warning("pull_failed", repo=repo, file=filename, revision=revision, reason=exc.code, error=str(exc))
            raise
        seconds = time.monotonic() - started
        log.info(
            "pull_finished",
            repo=repo,
            file=filename,
            revision=revision,
            commit=model.commit,
            bytes=model.downloaded_bytes,
            size=model.size,
            from_cache=model.from_cache,
            seconds=round(seconds, 3),
            mb_per_s=round(model.downloaded_bytes / 1e6 / seconds, 2) if seconds > 0 else None,
        )
        return model

    def _pull(
        self,
        repo: str,
        filename: str,
        revision: str,
        expected_sha256: str | None,
        progress: ProgressCallback | None,
    ) -> LocalModel:
        expected = expected_sha256.lower() if expected_sha256 else None
        # A pinned commit that is already cached needs no network at all.
        if self.offline or _GIT_SHA1.fullmatch(revision):
            cached = self._cached_model(repo, filename, revision, expected)
            if cached is not None:
                return cached
            if self.offline:
                raise self._offline_error(repo, filename, revision)

        url = hf_hub_url(repo, filename, revision=revision, endpoint=self.endpoint)
        try:
            meta = get_hf_file_metadata(url, token=self._token, timeout=self.timeout_s, endpoint=self.endpoint)
        except Exception as exc:
            error = self._convert(exc, repo, filename, revision)
            if isinstance(error, HubUnreachableError):
                cached = self._cached_model(repo, filename, revision, expected)
                if cached is not None:
                    log.info("pull_cache_fallback", repo=repo, file=filename, revision=revision, error=str(exc))
                    return cached
            raise error from exc
        if meta.commit_hash is None or meta.etag is None or meta.size is None:
            raise HubError(f"{self.endpoint} did not send the file metadata (commit, etag, size) for {url}")

        etag = meta.etag
        digest_kind = "sha256" if _SHA256.fullmatch(etag) else "git-sha1" if _GIT_SHA1.fullmatch(etag) else None
        if expected is not None and digest_kind == "sha256" and expected != etag:
            raise ChecksumMismatchError(
                f"{repo}/{filename}@{revision}: the Hub says sha256 {etag}, the catalog expects {expected}"
            )
        storage = self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
        blob = storage / "blobs" / etag

        with self._lock(repo, etag):
            pointer = storage / "snapshots" / meta.commit_hash / filename
            downloaded = 0
            if blob.is_file() and not self._verified(repo, blob, expected):
                log.warning("cache_blob_corrupt", repo=repo, file=filename, blob=str(blob))
                blob.unlink()
                pointer.unlink(missing_ok=True)
            if not blob.is_file():
                job = _Job(
                    repo=repo,
                    filename=filename,
                    revision=revision,
                    location=meta.location,
                    resolve_url=url,
                    blob=blob,
                    size=meta.size,
                    digest_kind=digest_kind,
                    expected=expected,
                    progress=progress,
                )
                downloaded = self._download(job)
        # huggingface_hub writes refs/ and snapshots/ (the blob exists, so it transfers nothing).
        try:
            path = hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self._token,
                etag_timeout=self.timeout_s,
            )
        except Exception as exc:
            raise self._convert(exc, repo, filename, revision) from exc
        if os.path.realpath(path) != os.path.realpath(blob):
            # The branch moved between our metadata request and huggingface_hub's: not what we verified.
            raise HubError(f"{repo}@{revision} changed while pulling {filename}; pull again")
        return LocalModel(
            repo=repo,
            filename=filename,
            revision=revision,
            commit=meta.commit_hash,
            path=Path(path),
            size=meta.size,
            sha256=etag if digest_kind == "sha256" else expected,
            downloaded_bytes=downloaded,
            from_cache=downloaded == 0,
        )

    def _offline_error(self, repo: str, filename: str, revision: str) -> OfflineError:
        """Why an offline pull cannot be served from the cache: the file is missing, or its copy is damaged."""
        damaged = self.local(repo, filename, revision, verify=False)
        if damaged is None:
            return OfflineError(
                f"offline mode: {repo}/{filename}@{revision} is not in the cache at {self.cache_dir}; "
                "pull it once with network access or turn offline mode off"
            )
        blob = os.path.realpath(damaged)
        log.warning("cache_blob_corrupt", repo=repo, file=filename, blob=blob)
        return OfflineError(
            f"offline mode: the cached {repo}/{filename}@{revision} ({blob}) does not match its sha256 "
            "(changed on disk after download) and is not used; pull it again with network access or turn "
            "offline mode off"
        )

    def _cached_model(self, repo: str, filename: str, revision: str, expected: str | None) -> LocalModel | None:
        path = self.local(repo, filename, revision)
        if path is None:
            return None
        blob = Path(os.path.realpath(path))
        if expected is not None and not self._verified(repo, blob, expected):
            return None
        commit = path.parent.name if _GIT_SHA1.fullmatch(path.parent.name) else None
        return LocalModel(
            repo=repo,
            filename=filename,
            revision=revision,
            commit=commit,
            path=path,
            size=blob.stat().st_size,
            sha256=blob.name if _SHA256.fullmatch(blob.name) else expected,
            downloaded_bytes=0,
            from_cache=True,
        )

    # -- transfer ------------------------------------------------------------------------------------

    def _download(self, job: _Job) -> int:
        """Fetch ``job`` into its partial file with Range resume, verify, rename into the blob; return bytes fetched."""
        job.blob.parent.mkdir(parents=True, exist_ok=True)
        partial = job.partial
        have = partial.stat().st_size if partial.exists() else 0
        if have > job.size:
            partial.unlink()
            have = 0
        self._check_disk(job.blob.parent, job.size - have)
        hasher = job.new_hasher()
        if have:
            log.info("pull_resumed", repo=job.repo, file=job.filename, offset=have, size=job.size)
            hasher.update_from_file(partial)
        try:
            with partial.open("ab") as out:
                fetched = self._transfer(job, out, have, hasher)
                out.flush()
                os.fsync(out.fileno())
                have = out.tell()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while downloading {job.repo}/{job.filename} into {job.blob.parent}; the partial "
                    "file is kept, free some space and pull again"
                ) from exc
            raise
        actual = hasher.hexdigest()
        wanted = job.wanted_digest
        if have != job.size or (wanted is not None and actual != wanted):
            partial.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{job.repo}/{job.filename}@{job.revision}: downloaded {have} bytes with digest {actual}, "
                f"expected {job.size} bytes with digest {wanted}; the download was deleted, pull again"
            )
        os.replace(partial, job.blob)
        _fsync_dir(job.blob.parent)
        self._remember_verified(job.repo, job.blob, actual)
        return fetched

    def _transfer(self, job: _Job, out: BinaryIO, have: int, hasher: _Hasher) -> int:
        """GET until the partial file holds ``job.size`` bytes, resuming after dropped connections."""
        # Auth only goes to the Hub itself, never to the CDN a Hub redirect points at.
        headers = build_hf_headers(token=self._token if _same_origin(job.location, job.resolve_url) else False)
        headers["Accept-Encoding"] = "identity"
        fetched = 0
        attempts = 0
        while have < job.size:
            try:
                fetched += self._fetch_once(job, out, headers, have, hasher)
            except _RangeIgnoredError:
                # The server answered a resume with the whole file: start over from byte 0.
                out.seek(0)
                out.truncate()
                hasher.reset()
            except httpx2.TransportError as exc:
                out.flush()
                os.fsync(out.fileno())
                fetched += out.tell() - have
                attempts = 1 if out.tell() > have else attempts + 1  # progress made: a flaky link, not a dead one
                if attempts > self.retries:
                    raise HubUnreachableError(
                        f"download of {job.repo}/{job.filename} interrupted at {out.tell()}/{job.size} bytes ({exc}); "
                        "the partial file is kept and the next pull resumes from there"
                    ) from exc
                log.info(
                    "pull_retry", repo=job.repo, file=job.filename, offset=out.tell(), attempt=attempts, error=str(exc)
                )
                time.sleep(self.retry_wait_s)
            except HubError:
                raise
            except hf_errors.HfHubHTTPError as exc:  # HTTP errors are OSErrors too: convert them first
                raise self._convert(exc, job.repo, job.filename, job.revision) from exc
            # Any other OSError is local (disk): the caller turns ENOSPC into DiskFullError.
            have = out.tell()
        return fetched

    def _fetch_once(self, job: _Job, out: BinaryIO, headers: dict[str, str], have: int, hasher: _Hasher) -> int:
        """One GET from offset ``have``, appended to ``out`` and ``hasher``; returns the bytes received."""
        request_headers = dict(headers)
        if have:
            request_headers["Range"] = f"bytes={have}-"
        got = 0
        since_sync = 0
        with get_session().stream("GET", job.location, headers=request_headers, timeout=self.timeout_s) as response:
            if response.status_code >= 400:
                response.read()
            hf_raise_for_status(response)
            if have and response.status_code != 206:
                raise _RangeIgnoredError
            for chunk in response.iter_bytes():
                if have + got + len(chunk) > job.size:
                    raise HubError(f"{job.location} sent more than the announced {job.size} bytes")
                out.write(chunk)
                hasher.update(chunk)
                got += len(chunk)
                since_sync += len(chunk)
                if since_sync >= _FSYNC_EVERY:
                    out.flush()
                    os.fsync(out.fileno())
                    since_sync = 0
                if job.progress is not None:
                    job.progress(have + got, job.size)
        return got

    # -- helpers -------------------------------------------------------------------------------------

    def _check_disk(self, directory: Path, needed: int) -> None:
        probe = directory
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < needed + self.min_free_bytes:
            raise DiskFullError(
                f"not enough disk space in {directory}: the download needs {_human(needed)}"
                + (f" plus the {_human(self.min_free_bytes)} reserve" if self.min_free_bytes else "")
                + f", {_human(free)} is free; free some space or move the HF cache"
            )

    @contextmanager
    def _lock(self, repo: str, etag: str) -> Iterator[None]:
        lock_dir = self.cache_dir / ".edge-agent" / "locks" / repo_folder_name(repo_id=repo, repo_type="model")
        lock_dir.mkdir(parents=True, exist_ok=True)
        with (lock_dir / f"{etag}.lock").open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _marker(self, repo: str, blob: Path) -> Path:
        folder = repo_folder_name(repo_id=repo, repo_type="model")
        return self.cache_dir / ".edge-agent" / "verified" / folder / f"{blob.name}.json"

    def _remember_verified(self, repo: str, blob: Path, digest: str) -> None:
        marker = self._marker(repo, blob)
        marker.parent.mkdir(parents=True, exist_ok=True)
        st = blob.stat()
        tmp = marker.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
            os.replace(tmp, marker)
        except OSError:
            tmp.unlink(missing_ok=True)  # the blob stays; without a record it is hashed again next time
            raise

    def _changed_since_verified(self, repo: str, blob: Path) -> bool:
        """True when ``blob`` was verified once and its size or mtime differs now (a stat, no hashing)."""
        try:
            seen = json.loads(self._marker(repo, blob).read_text())
            st = blob.stat()
            return bool(seen["size"] != st.st_size or seen["mtime_ns"] != st.st_mtime_ns)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # never verified by us (or the marker is damaged): nothing to compare with

    def _verified(self, repo: str, blob: Path, expected: str | None = None) -> bool:
        """Whether ``blob`` matches its digest (its name) and ``expected``; hashes only if not remembered."""
        try:
            st = blob.stat()
        except OSError:
            return False
        marker = self._marker(repo, blob)
        try:
            seen = json.loads(marker.read_text())
            if seen["size"] == st.st_size and seen["mtime_ns"] == st.st_mtime_ns:
                return expected is None or seen["digest"] == expected
        except (OSError, ValueError, KeyError, TypeError):
            pass
        kind = "sha256" if _SHA256.fullmatch(blob.name) else "git-sha1" if _GIT_SHA1.fullmatch(blob.name) else None
        if kind is None and expected is None:
            return False  # a blob name that is no digest: nothing to check it against
        hasher = _new_hasher(kind, expected, st.st_size)
        hasher.update_from_file(blob)
        digest = hasher.hexdigest()
        if digest != (expected or blob.name):
            return False
        self._remember_verified(repo, blob, digest)
        return True

    def _list_cached(self, repo: str, revision: str) -> list[RemoteFile]:
        storage = self.cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
        commit = revision
        ref = storage / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
        snapshot = storage / "snapshots" / commit
        if not snapshot.is_dir():
            raise OfflineError(f"offline mode: no cached snapshot of {repo}@{revision} in {self.cache_dir}")
        files = []
        for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
            blob = Path(os.path.realpath(path))
            files.append(
                RemoteFile(
                    path=path.relative_to(snapshot).as_posix(),
                    size=blob.stat().st_size,
                    sha256=blob.name if _SHA256.fullmatch(blob.name) else None,
                )
            )
        return files

    def _convert(  # noqa: PLR0911 - one return per error category reads better than a lookup table
        self, exc: BaseException, repo: str, filename: str | None, revision: str
    ) -> HubError:
        """Turn a huggingface_hub / HTTP / OS error into our own, with a message that says what to do."""
        what = f"{repo}/{filename}@{revision}" if filename else f"{repo}@{revision}"
        if isinstance(exc, HubError):
            return exc
        if isinstance(exc, hf_errors.GatedRepoError):
            status = exc.response.status_code if exc.response is not None else None
            hint = (
                "set a token (config [hub] token, the systemd credential 'hf_token' or HF_TOKEN)"
                if self._token is False
                else "the token's account has not been granted access"
            )
            return GatedRepoError(
                f"{repo} is a gated repo (HTTP {status}): accept its licence at {self.endpoint}/{repo} and {hint}"
            )
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            return NotFoundOnHubError(f"revision {revision!r} not found in {repo} on {self.endpoint}")
        if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
            return NotFoundOnHubError(f"file {filename!r} not found in {repo}@{revision} on {self.endpoint}")
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return NotFoundOnHubError(
                f"repo {repo} not found on {self.endpoint} (or it is private and the token cannot see it)"
            )
        if isinstance(exc, hf_errors.OfflineModeIsEnabled) or (
            self.offline and isinstance(exc, hf_errors.LocalEntryNotFoundError)
        ):
            # OfflineModeIsEnabled: HF_HUB_OFFLINE was set when huggingface_hub was imported.
            return OfflineError(f"{what} is not in the cache at {self.cache_dir} and the Hub may not be used: {exc}")
        if isinstance(exc, hf_errors.LocalEntryNotFoundError):
            return HubUnreachableError(f"cannot reach {self.endpoint} for {what} and it is not cached: {exc}")
        if isinstance(exc, hf_errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                return HubAuthError(f"the Hub refused access to {what} (HTTP {status}); check the token")
            if status is not None and status >= 500:
                return HubUnreachableError(f"the Hub failed for {what} (HTTP {status}); try again later")
            return HubError(f"the Hub answered HTTP {status} for {what}: {exc}")
        if isinstance(exc, httpx2.TransportError | hf_errors.FileMetadataError):
            return HubUnreachableError(f"cannot reach {self.endpoint} for {what}: {exc}")
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return DiskFullError(f"disk full while writing {what} to {self.cache_dir}; free some space and pull again")
        return HubError(f"unexpected error for {what}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Job:
    """One file transfer: where from, where to, and what its bytes must hash to."""

    repo: str
    filename: str
    revision: str
    location: str
    """Where the bytes are (the Hub's resolve URL, or the CDN URL it redirects to)."""
    resolve_url: str
    blob: Path
    size: int
    digest_kind: str | None
    expected: str | None
    progress: ProgressCallback | None

    @property
    def partial(self) -> Path:
        return self.blob.with_name(self.blob.name + PARTIAL_SUFFIX)

    @property
    def wanted_digest(self) -> str | None:
        return self.expected or (self.blob.name if self.digest_kind else None)

    def new_hasher(self) -> _Hasher:
        return _new_hasher(self.digest_kind, self.expected, self.size)


class _RangeIgnoredError(Exception):
    """A resume request was answered with the whole file instead of 206 Partial Content."""


# -- digests -----------------------------------------------------------------------------------------


class _Hasher:
    """sha256 of the content (LFS files), or git's blob id (small files kept in git)."""

    def __init__(self, kind: str | None, size: int) -> None:
        self._kind = kind
        self._size = size
        self.reset()

    def reset(self) -> None:
        """Forget everything hashed so far."""
        self._h = hashlib.sha1(usedforsecurity=False) if self._kind == "git-sha1" else hashlib.sha256()
        if self._kind == "git-sha1":
            self._h.update(b"blob %d\0" % self._size)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def update_from_file(self, path: Path) -> None:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                self._h.update(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _new_hasher(kind: str | None, expected: str | None, size: int) -> _Hasher:
    # An expected sha256 from the catalog wins over the kind the etag suggests.
    return _Hasher("sha256" if expected is not None else kind, size)


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
