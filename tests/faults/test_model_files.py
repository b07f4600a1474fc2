"""Damaged model files against the real daemon: truncated, corrupt headers, cache blobs altered on disk.

A damaged file is never served as present: the daemon re-downloads it or stops with exit 69 and a retained
``offline`` status whose detail names the file (never a traceback, never a signal), and a live swap to a
damaged file leaves the previous model serving every request.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.catalog.hub import HubStore
from agent.fleet.signing import write_keypair
from tests.support.broker import Broker
from tests.support.daemon import REPO, Client, DaemonProcess, write_config
from tests.support.fake_hub import FakeHub

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HUB_REPO = "edge-test/tiny-llama-GGUF"
FILES = {"F16": "tiny-llama-F16.gguf", "Q8_0": "tiny-llama-Q8_0.gguf", "Q4_0": "tiny-llama-Q4_0.gguf"}
CHOSEN = FILES["F16"]  # what the planner picks with this box's memory


def _set_u64(data: bytearray, offset: int, value: int) -> None:
    data[offset : offset + 8] = struct.pack("<Q", value)


def _first_dim_offset(data: bytearray, tensor: str = "token_embd.weight") -> int:
    """Offset of the first dimension of ``tensor`` in the header's tensor table."""
    name = struct.pack("<Q", len(tensor)) + tensor.encode()
    at = data.index(name) + len(name)
    return at + 4  # after uint32 n_dims


DAMAGE: dict[str, Callable[[bytearray], bytearray]] = {
    # (a) cut inside the tensor data: the header is whole, the weights are not.
    "truncated_mid_tensor_data": lambda d: d[: len(d) * 6 // 10],
    # (b) corrupt headers
    "bad_magic": lambda d: bytearray(b"GGUX") + d[4:],
    "absurd_tensor_count": lambda d: (_set_u64(d, 8, 1 << 62), d)[1],
    "absurd_metadata_count": lambda d: (_set_u64(d, 16, 1 << 62), d)[1],
    "key_length_past_the_file": lambda d: (_set_u64(d, 24, len(d) + 4096), d)[1],
    "absurd_tensor_dims": lambda d: (_set_u64(d, _first_dim_offset(d), 1 << 40), d)[1],
    "truncated_inside_the_header": lambda d: d[:4000],
}


def assert_refused_cleanly(d: DaemonProcess, broker: Broker, named: str) -> dict:
    """Exit 69 (not a signal, not 1), no traceback, retained status offline with a detail naming ``named``."""
    code = d.wait(timeout=60)
    log = d.log_text()
    assert code == 69, f"exit {code}\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    c = Client(broker.port)
    try:
        status = c.retained("edge/dev1/status", state="offline")
    finally:
        c.close()
    assert named in status["detail"], status
    return status


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_local_model_file_stops_the_start_with_69_and_a_detail_naming_it(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path], damage: str
) -> None:
    """[model] path pointing at a truncated or header-corrupt GGUF: the daemon says which file and why on its
    status topic and exits 69 (the unit restarts it), with no traceback and no crash inside llama.cpp."""
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes(DAMAGE[damage](bytearray(tiny_models["Q4_0"].read_bytes())))
    cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=bad)
    status = assert_refused_cleanly(DaemonProcess(config=cfg, workdir=tmp_path).start(), broker, str(bad))
    # And why: llama.cpp only says "Failed to load model from file"; the header says damaged or truncated.
    assert "damaged" in status["detail"], status
    assert damage != "truncated_mid_tensor_data" or "truncated" in status["detail"], status
    print(f"\n[{damage}] exit 69, detail: {status['detail'][:300]}")


# -- Hub cache blobs altered after download -------------------------------------------------------------


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        yield fake


def catalog_config(tmp_path: Path, broker: Broker, fake: FakeHub, **extra: dict) -> Path:
    files = ", ".join(f'{tag} = "{name}"' for tag, name in FILES.items())
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\nfiles = {{ {files} }}\n')
    hub_cfg = {"endpoint": fake.endpoint, "cache_dir": str(tmp_path / "hf-cache"), "min_free_bytes": 0,
               **extra.pop("hub", {})}
    cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"), hub=hub_cfg, **extra)
    cfg.write_text(cfg.read_text().replace('path = "unused"', f'name = "tiny"\ncatalog = "{catalog}"'))
    return cfg


def serve_once(broker: Broker, max_tokens: int = 2) -> dict:
    c = Client(broker.port)
    try:
        reply = c.request("dev1", {"prompt": "hi", "max_tokens": max_tokens})
        return json.loads(c.collect(reply, timeout=60)[-1].payload)
    finally:
        c.close()


def pull_and_stop(tmp_path: Path, cfg: Path, broker: Broker) -> Path:
    """Start once so the chosen file is pulled and verified, serve a request, stop; the blob's path."""
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        assert serve_once(broker)["usage"]["completion_tokens"] == 2
    finally:
        d.stop()
    path = HubStore(cache_dir=tmp_path / "hf-cache", offline=True).local(HUB_REPO, CHOSEN)
    assert path is not None
    return Path(os.path.realpath(path))


def alter(blob: Path, offset: int) -> None:
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(data)


def test_a_cache_blob_altered_in_its_tensor_data_is_downloaded_again_not_served(
    tmp_path: Path, broker: Broker, hub: FakeHub, tiny_models: dict[str, Path]
) -> None:
    """One byte of the cached F16 weights flipped on disk after a verified pull: the next start notices the
    sha256 no longer matches, deletes the blob, downloads the whole file again and serves it."""
    data = tiny_models["F16"].read_bytes()
    cfg = catalog_config(tmp_path, broker, hub)
    blob = pull_and_stop(tmp_path, cfg, broker)
    alter(blob, len(data) // 2)
    assert HubStore(cache_dir=tmp_path / "hf-cache", offline=True).local(HUB_REPO, CHOSEN) is None
    hub.reset_log()
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        assert d.wait_event("cache_blob_corrupt")["file"] == CHOSEN
        full = [g for g in hub.file_gets(CHOSEN) if g.range is None]
        assert [g.body_bytes for g in full] == [len(data)]
        assert blob.read_bytes() == data
        assert serve_once(broker)["usage"]["completion_tokens"] == 2
        assert "Traceback" not in d.log_text()
    finally:
        d.stop()


@pytest.mark.parametrize(("where", "says"), [("tensor_data", "does not match its sha256"),
                                             ("header", "not a GGUF file")])
def test_offline_a_cache_blob_altered_after_download_is_a_clear_error_naming_the_file(
    tmp_path: Path, broker: Broker, hub: FakeHub, where: str, says: str
) -> None:
    """Offline there is nothing to re-download: exit 69, status offline naming the file and what is wrong
    with it (sha256 mismatch, or the header the planner could not read), never llama.cpp loading it."""
    online = catalog_config(tmp_path, broker, hub)
    blob = pull_and_stop(tmp_path, online, broker)
    alter(blob, blob.stat().st_size // 2 if where == "tensor_data" else 0)
    offline = catalog_config(tmp_path, broker, hub, hub={"offline": True})
    d = DaemonProcess(config=offline, workdir=tmp_path).start()
    status = assert_refused_cleanly(d, broker, CHOSEN)
    assert says in status["detail"], status
    assert not [e for e in d.events() if e.get("event") in ("agent_started", "model_loaded")]
    print(f"\n[offline altered blob, {where}] detail: {status['detail']}")


def test_a_cache_blob_whose_header_was_altered_is_downloaded_again(
    tmp_path: Path, broker: Broker, hub: FakeHub, tiny_models: dict[str, Path]
) -> None:
    """The cached file's magic overwritten after a verified pull: the planner cannot read its header from
    the cache, and the start must still recover (read the header from the Hub, re-download) and serve."""
    data = tiny_models["F16"].read_bytes()
    cfg = catalog_config(tmp_path, broker, hub)
    blob = pull_and_stop(tmp_path, cfg, broker)
    alter(blob, 0)
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        assert blob.read_bytes() == data
        assert serve_once(broker)["usage"]["completion_tokens"] == 2
    finally:
        d.stop()


# -- a live swap to a damaged file ----------------------------------------------------------------------


def fleet_cmd(cfg: Path, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "fleet", "--config", str(cfg), "cmd", "dev1", *args, "--json",
         "--timeout", "60", "--key", str(key)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )


def test_set_model_to_a_damaged_file_keeps_serving_the_previous_model_and_answers_every_request(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path]
) -> None:
    """Signed `set-model` to a quant that is truncated on the Hub itself (its sha256 matches, llama.cpp cannot
    load it) and to one the Hub serves corrupted (sha256 mismatch): each command gets an error result, the
    daemon keeps serving F16, and requests sent around the swaps are each answered exactly once."""
    q4 = tiny_models["Q4_0"].read_bytes()
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {FILES["F16"]: tiny_models["F16"], FILES["Q8_0"]: tiny_models["Q8_0"],
                                 FILES["Q4_0"]: q4[: len(q4) * 6 // 10]})
        private, public = write_keypair(tmp_path / "keys")
        cfg = catalog_config(tmp_path, broker, fake, fleet={"public_key": str(public),
                                                            "state_dir": str(tmp_path / "state-dev1" / "fleet")})
        d = DaemonProcess(config=cfg, workdir=tmp_path).start()
        c = Client(broker.port)
        try:
            d.wait_event("agent_started", timeout=60)
            fake.corrupt(FILES["Q8_0"])
            replies = [c.request("dev1", {"prompt": "hi", "max_tokens": 40, "id": f"r{i}"}) for i in range(3)]
            truncated = fleet_cmd(cfg, private, "set-model", "--arg", "model=tiny", "--arg", "quant=Q4_0")
            replies += [c.request("dev1", {"prompt": "hi", "max_tokens": 40, "id": f"s{i}"}) for i in range(3)]
            corrupt = fleet_cmd(cfg, private, "set-model", "--arg", "model=tiny", "--arg", "quant=Q8_0")
            results = {}
            for name, out in (("truncated", truncated), ("corrupt", corrupt)):
                assert out.returncode == 1, out.stdout + out.stderr
                (result,) = json.loads(out.stdout)["results"]
                assert result["ok"] is False
                results[name] = result["error"]
            assert results["corrupt"]["code"] == "hub_checksum_mismatch", results
            assert FILES["Q4_0"] in results["truncated"]["message"], results
            for reply in replies:
                finals = c.collect(reply, timeout=60)
                body = json.loads(finals[-1].payload)
                assert body.get("usage", {}).get("completion_tokens") == 40, body  # an error reply shows itself
            time.sleep(0.5)
            extra = [m for m in iter(lambda: None if c.messages.empty() else c.messages.get(), None)
                     if m.topic.startswith("test/reply/")]
            assert extra == [], [m.payload for m in extra]  # no request answered twice
            assert serve_once(broker)["usage"]["completion_tokens"] == 2
            assert c.retained("edge/dev1/status", state="online")["quant"] == "F16"
            assert HubStore(cache_dir=tmp_path / "hf-cache", offline=True).local(HUB_REPO, FILES["Q8_0"]) is None
            assert "Traceback" not in d.log_text()
            print(f"\n[set-model damaged] truncated: {results['truncated']}\n  corrupt: {results['corrupt']}")
        finally:
            c.close()
            d.stop()
