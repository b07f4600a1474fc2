"""Given only a catalog name, the daemon measures, chooses, pulls (real huggingface_hub client), verifies,
loads and serves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, Client, DaemonProcess, write_config
from tests.support.fake_hub import FakeHub

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HUB_REPO = "edge-test/tiny-llama-GGUF"
FILES = {"F16": "tiny-llama-F16.gguf", "Q8_0": "tiny-llama-Q8_0.gguf", "Q4_0": "tiny-llama-Q4_0.gguf"}


@pytest.fixture
def hub(tiny_models: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        yield fake


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    files = ", ".join(f'{tag} = "{name}"' for tag, name in FILES.items())
    path = tmp_path / "models.toml"
    path.write_text(
        f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\nfiles = {{ {files} }}\n'
        f'[models.tiny-discovered]\nrepo = "{HUB_REPO}"\nn_ctx = 512\n'
    )
    return path


def config_for(tmp_path: Path, broker, fake: FakeHub, catalog: Path, *, name: str = "tiny",
               hub_cfg: dict | None = None) -> Path:
    cfg = write_config(
        tmp_path / "agent.toml", port=broker.port, model_file=Path("unused"),
        hub={"endpoint": fake.endpoint, "cache_dir": str(tmp_path / "hf-cache"), **(hub_cfg or {})},
    )
    text = cfg.read_text().replace('path = "unused"', f'name = "{name}"\ncatalog = "{catalog}"')
    cfg.write_text(text)
    return cfg


def test_daemon_plans_pulls_and_serves_a_catalog_model(tmp_path, broker, hub, catalog) -> None:
    """[model] name alone: the best quant that fits is pulled, sha256-verified, loaded and answers requests."""
    d = DaemonProcess(config=config_for(tmp_path, broker, hub, catalog), workdir=tmp_path).start()
    c = Client(broker.port)
    try:
        chosen = d.wait_event("model_chosen", timeout=60)
        assert chosen["quant"] == "F16"  # plenty of memory here: the best quality
        d.wait_event("agent_started", timeout=60)
        body = json.loads(c.collect(c.request("dev1", {"prompt": "hi", "max_tokens": 3}))[-1].payload)
        assert body["usage"]["completion_tokens"] == 3
        assert c.retained("edge/dev1/status", state="online")["quant"] == "F16"
        assert len(hub.file_gets(FILES["F16"])) >= 1
        assert hub.file_gets(FILES["Q4_0"]) == [] or all(r.range for r in hub.file_gets(FILES["Q4_0"]))
    finally:
        c.close()
        d.stop()


def test_offline_restart_serves_from_the_cache_without_network(tmp_path, broker, hub, catalog) -> None:
    """Once pulled, an offline start needs no Hub at all."""
    first = DaemonProcess(config=config_for(tmp_path, broker, hub, catalog), workdir=tmp_path).start()
    first.wait_event("agent_started", timeout=60)
    first.stop()
    hub.reset_log()
    cfg = config_for(tmp_path, broker, hub, catalog, hub_cfg={"offline": True})
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    try:
        d.wait_event("agent_started", timeout=60)
        assert hub.requests() == []
    finally:
        d.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_plan_cli_explains_and_obeys_a_small_budget(tmp_path, broker, hub, catalog) -> None:
    """`plan --json` lists every candidate; a tight --ram-available picks less or says nothing fits, with numbers."""
    cfg = config_for(tmp_path, broker, hub, catalog)
    out = run_cli("plan", "--config", str(cfg), "--model", "tiny", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["quant"] == "F16"
    assert {c["quant"] for c in plan["candidates"]} == set(FILES)
    assert plan["estimate_bytes"] > 0
    assert plan["budget_bytes"] > plan["estimate_bytes"]
    assert hub.file_gets(FILES["F16"]) == [] or all(r.range for r in hub.file_gets(FILES["F16"]))
    tight = run_cli("plan", "--config", str(cfg), "--model", "tiny", "--ram-available", "1MB")
    assert tight.returncode == 1
    assert "nothing fits" in tight.stdout


def test_pull_cli_discovers_quants_and_pins_one(tmp_path, broker, hub, catalog) -> None:
    """`pull NAME:QUANT` on an entry without a file list discovers the quants from the repo listing."""
    cfg = config_for(tmp_path, broker, hub, catalog)
    out = run_cli("pull", "--config", str(cfg), "tiny-discovered:Q4_0", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["quant"] == "Q4_0"
    assert Path(result["path"]).read_bytes()[:4] == b"GGUF"
    again = run_cli("pull", "--config", str(cfg), "tiny-discovered:Q4_0", "--json")
    assert json.loads(again.stdout)["from_cache"] is True


def test_heat_hot_swaps_a_smaller_quant_without_dropping_requests(tmp_path, broker, hub, catalog) -> None:
    """Near the soft limit: threads go down first, then the fit decision is re-run with a cap and the
    daemon hot-swaps to the next smaller quant while requests keep being answered."""
    import shutil

    from tests.support.hardware import FIXTURES

    hw = tmp_path / "hw"
    shutil.copytree(FIXTURES / "pi5-8gb", hw)
    cfg = config_for(tmp_path, broker, hub, catalog)
    cfg.write_text(cfg.read_text() + (
        f'[hardware]\nsys_root = "{hw / "sys"}"\nproc_root = "{hw / "proc"}"\n'
        "[adapt]\ndown_dwell_s = 1.0\nhold_s = 600.0\n"
    ).replace("[telemetry]", "[telemetry]\ninterval_s = 1.0", 1))
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    c = Client(broker.port)
    try:
        assert d.wait_event("model_chosen", timeout=60)["quant"] == "F16"
        d.wait_event("agent_started", timeout=60)
        zone = hw / "sys" / "class" / "thermal" / "thermal_zone0" / "temp"
        zone.write_text("78500\n")  # Pi 5: soft limit 80 °C, so within the 5 °C margin
        replies = []
        deadline = time.monotonic() + 60
        swapped = None
        while time.monotonic() < deadline and swapped is None:
            replies.append(c.request("dev1", {"prompt": "hi", "max_tokens": 4}))
            time.sleep(0.2)
            swapped = next((e for e in d.events() if e.get("event") == "model_swapped"), None)
        assert swapped is not None, d.log_text()[-3000:]
        assert swapped["quant"] == "Q8_0"
        for reply in replies:
            body = json.loads(c.collect(reply, timeout=60)[-1].payload)
            assert body.get("usage", {}).get("completion_tokens") == 4, body
        assert c.retained("edge/dev1/status", state="online")["quant"] == "Q8_0"
        adaptations = [e for e in d.events() if e.get("event") == "adaptation"]
        assert [e["kind"] for e in adaptations][:2] == ["downgrade", "downgrade"]  # threads, then quant
    finally:
        c.close()
        d.stop()



def test_set_model_without_room_for_both_closes_first_and_keeps_queued_requests(tmp_path, broker, hub, catalog) -> None:
    """When the new quant does not fit beside the loaded one, the old model is closed first (drain, swap,
    resume): queued requests wait and every one is answered."""
    import re
    import shutil

    from tests.support.hardware import FIXTURES

    hw = tmp_path / "hw"
    shutil.copytree(FIXTURES / "pi5-8gb", hw)
    cfg = config_for(tmp_path, broker, hub, catalog)
    cfg.write_text(cfg.read_text() + f'[hardware]\nsys_root = "{hw / "sys"}"\nproc_root = "{hw / "proc"}"\n')
    plan = json.loads(run_cli("plan", "--config", str(cfg), "--model", "tiny", "--json", "--ram-available",
                              "8GiB").stdout)
    q8 = next(c["estimate_bytes"] for c in plan["candidates"] if c["quant"] == "Q8_0")
    d = DaemonProcess(config=cfg, workdir=tmp_path).start()
    c = Client(broker.port)
    try:
        assert d.wait_event("model_chosen", timeout=60)["quant"] == "F16"
        d.wait_event("agent_started", timeout=60)
        # The loaded model now takes memory: leave a budget just short of Q8_0 (reserve 64 MiB + margin 32 MiB).
        meminfo = hw / "proc" / "meminfo"
        available_kb = (q8 - 2**20 + 96 * 2**20) // 1024
        meminfo.write_text(re.sub(r"MemAvailable:\s+\d+ kB", f"MemAvailable: {available_kb} kB", meminfo.read_text()))
        replies = [c.request("dev1", {"prompt": "hi", "max_tokens": 200, "id": f"q{i}"}) for i in range(4)]
        done = subprocess.run(
            [sys.executable, "-m", "agent", "fleet", "--config", str(cfg), "cmd", "dev1", "set-model",
             "--arg", "model=tiny", "--arg", "quant=Q8_0", "--json", "--timeout", "60"],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        swapped = d.wait_event("model_swapped", timeout=30)
        assert swapped["side_by_side"] is False
        assert swapped["quant"] == "Q8_0"
        for reply in replies:
            body = json.loads(c.collect(reply, timeout=60)[-1].payload)
            assert body["usage"]["completion_tokens"] == 200
        after = json.loads(c.collect(c.request("dev1", {"prompt": "hi", "max_tokens": 2}))[-1].payload)
        assert after["usage"]["completion_tokens"] == 2
        assert c.retained("edge/dev1/status", state="online")["quant"] == "Q8_0"
    finally:
        c.close()
        d.stop()


def test_device_is_visible_from_its_first_second_through_a_slow_first_pull(tmp_path, broker, tiny_models,
                                                                           catalog) -> None:
    """Connected before the pull: retained status goes starting → pulling (progress rising) → loading → online,
    the pull shows as events, and a request sent during the pull is answered once the model is loaded."""
    size = tiny_models["F16"].stat().st_size
    with FakeHub(throttle_bps=max(size // 4, 1)) as slow:  # about four seconds for the chosen file
        slow.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        watcher = Client(broker.port)
        watcher.subscribe("edge/dev1/status")
        watcher.subscribe("edge/dev1/events")
        d = DaemonProcess(config=config_for(tmp_path, broker, slow, catalog), workdir=tmp_path).start()
        asker = Client(broker.port)
        try:
            statuses: list[dict] = []
            events: list[dict] = []
            reply = None
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not (statuses and statuses[-1]["state"] == "online"):
                m = watcher.messages.get(timeout=max(0.01, deadline - time.monotonic()))
                body = json.loads(m.payload)
                (statuses if m.topic.endswith("/status") else events).append(body)
                if body.get("state") == "pulling" and reply is None:
                    reply = asker.request("dev1", {"prompt": "hi", "max_tokens": 2})
            states = [s["state"] for s in statuses]
            assert states[0] == "starting", states
            assert "pulling" in states and "loading" in states, states
            assert states.index("pulling") < states.index("loading") < states.index("online")
            pulled = [s["progress"] for s in statuses if s["state"] == "pulling"]
            assert len(pulled) >= 2, pulled  # progress published while the bytes flow, not only at the end
            assert [p["bytes_done"] for p in pulled] == sorted(p["bytes_done"] for p in pulled)
            assert pulled[-1]["bytes_total"] == size
            time.sleep(0.5)
            while not watcher.messages.empty():
                m = watcher.messages.get()
                if m.topic.endswith("/events"):
                    events.append(json.loads(m.payload))
            kinds = [e["kind"] for e in events]
            assert "pull_started" in kinds and "pull_finished" in kinds, kinds
            assert reply is not None
            body = json.loads(asker.collect(reply, timeout=60)[-1].payload)
            assert body["usage"]["completion_tokens"] == 2
        finally:
            asker.close()
            watcher.close()
            d.stop()


def test_a_start_that_fails_says_why_on_the_status_topic(tmp_path, broker, hub, catalog) -> None:
    """A catalog name that does not exist: the daemon exits, and its retained status is offline with the reason."""
    d = DaemonProcess(config=config_for(tmp_path, broker, hub, catalog, name="no-such-model"), workdir=tmp_path)
    d.start()
    c = Client(broker.port)
    try:
        assert d.wait(timeout=60) != 0
        status = c.retained("edge/dev1/status", state="offline")
        assert "no-such-model" in status["detail"]
    finally:
        c.close()


def test_sigterm_during_a_first_pull_stops_at_once_and_the_next_start_resumes(tmp_path, broker, tiny_models,
                                                                              catalog) -> None:
    """A stop request does not wait for the download: exit 0 within seconds, status offline; the next start
    asks the Hub only for the missing bytes (Range) and serves."""
    size = tiny_models["F16"].stat().st_size
    with FakeHub(throttle_bps=max(size // 8, 1)) as slow:  # about eight seconds for the chosen file
        slow.add_repo(HUB_REPO, {name: tiny_models[tag] for tag, name in FILES.items()})
        cfg = config_for(tmp_path, broker, slow, catalog)
        c = Client(broker.port)
        d = DaemonProcess(config=cfg, workdir=tmp_path).start()
        try:
            c.retained("edge/dev1/status", timeout=60, state="pulling")
            time.sleep(1.0)
            d.signal(15)
            t0 = time.monotonic()
            assert d.wait(timeout=20) == 0
            assert time.monotonic() - t0 < 10
            assert c.retained("edge/dev1/status", state="offline").get("detail") is None
            slow.throttle_bps = None
            slow.reset_log()
            again = DaemonProcess(config=cfg, workdir=tmp_path).start()
            try:
                again.wait_event("agent_started", timeout=60)
                # (Small Range reads of the header are the planner's; the resumed pull starts mid-file.)
                resumed = [g for g in slow.file_gets(FILES["F16"]) if g.range and not g.range.startswith("bytes=0-")]
                assert resumed, [(g.range, g.body_bytes) for g in slow.file_gets(FILES["F16"])]
                assert resumed[0].body_bytes < size
                body = json.loads(c.collect(c.request("dev1", {"prompt": "hi", "max_tokens": 2}))[-1].payload)
                assert body["usage"]["completion_tokens"] == 2
            finally:
                again.stop()
        finally:
            c.close()
            d.stop()
