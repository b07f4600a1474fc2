"""A small Hugging Face Hub look-alike on loopback, for driving the real ``huggingface_hub`` client in tests.

It serves model repos held in memory with the endpoints, headers and JSON the real client (2.4) reads:

* ``GET /api/models/{repo}[/revision/{rev}]`` - model info; ``?blobs=true`` adds size, blobId and lfs per
  sibling (what ``HfApi.model_info(files_metadata=True)`` asks for).
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` - tree listing (``recursive``), with ``lfs.oid`` = sha256.
* ``HEAD|GET /{repo}/resolve/{rev}/{file}`` - ``X-Repo-Commit``, ``ETag`` (quoted sha256 for LFS files, the
  git blob id otherwise), ``X-Linked-Etag``/``X-Linked-Size`` for LFS, ``Content-Length``,
  ``Accept-Ranges``; ``Range: bytes=a-b`` gives 206 with ``Content-Range``. Like the real Hub, LFS files
  can be redirected (302) to a second "CDN" server on another port, so the client must not forward its
  token there (``redirect_lfs=True``).
* Errors with the ``X-Error-Code`` header the client turns into typed errors: ``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound`` (with ``X-Repo-Commit``), ``GatedRepo`` (401 without a token,
  403 with a token that is not on the repo's allow list).

Never sends Xet headers, so the client always takes the plain HTTP download path.

Fault injection (per file path, for resume and checksum tests): :meth:`FakeHub.drop_after` closes the
connection after N body bytes, :meth:`FakeHub.corrupt` flips a byte in what is served while the headers
keep the true sha256, ``throttle_bps`` slows every body. Every request is recorded
(:attr:`FakeHub.log`) so tests can count GETs, ranges and bytes sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".bin", ".safetensors")
"""Files with these suffixes (or larger than ``LFS_MIN_SIZE``) are stored "in LFS", like on the Hub."""
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as ``oid``/``blobId``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class FakeFile:
    """One file at one commit."""

    path: str
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def etag(self) -> str:
        """The Hub's ETag: the sha256 for LFS files, the git blob id for regular ones."""
        return self.sha256 if self.lfs else git_blob_id(self.data)

    def tree_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "oid": git_blob_id(self.pointer() if self.lfs else self.data),
            "size": len(self.data),
            "path": self.path,
        }
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer())}
        return entry

    def pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()


@dataclass
class FakeRepo:
    """A model repo: commits (oldest first) and refs (branch/tag name -> commit id)."""

    repo_id: str
    commits: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    allowed_tokens: frozenset[str] = frozenset()

    def resolve(self, revision: str) -> str | None:
        """Commit id for a branch, tag, full or abbreviated (>= 7 chars) commit id."""
        if revision in self.refs:
            return self.refs[revision]
        if revision in self.commits:
            return revision
        if len(revision) >= 7:
            matches = [c for c in self.commits if c.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it."""

    method: str
    path: str
    status: int
    range: str | None
    authorization: str | None
    body_bytes: int
    server: str  # "hub" or "cdn"


@dataclass
class _Drop:
    after_bytes: int
    times: int


class FakeHub:
    """A Hub-compatible HTTP server on 127.0.0.1 (plus a "CDN" server), started with ``with FakeHub() as hub``."""

    def __init__(self, *, redirect_lfs: bool = True, throttle_bps: int | None = None) -> None:
        self.redirect_lfs = redirect_lfs
        self.throttle_bps = throttle_bps
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[RequestRecord] = []
        self._drops: dict[str, _Drop] = {}
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.cdn_endpoint = ""

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub_server = self._make_server("hub")
        cdn_server = self._make_server("cdn")
        self.endpoint = f"http://127.0.0.1:{hub_server.server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        for server in (hub_server, cdn_server):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _make_server(self, name: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            fake_hub = hub
            server_name = name

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server

    # -- content -----------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | Path],
        *,
        gated: bool = False,
        allowed_tokens: tuple[str, ...] = (),
        ref: str = "main",
    ) -> str:
        """Create ``repo_id`` with one commit holding ``files``; returns the commit id."""
        self.repos[repo_id] = FakeRepo(repo_id, gated=gated, allowed_tokens=frozenset(allowed_tokens))
        return self.commit(repo_id, files, ref=ref)

    def commit(self, repo_id: str, files: Mapping[str, bytes | Path], *, ref: str = "main") -> str:
        """Add a commit on top of ``ref`` that writes ``files`` (others unchanged); moves ``ref`` to it."""
        repo = self.repos[repo_id]
        previous = dict(repo.commits[repo.refs[ref]]) if ref in repo.refs else {}
        for path, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else bytes(content)
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
            previous[path] = FakeFile(path, data, lfs)
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(repo_id.encode() + str(len(repo.commits)).encode())
        for path in sorted(previous):
            digest.update(path.encode() + previous[path].sha256.encode())
        commit_id = digest.hexdigest()
        repo.commits[commit_id] = previous
        repo.refs[ref] = commit_id
        return commit_id

    def file(self, repo_id: str, path: str, revision: str = "main") -> FakeFile:
        repo = self.repos[repo_id]
        commit_id = repo.resolve(revision)
        assert commit_id is not None
        return repo.commits[commit_id][path]

    # -- faults ------------------------------------------------------------------------------------

    def drop_after(self, path: str, after_bytes: int, *, times: int = 1) -> None:
        """The next ``times`` GETs of file ``path`` close the connection after ``after_bytes`` body bytes."""
        with self._lock:
            self._drops[path] = _Drop(after_bytes, times)

    def corrupt(self, path: str, enabled: bool = True) -> None:
        """Serve ``path`` with one byte flipped, while the headers still announce the true sha256."""
        with self._lock:
            if enabled:
                self._corrupt.add(path)
            else:
                self._corrupt.discard(path)

    # -- inspection --------------------------------------------------------------------------------

    def requests(self, method: str | None = None, path_contains: str = "") -> list[RequestRecord]:
        """Recorded requests, filtered by method and a substring of the URL path."""
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and path_contains in unquote(r.path)]

    def file_gets(self, filename: str) -> list[RequestRecord]:
        """GETs that transferred (part of) the content of ``filename`` (resolve or CDN)."""
        return [r for r in self.requests("GET", filename) if "/api/" not in r.path]

    def bytes_sent(self, filename: str) -> int:
        """Body bytes sent for ``filename`` over all GETs."""
        return sum(r.body_bytes for r in self.file_gets(filename))

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.log.append(record)

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            drop = self._drops.get(path)
            if drop is None or drop.times <= 0:
                return None
            drop.times -= 1
            return drop.after_bytes

    def _is_corrupt(self, path: str) -> bool:
        with self._lock:
            return path in self._corrupt


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<path>/.*)?)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<commit>[0-9a-f]{40})/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    fake_hub: FakeHub
    server_name: str

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet; the request log is in ``FakeHub.log``."""

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- routing -----------------------------------------------------------------------------------

    def _dispatch(self, *, head: bool) -> None:
        self._status = 0
        self._sent = 0
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if self.server_name == "cdn":
                match = _CDN.match(path)
                if match is None:
                    self._error(404, "EntryNotFound", "no such object", head=head)
                else:
                    self._serve_cdn(match, head=head)
            elif (match := _API.match(path)) is not None:
                self._serve_api(match, query, head=head)
            elif (match := _RESOLVE.match(path)) is not None:
                self._serve_resolve(match, head=head)
            else:
                self._error(404, None, "not a Hub route", head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.fake_hub._record(
                RequestRecord(
                    method="HEAD" if head else "GET",
                    path=self.path,
                    status=self._status,
                    range=self.headers.get("Range"),
                    authorization=self.headers.get("Authorization"),
                    body_bytes=self._sent,
                    server=self.server_name,
                )
            )

    def _repo(self, repo_id: str, *, head: bool) -> FakeRepo | None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    def _commit(self, repo: FakeRepo, revision: str, *, head: bool) -> str | None:
        commit_id = repo.resolve(revision)
        if commit_id is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head=head)
        return commit_id

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    # -- endpoints ---------------------------------------------------------------------------------

    def _serve_api(self, match: re.Match[str], query: dict[str, str], *, head: bool) -> None:
        repo = self._repo(match["repo"], head=head)
        if repo is None:
            return
        commit_id = self._commit(repo, match["rev"] or "main", head=head)
        if commit_id is None:
            return
        files = repo.commits[commit_id]
        if match["kind"] == "tree":
            prefix = (match["path"] or "").strip("/")
            recursive = query.get("recursive", "false").lower() == "true"
            self._json(200, _tree(files, prefix, recursive=recursive), head=head)
            return
        blobs = query.get("blobs", "false").lower() == "true"
        siblings = []
        for f in files.values():
            sibling: dict[str, object] = {"rfilename": f.path}
            if blobs:
                sibling["size"] = len(f.data)
                sibling["blobId"] = git_blob_id(f.pointer() if f.lfs else f.data)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer())}
            siblings.append(sibling)
        info = {
            "_id": hashlib.md5(repo.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit_id,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": ["gguf"],
            "library_name": "gguf",
            "siblings": siblings,
        }
        self._json(200, info, head=head)

    def _serve_resolve(self, match: re.Match[str], *, head: bool) -> None:
        repo = self._repo(match["repo"], head=head)
        if repo is None:
            return
        if repo.gated and self._token() not in repo.allowed_tokens:
            if self._token() is None:
                status, message = (
                    401,
                    (
                        f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in."
                    ),
                )
            else:
                status, message = (
                    403,
                    (
                        f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                        f"Visit {self.fake_hub.endpoint}/{repo.repo_id} to ask for access."
                    ),
                )
            self._error(status, "GatedRepo", message, head=head)
            return
        commit_id = self._commit(repo, match["rev"], head=head)
        if commit_id is None:
            return
        f = repo.commits[commit_id].get(match["path"])
        if f is None:
            self._error(404, "EntryNotFound", "Entry not found", head=head, extra={"X-Repo-Commit": commit_id})
            return
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{f.etag}"'}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(len(f.data))
        if f.lfs and self.fake_hub.redirect_lfs:
            location = f"{self.fake_hub.cdn_endpoint}/cdn/{repo.repo_id}/{commit_id}/{quote(f.path)}"
            self._status = 302
            self.send_response(302)
            for key, value in {**headers, "Location": location, "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._send_file(f, headers, head=head)

    def _serve_cdn(self, match: re.Match[str], *, head: bool) -> None:
        repo = self.fake_hub.repos.get(match["repo"])
        f = repo.commits.get(match["commit"], {}).get(match["path"]) if repo else None
        if f is None:
            self._error(404, None, "no such object", head=head)
            return
        self._send_file(f, {"ETag": f'"{f.sha256}"'}, head=head)

    # -- responses ---------------------------------------------------------------------------------

    def _send_file(self, f: FakeFile, headers: dict[str, str], *, head: bool) -> None:
        data = f.data
        if self.fake_hub._is_corrupt(f.path) and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        start, end = 0, len(data) - 1
        status = 200
        range_header = self.headers.get("Range")
        if range_header and (m := _RANGE.match(range_header.strip())) is not None:
            first, last = m.group(1), m.group(2)
            if first == "":  # suffix range: the last N bytes
                start = max(len(data) - int(last), 0)
            else:
                start = int(first)
                if last:
                    end = min(int(last), len(data) - 1)
            if start >= len(data) or start > end:
                self._status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start : end + 1]
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if head:
            return
        drop_at = self.fake_hub._take_drop(f.path)
        self._write_body(body, drop_at)

    def _write_body(self, body: bytes, drop_at: int | None) -> None:
        limit = len(body) if drop_at is None else min(drop_at, len(body))
        chunk = 16 * 1024
        bps = self.fake_hub.throttle_bps
        for offset in range(0, limit, chunk):
            piece = body[offset : min(offset + chunk, limit)]
            self.wfile.write(piece)
            self._sent += len(piece)
            if bps:
                self.wfile.flush()
                time.sleep(len(piece) / bps)
        self.wfile.flush()
        if drop_at is not None and drop_at < len(body):
            # Simulate a network cut: the client has been promised Content-Length bytes and gets fewer.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, status: int, payload: object, *, head: bool) -> None:
        body = json.dumps(payload).encode()
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        head: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self._status = status
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _tree(files: Mapping[str, FakeFile], prefix: str, *, recursive: bool) -> list[dict[str, object]]:
    """Tree entries under ``prefix`` (files, and folders derived from the paths)."""
    entries: dict[str, dict[str, object]] = {}
    base = f"{prefix}/" if prefix else ""
    for path, f in sorted(files.items()):
        if not path.startswith(base):
            continue
        rest = path[len(base) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = base + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_id(folder.encode()), "path": folder})
            if not recursive:
                break
        if recursive or len(parts) == 1:
            entries[path] = f.tree_entry()
    return list(entries.values())


def iter_bytes(seed: int, size: int) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes in 64 KiB pieces (fast, no numpy needed)."""
    counter = 0
    produced = 0
    while produced < size:
        block = hashlib.sha512(b"%d:%d" % (seed, counter)).digest() * 1024  # 64 KiB
        take = block[: size - produced]
        produced += len(take)
        counter += 1
        yield take


def random_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic pseudo-random bytes."""
    return b"".join(iter_bytes(seed, size))
