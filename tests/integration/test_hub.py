"""HubStore against a Hub look-alike on loopback, driven through the real huggingface_hub client.

The fake Hub (tests/support/fake_hub.py) serves tiny real GGUF files with the Hub's headers, redirects
LFS files to a second "CDN" port like the real Hub, and can drop connections or corrupt bytes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from structlog.testing import capture_logs

from agent.catalog.hub import (
    DEFAULT_CACHE_DIR,
    PARTIAL_SUFFIX,
    ChecksumMismatchError,
    DiskFullError,
    GatedRepoError,
    HubStore,
    HubUnreachableError,
    NotFoundOnHubError,
    OfflineError,
    RemoteFile,
    resolve_cache_dir,
    resolve_endpoint,
    resolve_offline,
    resolve_token,
)
from tests.support.fake_hub import FakeHub, random_bytes
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.integration

REPO = "acme/tiny-llama-GGUF"
GGUF = "tiny-llama-F32.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD_TOKEN = "hf_good"  # noqa: S105 - a made-up token the fake Hub allows on its gated repo
OTHER_TOKEN = "hf_other"  # noqa: S105 - a made-up token it does not allow


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real tiny GGUF (~570 KB), so range reads see a real header."""
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / GGUF, tensor_type="F32").read_bytes()


@pytest.fixture
def hub(gguf_bytes: bytes) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(REPO, {GGUF: gguf_bytes, "README.md": b"# tiny\n", "sub/notes.txt": b"notes"})
        yield fake


@pytest.fixture
def make_store(tmp_path: Path, hub: FakeHub) -> Callable[..., HubStore]:
    def make(**overrides: object) -> HubStore:
        options: dict[str, object] = {
            "cache_dir": tmp_path / "hf-cache",
            "endpoint": hub.endpoint,
            "retries": 3,
            "retry_wait_s": 0.01,
            "timeout_s": 10.0,
        }
        options.update(overrides)
        return HubStore(**options)  # type: ignore[arg-type]

    return make


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blobs_dir(cache_dir: Path, repo: str = REPO) -> Path:
    return cache_dir / ("models--" + repo.replace("/", "--")) / "blobs"


# -- pull ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("redirect_lfs", [True, False], ids=["cdn-redirect", "direct"])
def test_pull_downloads_verifies_and_lands_in_the_standard_hf_cache(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes, redirect_lfs: bool
) -> None:
    """A pull stores the file in the HF cache layout, so huggingface_hub itself finds it offline."""
    hub.redirect_lfs = redirect_lfs
    store = make_store()
    model = store.pull(REPO, GGUF)
    assert model.path.read_bytes() == gguf_bytes
    assert model.sha256 == sha256(gguf_bytes)
    assert model.size == len(gguf_bytes)
    assert model.downloaded_bytes == len(gguf_bytes)
    assert not model.from_cache
    assert model.commit == hub.repos[REPO].refs["main"]
    same = hf_hub_download(REPO, GGUF, cache_dir=store.cache_dir, local_files_only=True)
    assert Path(same) == model.path
    assert store.local(REPO, GGUF) == model.path


def test_second_pull_is_a_cache_hit_without_downloading(hub: FakeHub, make_store: Callable[..., HubStore]) -> None:
    """Pulling a file that is already present and verified makes metadata requests only, no GET of the file."""
    store = make_store()
    store.pull(REPO, GGUF)
    hub.reset_log()
    again = make_store().pull(REPO, GGUF)
    assert again.from_cache
    assert again.downloaded_bytes == 0
    assert hub.file_gets(GGUF) == []


def test_small_git_file_is_verified_by_its_git_blob_id(hub: FakeHub, make_store: Callable[..., HubStore]) -> None:
    """Files kept in git (no LFS sha256) are checked against their git object id instead."""
    model = make_store().pull(REPO, "README.md")
    assert model.path.read_bytes() == b"# tiny\n"
    assert model.sha256 is None


def test_pull_resumes_after_the_server_drops_the_connection(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """A connection cut mid-file is resumed with a Range request instead of starting over."""
    hub.drop_after(GGUF, 200_000)
    with capture_logs() as logs:
        model = make_store().pull(REPO, GGUF)
    assert model.path.read_bytes() == gguf_bytes
    gets = hub.file_gets(GGUF)
    assert [g.range for g in gets] == [None, "bytes=200000-"]
    assert gets[1].status == 206
    assert hub.bytes_sent(GGUF) == len(gguf_bytes)  # nothing fetched twice
    assert [e["event"] for e in logs if e["event"] == "pull_retry"] == ["pull_retry"]


def test_interrupted_pull_resumes_from_its_partial_file_in_a_new_store(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """When retries run out the partial file is kept (and is not 'present'); the next store resumes it."""
    hub.drop_after(GGUF, 150_000, times=5)
    first = make_store(retries=0)
    with pytest.raises(HubUnreachableError, match="150000/"):
        first.pull(REPO, GGUF)
    assert first.local(REPO, GGUF) is None
    partial = blobs_dir(first.cache_dir) / (sha256(gguf_bytes) + PARTIAL_SUFFIX)
    assert partial.stat().st_size == 150_000

    hub.drop_after(GGUF, 0, times=0)
    hub.reset_log()
    model = make_store().pull(REPO, GGUF)
    assert model.path.read_bytes() == gguf_bytes
    assert model.downloaded_bytes == len(gguf_bytes) - 150_000
    assert [g.range for g in hub.file_gets(GGUF)] == ["bytes=150000-"]
    assert not partial.exists()


def test_pull_resumes_after_the_pulling_process_is_killed(
    tmp_path: Path, hub: FakeHub, make_store: Callable[..., HubStore]
) -> None:
    """A pull SIGKILLed mid-file continues from the bytes already on disk in the next process."""
    data = random_bytes(1_500_000, seed=7)
    hub.commit(REPO, {"big-Q8_0.gguf": data})
    hub.throttle_bps = 400_000
    cache_dir = tmp_path / "hf-cache"
    partial = blobs_dir(cache_dir) / (sha256(data) + PARTIAL_SUFFIX)
    code = (
        "from pathlib import Path; from agent.catalog.hub import HubStore; "
        f"HubStore(cache_dir=Path({str(cache_dir)!r}), endpoint={hub.endpoint!r}).pull({REPO!r}, 'big-Q8_0.gguf')"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= 300_000):
            assert time.monotonic() < deadline, "the child never started writing"
            assert child.poll() is None, "the child exited before it was killed"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    kept = partial.stat().st_size
    assert 0 < kept < len(data)

    # The server logs a request when its handler ends: wait for the killed transfer's broken pipe, so
    # its record does not land in the log after the reset.
    deadline = time.monotonic() + 10
    while not any(g.range is None and g.body_bytes for g in hub.file_gets("big-Q8_0.gguf")) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    hub.throttle_bps = None
    hub.reset_log()
    model = make_store(cache_dir=cache_dir).pull(REPO, "big-Q8_0.gguf")
    assert model.path.read_bytes() == data
    gets = hub.file_gets("big-Q8_0.gguf")
    assert [g.range for g in gets] == [f"bytes={kept}-"]
    assert hub.bytes_sent("big-Q8_0.gguf") == len(data) - kept


def test_corrupted_download_is_deleted_and_never_present(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """Bytes that do not hash to the Hub's LFS oid raise, leave no blob, partial or snapshot entry behind."""
    hub.corrupt(GGUF)
    store = make_store()
    with capture_logs() as logs, pytest.raises(ChecksumMismatchError) as caught:
        store.pull(REPO, GGUF)
    assert caught.value.code == "hub_checksum_mismatch"
    assert store.local(REPO, GGUF) is None
    assert list(blobs_dir(store.cache_dir).iterdir()) == []
    assert not (store.cache_dir / ("models--" + REPO.replace("/", "--")) / "snapshots").exists()
    failed = [e for e in logs if e["event"] == "pull_failed"]
    assert failed[0]["reason"] == "hub_checksum_mismatch"

    hub.corrupt(GGUF, enabled=False)
    assert store.pull(REPO, GGUF).path.read_bytes() == gguf_bytes


def test_expected_sha256_that_disagrees_with_the_hub_fails_before_downloading(
    hub: FakeHub, make_store: Callable[..., HubStore]
) -> None:
    """A catalog pin that the Hub contradicts is refused without transferring the file."""
    with pytest.raises(ChecksumMismatchError, match="catalog expects"):
        make_store().pull(REPO, GGUF, expected_sha256="0" * 64)
    assert hub.file_gets(GGUF) == []


def test_pull_refuses_when_the_disk_is_too_small(hub: FakeHub, make_store: Callable[..., HubStore]) -> None:
    """Free space is checked against the file size (plus the reserve) before any byte is fetched."""
    store = make_store(min_free_bytes=1 << 62)
    with pytest.raises(DiskFullError, match="not enough disk space") as caught:
        store.pull(REPO, GGUF)
    assert isinstance(caught.value, OSError)
    assert caught.value.code == "disk_full"
    assert hub.file_gets(GGUF) == []


def test_pull_reports_progress_up_to_the_file_size(make_store: Callable[..., HubStore], gguf_bytes: bytes) -> None:
    """The progress callback sees growing byte counts ending at the total."""
    seen: list[tuple[int, int]] = []
    make_store().pull(REPO, GGUF, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(gguf_bytes), len(gguf_bytes))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_pull_logs_started_and_finished_with_throughput(make_store: Callable[..., HubStore], gguf_bytes: bytes) -> None:
    """pull_started and pull_finished (bytes, seconds, MB/s) are logged with stable keys."""
    with capture_logs() as logs:
        make_store().pull(REPO, GGUF)
    events = {e["event"]: e for e in logs}
    assert events["pull_started"]["repo"] == REPO
    finished = events["pull_finished"]
    assert finished["bytes"] == len(gguf_bytes)
    assert finished["seconds"] >= 0
    assert "mb_per_s" in finished


# -- revisions -------------------------------------------------------------------------------------------


def test_revision_pin_gets_the_pinned_bytes_and_needs_no_network_once_cached(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """A commit pin downloads that commit's file even after main moved, and a cached pin makes no request."""
    old_commit = hub.repos[REPO].refs["main"]
    newer = random_bytes(50_000, seed=3)
    hub.commit(REPO, {GGUF: newer})
    store = make_store()
    assert store.pull(REPO, GGUF).path.read_bytes() == newer
    pinned = store.pull(REPO, GGUF, revision=old_commit)
    assert pinned.path.read_bytes() == gguf_bytes
    assert pinned.commit == old_commit
    hub.reset_log()
    assert store.pull(REPO, GGUF, revision=old_commit).from_cache
    assert hub.log == []


def test_unknown_revision_is_not_found(make_store: Callable[..., HubStore]) -> None:
    """A branch or tag that does not exist raises NotFoundOnHubError naming it."""
    with pytest.raises(NotFoundOnHubError, match="no-such-branch"):
        make_store().pull(REPO, GGUF, revision="no-such-branch")


# -- errors ----------------------------------------------------------------------------------------------


def test_gated_repo_without_token_names_the_fix(hub: FakeHub, make_store: Callable[..., HubStore]) -> None:
    """No token on a gated repo: GatedRepoError (a PermissionError) naming HF_TOKEN and the licence page."""
    hub.add_repo("acme/gated-GGUF", {GGUF: b"GGUF" + b"\0" * 1000}, gated=True, allowed_tokens=(GOOD_TOKEN,))
    with pytest.raises(GatedRepoError) as caught:
        make_store().pull("acme/gated-GGUF", GGUF)
    assert isinstance(caught.value, PermissionError)
    assert caught.value.code == "hub_gated"
    assert "HF_TOKEN" in str(caught.value)
    assert f"{hub.endpoint}/acme/gated-GGUF" in str(caught.value)


def test_gated_repo_with_a_token_without_access_is_refused(hub: FakeHub, make_store: Callable[..., HubStore]) -> None:
    """A token whose account was not granted access gets GatedRepoError (HTTP 403)."""
    hub.add_repo("acme/gated-GGUF", {GGUF: b"GGUF" + b"\0" * 1000}, gated=True, allowed_tokens=(GOOD_TOKEN,))
    with pytest.raises(GatedRepoError, match="403"):
        make_store(token=OTHER_TOKEN).pull("acme/gated-GGUF", GGUF)


def test_gated_repo_with_an_allowed_token_downloads_and_keeps_the_token_off_the_cdn(
    hub: FakeHub, make_store: Callable[..., HubStore]
) -> None:
    """The right token opens a gated repo; it is sent to the Hub but not to the CDN the Hub redirects to."""
    content = b"GGUF" + b"\1" * 5000
    hub.add_repo("acme/gated-GGUF", {GGUF: content}, gated=True, allowed_tokens=(GOOD_TOKEN,))
    model = make_store(token=GOOD_TOKEN).pull("acme/gated-GGUF", GGUF)
    assert model.path.read_bytes() == content
    hub_calls = [r for r in hub.requests(path_contains="acme/gated-GGUF") if r.server == "hub"]
    cdn_calls = [r for r in hub.requests(path_contains="acme/gated-GGUF") if r.server == "cdn"]
    assert hub_calls
    assert all(r.authorization == f"Bearer {GOOD_TOKEN}" for r in hub_calls)
    assert cdn_calls
    assert all(r.authorization is None for r in cdn_calls)


def test_missing_file_and_missing_repo_are_typed_not_found_errors(make_store: Callable[..., HubStore]) -> None:
    """Unknown files and repos raise NotFoundOnHubError, which is also a FileNotFoundError."""
    store = make_store()
    with pytest.raises(NotFoundOnHubError, match=r"no-such\.gguf") as missing_file:
        store.pull(REPO, "no-such.gguf")
    assert isinstance(missing_file.value, FileNotFoundError)
    with pytest.raises(NotFoundOnHubError, match="acme/nothing-here"):
        store.pull("acme/nothing-here", GGUF)
    with pytest.raises(NotFoundOnHubError):
        store.list_files("acme/nothing-here")
    with pytest.raises(NotFoundOnHubError):
        store.read_range("acme/nothing-here", GGUF)


# -- offline and unreachable -----------------------------------------------------------------------------


def test_offline_without_the_file_in_cache_fails_without_any_request(
    hub: FakeHub, make_store: Callable[..., HubStore]
) -> None:
    """Offline mode never touches the network and says the file is not cached."""
    with pytest.raises(OfflineError, match="not in the cache") as caught:
        make_store(offline=True).pull(REPO, GGUF)
    assert caught.value.code == "hub_offline"
    assert hub.log == []


def test_offline_with_the_file_in_cache_works_without_any_request(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """Offline mode serves a verified cached file (and its listing) with zero requests."""
    make_store().pull(REPO, GGUF)
    hub.reset_log()
    offline = make_store(offline=True)
    model = offline.pull(REPO, GGUF)
    assert model.from_cache
    assert model.path.read_bytes() == gguf_bytes
    assert offline.read_range(REPO, GGUF, start=0, length=4) == b"GGUF"
    assert [f.path for f in offline.list_files(REPO)] == [GGUF]
    assert hub.log == []


def test_unreachable_hub_falls_back_to_the_cache_or_fails_clearly(
    tmp_path: Path, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """With the Hub down a cached file is still served; an uncached one raises HubUnreachableError."""
    make_store().pull(REPO, GGUF)
    with FakeHub() as gone:
        dead_endpoint = gone.endpoint  # a port on which nothing listens after the block
    down = make_store(endpoint=dead_endpoint)
    assert down.pull(REPO, GGUF).path.read_bytes() == gguf_bytes
    with pytest.raises(HubUnreachableError) as caught:
        down.pull(REPO, "README.md")
    assert isinstance(caught.value, ConnectionError)


# -- listing and range reads -----------------------------------------------------------------------------


def test_list_files_reports_sizes_and_lfs_sha256(make_store: Callable[..., HubStore], gguf_bytes: bytes) -> None:
    """Listing gives every file (recursively) with its size and the LFS sha256 when there is one."""
    files = make_store().list_files(REPO)
    assert files == [
        RemoteFile(path="README.md", size=7, sha256=None),
        RemoteFile(path="sub/notes.txt", size=5, sha256=None),
        RemoteFile(path=GGUF, size=len(gguf_bytes), sha256=sha256(gguf_bytes)),
    ]


def test_read_range_fetches_exactly_the_first_64_kib_with_one_range_request(
    hub: FakeHub, make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """Reading a header makes one 206 Range request and returns exactly those bytes; nothing is cached."""
    store = make_store()
    head = store.read_range(REPO, GGUF, start=0, length=65536)
    assert head == gguf_bytes[:65536]
    assert head.startswith(b"GGUF")
    gets = hub.file_gets(GGUF)  # the Hub's 302 to its CDN, then the CDN's 206
    assert [(g.server, g.range, g.status, g.body_bytes) for g in gets] == [
        ("hub", "bytes=0-65535", 302, 0),
        ("cdn", "bytes=0-65535", 206, 65536),
    ]
    assert store.local(REPO, GGUF) is None


def test_read_range_in_the_middle_and_past_the_end(make_store: Callable[..., HubStore], gguf_bytes: bytes) -> None:
    """A range in the middle returns those bytes; one running past the end is cut; one after it is empty."""
    store = make_store()
    assert store.read_range(REPO, GGUF, start=1000, length=10) == gguf_bytes[1000:1010]
    assert store.read_range(REPO, GGUF, start=len(gguf_bytes) - 5, length=100) == gguf_bytes[-5:]
    assert store.read_range(REPO, GGUF, start=len(gguf_bytes) + 10, length=100) == b""


def test_local_rejects_a_cached_file_whose_bytes_were_altered(
    make_store: Callable[..., HubStore], gguf_bytes: bytes
) -> None:
    """A cached blob changed on disk after verification is no longer reported present, and a pull repairs it."""
    store = make_store()
    path = store.pull(REPO, GGUF).path
    blob = Path(os.path.realpath(path))
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    assert store.local(REPO, GGUF) is None
    assert store.pull(REPO, GGUF).path.read_bytes() == gguf_bytes


# -- settings helpers ------------------------------------------------------------------------------------


def test_cache_dir_prefers_config_then_hf_variables_then_the_systemd_state_directory(tmp_path: Path) -> None:
    """The cache location never depends on $HOME: config, HF_HUB_CACHE, HF_HOME, $STATE_DIRECTORY, default."""
    assert resolve_cache_dir(tmp_path, {"HF_HUB_CACHE": "/x"}) == tmp_path
    assert resolve_cache_dir(None, {"HF_HUB_CACHE": "/x", "HF_HOME": "/h"}) == Path("/x")
    assert resolve_cache_dir(None, {"HF_HOME": "/h", "STATE_DIRECTORY": "/s"}) == Path("/h/hub")
    assert resolve_cache_dir(None, {"STATE_DIRECTORY": "/s:/t", "HOME": "/root"}) == Path("/s/hf-cache")
    assert resolve_cache_dir(None, {"HOME": "/root"}) == DEFAULT_CACHE_DIR


def test_token_comes_from_config_credential_env_or_file(tmp_path: Path) -> None:
    """Token order: config, systemd credential hf_token, HF_TOKEN (value or file), HF_TOKEN_PATH; else none."""
    (tmp_path / "hf_token").write_text("hf_from_credential\n")
    (tmp_path / "token_file").write_text("hf_from_file\n")
    credentials = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_token("hf_config", {**credentials, "HF_TOKEN": "hf_env"}) == "hf_config"
    assert resolve_token(str(tmp_path / "token_file"), {}) == "hf_from_file"
    assert resolve_token(None, {**credentials, "HF_TOKEN": "hf_env"}) == "hf_from_credential"
    assert resolve_token(None, {"HF_TOKEN": "hf_env"}) == "hf_env"
    assert resolve_token(None, {"HF_TOKEN": str(tmp_path / "token_file")}) == "hf_from_file"
    assert resolve_token(None, {"HF_TOKEN_PATH": str(tmp_path / "token_file")}) == "hf_from_file"
    assert resolve_token("  ", {}) is None


def test_endpoint_and_offline_follow_config_then_environment() -> None:
    """HF_ENDPOINT and HF_HUB_OFFLINE apply only when the config does not say otherwise."""
    assert resolve_endpoint(None, {}) == "https://huggingface.co"
    assert resolve_endpoint(None, {"HF_ENDPOINT": "http://mirror:8080/"}) == "http://mirror:8080"
    assert resolve_endpoint("http://cfg", {"HF_ENDPOINT": "http://mirror"}) == "http://cfg"
    assert resolve_offline(False, {"HF_HUB_OFFLINE": "1"})
    assert resolve_offline(True, {})
    assert not resolve_offline(False, {"HF_HUB_OFFLINE": "0"})


# -- the fake Hub itself -----------------------------------------------------------------------------------


def test_fake_hub_answers_the_real_clients_metadata_calls(hub: FakeHub, gguf_bytes: bytes) -> None:
    """model_info(files_metadata=True), list_repo_files and get_hf_file_metadata work against the fake Hub."""
    api = HfApi(endpoint=hub.endpoint, token=False)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == hub.repos[REPO].refs["main"]
    lfs = {s.rfilename: s.lfs for s in info.siblings or []}
    assert lfs[GGUF] is not None
    assert lfs[GGUF].sha256 == sha256(gguf_bytes)
    assert lfs["README.md"] is None
    assert sorted(api.list_repo_files(REPO)) == ["README.md", "sub/notes.txt", GGUF]
    meta = get_hf_file_metadata(hf_hub_url(REPO, GGUF, endpoint=hub.endpoint), token=False, endpoint=hub.endpoint)
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256(gguf_bytes), len(gguf_bytes), info.sha)
    assert meta.location.startswith(hub.cdn_endpoint)
    assert meta.xet_file_data is None
