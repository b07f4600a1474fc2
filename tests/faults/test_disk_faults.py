"""Disk-full faults against the real daemon, real Mosquitto and the Hub look-alike (real huggingface_hub client).

The Hub cache or the telemetry buffer sits on a small tmpfs (tests/support/tmpfs.py), so "the disk is
full" is the kernel's ENOSPC, not a mock. Each test ends with the daemon serving again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import try_to_load_from_cache

from agent.catalog.hub import PARTIAL_SUFFIX, HubStore
from agent.fleet.signing import load_private_key, write_keypair
from agent.fleet.wire import build_command
from agent.services.telemetry_buffer import BUFFER_FILE, TelemetryBuffer
from agent.transport.topics import command_topic
from tests.support.broker import Broker
from tests.support.daemon import REPO, Client, DaemonProcess, write_config
from tests.support.fake_hub import FakeHub
from tests.support.tmpfs import Tmpfs, small_tmpfs, tmpfs_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HUB_REPO = "edge-test/tiny-llama-GGUF"
FILES = {"F16": "tiny-llama-F16.gguf", "Q8_0": "tiny-llama-Q8_0.gguf", "Q4_0": "tiny-llama-Q4_0.gguf"}
CHOSEN = FILES["F16"]  # what the planner picks with this box's memory


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Tmpfs]]:
    """Factory: mount a tmpfs of the given size under tmp_path; every mount is unmounted afterwards."""
    reason = tmpfs_unavailable()
    if reason is not None:
        pytest.skip(reason)
    stack: list[object] = []

    def mount(name: str, size: int) -> Tmpfs:
        cm = small_tmpfs(tmp_path / name, size)
        try:
            fs = cm.__enter__()
        except OSError as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        stack.append(cm)
        return fs

    yield mount
    for cm in reversed(stack):
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        yield fake


def catalog_config(tmp_path: Path, broker: Broker, hub: FakeHub, cache_dir: Path) -> Path:
    """A daemon config serving catalog entry 'tiny' (pulled from ``hub`` into ``cache_dir``)."""
    files = ", ".join(f'{tag} = "{name}"' for tag, name in FILES.items())
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\nfiles = {{ {files} }}\n')
    cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"),
                       hub={"endpoint": hub.endpoint, "cache_dir": str(cache_dir), "min_free_bytes": 0})
    cfg.write_text(cfg.read_text().replace('path = "unused"', f'name = "tiny"\ncatalog = "{catalog}"'))
    return cfg


def assert_absent(cache_dir: Path, data: bytes) -> None:
    """Neither our store nor huggingface_hub's own cache lookup sees the file; no blob, no snapshot entry."""
    assert HubStore(cache_dir=cache_dir, offline=True).local(HUB_REPO, CHOSEN) is None
    assert not isinstance(try_to_load_from_cache(HUB_REPO, CHOSEN, cache_dir=cache_dir), str)
    blobs = cache_dir / ("models--" + HUB_REPO.replace("/", "--")) / "blobs"
    assert not (blobs / hashlib.sha256(data).hexdigest()).exists()


def assert_present_and_verified(cache_dir: Path) -> None:
    """Present means verified: the blob is named by the sha256 of what is on disk; no partial file is left."""
    path = HubStore(cache_dir=cache_dir, offline=True).local(HUB_REPO, CHOSEN)
    assert path is not None
    assert Path(os.path.realpath(path)).name == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(cache_dir.rglob("*" + PARTIAL_SUFFIX))


def serve_once(broker: Broker) -> dict:
    c = Client(broker.port)
    try:
        return json.loads(c.collect(c.request("dev1", {"prompt": "hi", "max_tokens": 2}), timeout=60)[-1].payload)
    finally:
        c.close()


def no_traceback(d: DaemonProcess) -> None:
    assert "Traceback" not in d.log_text(), d.log_text()[-3000:]


def event_kinds(watcher: Client, until_s: float = 0.5) -> list[dict]:
    time.sleep(until_s)
    out = []
    while not watcher.messages.empty():
        m = watcher.messages.get()
        if m.topic.endswith("/events"):
            out.append(json.loads(m.payload))
    return out


# -- 1. disk full during a pull ----------------------------------------------------------------------


def test_cache_too_small_for_the_model_fails_the_start_clearly_then_pulls_once_space_is_freed(
    tmp_path: Path, broker: Broker, hub: FakeHub, tmpfs: Callable[[str, int], Tmpfs], tiny_models: dict[str, Path]
) -> None:
    """HF cache on a 128 KiB tmpfs, model 286 KiB: exit 69, retained status offline naming the disk, a
    pull_failed event, nothing present and nothing fetched; after the tmpfs grows the next start pulls,
    verifies and serves."""
    data = tiny_models["F16"].read_bytes()
    fs = tmpfs("hf-cache", 128 * 1024)
    cfg = catalog_config(tmp_path, broker, hub, fs.path)
    watcher = Client(broker.port)
    watcher.subscribe("edge/dev1/events")
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        assert d.wait(timeout=60) == 69
        status = watcher.retained("edge/dev1/status", state="offline")
        assert "not enough disk space" in status["detail"], status
        assert str(fs.path) in status["detail"]
        failed = [e for e in event_kinds(watcher) if e["kind"] == "pull_failed"]
        assert [e["reason"] for e in failed] == ["disk_full"]
        no_traceback(d)
        assert_absent(fs.path, data)
        assert [g for g in hub.file_gets(CHOSEN) if not (g.range or "").startswith("bytes=0-")] == []
        print(f"\n[cache too small] exit 69, detail: {status['detail']}")

        fs.resize(2 * 1024 * 1024)
        again = DaemonProcess(config=cfg, workdir=tmp_path).start()
        try:
            again.wait_event("agent_started", timeout=60)
            assert serve_once(broker)["usage"]["completion_tokens"] == 2
            assert HubStore(cache_dir=fs.path, offline=True).local(HUB_REPO, CHOSEN).read_bytes() == data
        finally:
            again.stop()
    finally:
        watcher.close()
        d.stop()


def wait_for_partial(cache_dir: Path, d: DaemonProcess, *, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size >= at_least for p in cache_dir.rglob("*" + PARTIAL_SUFFIX)):
        assert time.monotonic() < deadline and d.proc is not None and d.proc.poll() is None, d.log_text()[-3000:]
        time.sleep(0.02)


def answered_on(client: Client, topic: str, timeout: float = 15.0) -> Any:
    """The next message on ``topic`` (others stay queued)."""
    deadline = time.monotonic() + timeout
    others = []
    try:
        while True:
            m = client.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if m.topic == topic:
                return m
            others.append(m)
    finally:
        for m in others:
            client.messages.put(m)


def answered_once(client: Client, reply_topic: str) -> dict:
    """The one final reply on ``reply_topic``; fails if a second one follows within half a second."""
    final = json.loads(client.collect(reply_topic, timeout=60)[-1].payload)
    time.sleep(0.5)
    others = []
    while not client.messages.empty():
        m = client.messages.get()
        assert m.topic != reply_topic, f"a request was answered twice: {m.payload!r}"
        others.append(m)
    for m in others:  # replies to other requests stay for their own collect()
        client.messages.put(m)
    return final


def test_disk_filling_up_mid_pull_keeps_the_partial_absent_and_the_next_start_resumes_it(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path], tmpfs: Callable[[str, int], Tmpfs]
) -> None:
    """Something else fills the cache's filesystem while the daemon pulls: ENOSPC mid-write becomes exit 69
    with 'disk full while downloading' on the status topic and a pull_failed event; the partial file is
    kept but never present; once space is freed the next start asks only for the missing bytes, verifies
    the sha256, serves, and answers the request that arrived during the failed pull exactly once."""
    data = tiny_models["F16"].read_bytes()
    fs = tmpfs("hf-cache", 1024 * 1024)
    with FakeHub(throttle_bps=100_000) as slow:  # ~3 s for the chosen file
        slow.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        cfg = catalog_config(tmp_path, broker, slow, fs.path)
        watcher = Client(broker.port)
        watcher.subscribe("edge/dev1/events")
        d = DaemonProcess(config=cfg, workdir=tmp_path).start()
        try:
            wait_for_partial(fs.path, d, at_least=40_000)
            asker = Client(broker.port)
            waiting = asker.request("dev1", {"prompt": "hi", "max_tokens": 3, "id": "sent-during-the-pull"})
            filler = fs.fill()
            assert d.wait(timeout=60) == 69
            status = watcher.retained("edge/dev1/status", state="offline")
            assert "disk full while downloading" in status["detail"], status
            assert CHOSEN in status["detail"]
            assert [e["reason"] for e in event_kinds(watcher) if e["kind"] == "pull_failed"] == ["disk_full"]
            no_traceback(d)
            assert_absent(fs.path, data)
            (partial,) = fs.path.rglob("*" + PARTIAL_SUFFIX)
            kept = partial.stat().st_size
            assert 0 < kept < len(data)
            assert partial.read_bytes() == data[:kept]  # what was written is the file's true prefix

            filler.unlink()
            slow.throttle_bps = None
            slow.reset_log()
            again = DaemonProcess(config=cfg, workdir=tmp_path).start()
            try:
                again.wait_event("agent_started", timeout=60)
                resumed = [g for g in slow.file_gets(CHOSEN) if g.range and not g.range.startswith("bytes=0-")]
                assert [g.range for g in resumed] == [f"bytes={kept}-"]
                assert resumed[0].body_bytes == len(data) - kept
                finished = again.wait_event("pull_finished")
                assert finished["bytes"] == len(data) - kept
                # The request that arrived during the failed pull waited in the broker session: answered once.
                assert answered_once(asker, waiting)["usage"]["completion_tokens"] == 3
                assert serve_once(broker)["usage"]["completion_tokens"] == 2
                assert_present_and_verified(fs.path)
                print(f"\n[disk full mid-pull] exit 69 with {kept} of {len(data)} bytes kept; detail: "
                      f"{status['detail']}; the next start fetched {resumed[0].body_bytes} bytes (Range {kept}-)")
            finally:
                again.stop()
                asker.close()
        finally:
            watcher.close()
            d.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)


def test_pull_cli_on_a_full_disk_exits_69_with_one_line_then_pulls_after_space_is_freed(
    tmp_path: Path, broker: Broker, hub: FakeHub, tmpfs: Callable[[str, int], Tmpfs], tiny_models: dict[str, Path]
) -> None:
    """`edge-agent pull` into a cache too small: exit 69 and one 'edge-agent: error:' line naming the space
    needed, no traceback, nothing present; after the tmpfs grows it downloads and verifies."""
    data = tiny_models["Q8_0"].read_bytes()
    fs = tmpfs("hf-cache", 64 * 1024)
    cfg = catalog_config(tmp_path, broker, hub, fs.path)
    out = run_cli("pull", "--config", str(cfg), "tiny:Q8_0", "--json")
    assert out.returncode == 69, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("edge-agent: error:")]
    assert len(errors) == 1 and "not enough disk space" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert HubStore(cache_dir=fs.path, offline=True).local(HUB_REPO, FILES["Q8_0"]) is None

    fs.resize(1024 * 1024)
    out = run_cli("pull", "--config", str(cfg), "tiny:Q8_0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["from_cache"], result["downloaded_bytes"]) == (False, len(data))
    assert Path(result["path"]).read_bytes() == data


def test_pull_cli_when_the_disk_fills_mid_download_exits_69_and_the_next_pull_resumes(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path], tmpfs: Callable[[str, int], Tmpfs]
) -> None:
    """`edge-agent pull` with the disk filling up mid-file: exit 69, one error line saying the partial file is
    kept, nothing present; after space is freed the next pull fetches only the rest and verifies it."""
    data = tiny_models["F16"].read_bytes()
    fs = tmpfs("hf-cache", 1024 * 1024)
    with FakeHub(throttle_bps=100_000) as slow:
        slow.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        cfg = catalog_config(tmp_path, broker, slow, fs.path)
        cli = subprocess.Popen([sys.executable, "-m", "agent", "pull", "--config", str(cfg), "tiny:F16", "--json"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not any(p.stat().st_size >= 40_000 for p in fs.path.rglob("*" + PARTIAL_SUFFIX)):
                assert time.monotonic() < deadline and cli.poll() is None, cli.communicate()
                time.sleep(0.02)
            filler = fs.fill()
            _, stderr = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
        assert cli.returncode == 69, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("edge-agent: error:")]
        assert len(errors) == 1 and "disk full while downloading" in errors[0], stderr
        assert "Traceback" not in stderr
        assert_absent(fs.path, data)
        (partial,) = fs.path.rglob("*" + PARTIAL_SUFFIX)
        kept = partial.stat().st_size

        filler.unlink()
        slow.throttle_bps = None
        out = run_cli("pull", "--config", str(cfg), "tiny:F16", "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["downloaded_bytes"] == len(data) - kept
        assert Path(result["path"]).read_bytes() == data
        print(f"\n[cli disk full mid-pull] {errors[0]}; resumed {result['downloaded_bytes']} of {len(data)} bytes")


def test_pull_into_a_cache_with_room_for_the_file_but_not_its_bookkeeping_is_a_disk_full_error(
    tmp_path: Path, broker: Broker, hub: FakeHub, tmpfs: Callable[[str, int], Tmpfs], tiny_models: dict[str, Path]
) -> None:
    """A tmpfs of exactly the file's pages: the bytes fit and verify, the verification record and refs/ do
    not. `edge-agent pull` exits 69 with one 'disk full' line (no traceback), nothing is present, and once
    there is room the next pull completes without downloading the file again."""
    data = tiny_models["F16"].read_bytes()
    page = os.sysconf("SC_PAGE_SIZE")
    fs = tmpfs("hf-cache", -(-len(data) // page) * page)
    cfg = catalog_config(tmp_path, broker, hub, fs.path)
    out = run_cli("pull", "--config", str(cfg), "tiny:F16", "--json")
    assert out.returncode == 69, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("edge-agent: error:")]
    assert len(errors) == 1 and "disk full" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert HubStore(cache_dir=fs.path, offline=True).local(HUB_REPO, CHOSEN) is None

    fs.resize(1024 * 1024)
    hub.reset_log()
    out = run_cli("pull", "--config", str(cfg), "tiny:F16", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["downloaded_bytes"] == 0  # the verified bytes were kept
    assert [g for g in hub.file_gets(CHOSEN) if not (g.range or "").startswith("bytes=0-")] == []
    assert HubStore(cache_dir=fs.path, offline=True).local(HUB_REPO, CHOSEN) is not None


# -- 2. disk full while telemetry is buffered ---------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def whole_records(buffer_file: Path, copy_dir: Path) -> int:
    """The buffer holds whole records only, and the reader a restart uses gets every one back; how many."""
    raw = buffer_file.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.splitlines()
    assert all(json.loads(line)["topic"].startswith("edge/dev1/") for line in lines)
    copy_dir.mkdir()
    shutil.copy(buffer_file, copy_dir / BUFFER_FILE)
    assert len(TelemetryBuffer(copy_dir, max_bytes=1 << 20, max_age_s=3600).pending(time.time())) == len(lines)
    return len(lines)


def assert_telemetry_after(broker: Broker, after: float) -> None:
    """A telemetry message produced after ``after`` (unix time) arrives (the retained one may be older)."""
    watcher = Client(broker.port)
    try:
        watcher.subscribe("edge/dev1/telemetry")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if json.loads(watcher.messages.get(timeout=15).payload)["ts"] > after:
                return
        raise AssertionError("no telemetry published after the broker came back")
    finally:
        watcher.close()


def test_full_buffer_disk_while_the_broker_is_down_is_logged_once_and_telemetry_flows_when_it_returns(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path], tmpfs: Callable[[str, int], Tmpfs]
) -> None:
    """Broker down, then the telemetry buffer's filesystem full: the daemon keeps running without spinning,
    logs telemetry_buffer_write_failed once (not per tick), leaves only whole records in the file (a
    restart's reader gets every one back), replays them when the broker returns and publishes again."""
    fs = tmpfs("telemetry", 64 * 1024)
    cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=tiny_models["Q8_0"],
                       telemetry={"buffer_dir": str(fs.path), "interval_s": 1.0})
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        buffer_file = fs.path / BUFFER_FILE
        broker.stop()
        deadline = time.monotonic() + 30
        while not (buffer_file.exists() and buffer_file.read_bytes().count(b"\n") >= 3):
            assert time.monotonic() < deadline, d.log_text()[-3000:]
            time.sleep(0.1)
        fs.fill()
        assert fs.free_bytes() == 0
        cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        time.sleep(6.0)  # six telemetry ticks with the disk full and the broker away
        cpu_share = (cpu_seconds(d.proc.pid) - cpu0) / (time.monotonic() - t0)
        assert d.proc.poll() is None, d.log_text()[-3000:]
        failures = [e for e in d.events() if e.get("event") == "telemetry_buffer_write_failed"]
        assert len(failures) == 1, failures
        assert failures[0]["errno"] == "ENOSPC" and failures[0]["path"] == str(buffer_file)
        assert not [e for e in d.events() if e.get("event") == "telemetry_tick_failed"]
        assert cpu_share < 0.3, f"daemon used {cpu_share:.0%} of a core while the disk was full"
        no_traceback(d)

        kept = whole_records(buffer_file, tmp_path / "buffer-copy")

        back = time.time()
        broker.start()
        replayed = d.wait_event("telemetry_buffer_replayed", timeout=30)
        assert replayed["records"] == kept
        assert_telemetry_after(broker, back)
        assert serve_once(broker)["usage"]["completion_tokens"] == 2
        print(f"\n[telemetry disk full] cpu {cpu_share:.1%} of a core over 6 s, {len(failures)} log event, "
              f"{kept} records kept and replayed")
    finally:
        d.stop()


class CommandNotRunError(AssertionError):
    """A valid signed command was refused because the daemon could not write its state."""


def test_with_the_whole_state_dir_full_the_daemon_still_serves_and_runs_signed_commands(
    tmp_path: Path, broker: Broker, tiny_models: dict[str, Path], tmpfs: Callable[[str, int], Tmpfs]
) -> None:
    """/var/lib/edge-agent full, as on a device where the HF cache filled its disk: telemetry buffer, command
    journals, nonces and quarantine counts all fail to write. Requests are still served once each, a signed
    command gets exactly one result and its replay never runs, nothing crashes; and the command runs. Each
    journal logs fleet_state_write_failed once (ENOSPC) however many commands follow; once space is freed
    the next command's write recovers and saves what the episode could not, in whole lines."""
    private, public = write_keypair(tmp_path / "keys")
    fs = tmpfs("state", 256 * 1024)
    cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=tiny_models["Q8_0"],
                       telemetry={"buffer_dir": str(fs.path / "telemetry"), "interval_s": 1.0},
                       fleet={"public_key": str(public), "state_dir": str(fs.path / "fleet")})
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    c = Client(broker.port)
    try:
        d.wait_event("agent_started", timeout=60)
        filler = fs.fill()
        c.subscribe("edge/dev1/cmd/result")
        replies = [c.request("dev1", {"prompt": "hi", "max_tokens": 3, "id": f"full-{i}"}) for i in range(3)]
        for reply in replies:
            assert answered_once(c, reply)["usage"]["completion_tokens"] == 3
        ping = build_command("ping", {}, "device", "dev1", key=load_private_key(private))
        results = []
        for _ in range(2):  # the command, then a replay of the very same payload
            c.publish(command_topic("edge", "device", "dev1", "ping"), ping)
            results.append(json.loads(answered_on(c, "edge/dev1/cmd/result").payload))
        assert results[0]["ok"] or results[0]["error"]["code"], results  # an explicit answer either way
        assert not (results[1]["ok"] and not results[1].get("duplicate")), results  # the replay never ran
        time.sleep(1.0)
        assert c.messages.empty() or all(m.topic != "edge/dev1/cmd/result" for m in list(c.messages.queue))
        assert d.proc is not None and d.proc.poll() is None
        no_traceback(d)
        print(f"\n[state dir full] requests 3/3 served once; command: {results[0].get('error') or 'ok'}; "
              f"replay: {results[1].get('error') or results[1]}")
        if not results[0]["ok"]:
            raise CommandNotRunError(f"signed ping refused with the state dir full: {results[0]['error']}")

        key = load_private_key(private)
        second = build_command("ping", {}, "device", "dev1", key=key)
        c.publish(command_topic("edge", "device", "dev1", "ping"), second)
        assert json.loads(answered_on(c, "edge/dev1/cmd/result").payload)["ok"]
        journals = {str(fs.path / "fleet" / name) for name in ("nonces.jsonl", "results.jsonl")}
        failed = [e for e in d.events() if e.get("event") == "fleet_state_write_failed"]
        assert sorted(e["path"] for e in failed) == sorted(journals), failed  # once each, not per command
        assert {e["errno"] for e in failed} == {"ENOSPC"}, failed

        filler.unlink()
        third = build_command("ping", {}, "device", "dev1", key=key)
        c.publish(command_topic("edge", "device", "dev1", "ping"), third)
        assert json.loads(answered_on(c, "edge/dev1/cmd/result").payload)["ok"]
        for path in journals:
            assert d.wait_event("fleet_state_write_recovered", path=path)["saved_late"] == 2
        nonces = [json.loads(line)[0] for line in (fs.path / "fleet" / "nonces.jsonl").read_bytes().splitlines()]
        assert nonces == [ping["nonce"], second["nonce"], third["nonce"]]
        ids = [json.loads(line)[0] for line in (fs.path / "fleet" / "results.jsonl").read_bytes().splitlines()]
        assert ids == [ping["id"], second["id"], third["id"]]
        no_traceback(d)
    finally:
        c.close()
        d.stop()
