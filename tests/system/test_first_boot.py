"""First boot pulls the model from the Hub, survives a power cut mid-pull, and later boots without a Hub.

A third fresh device is installed with ``bootstrap.sh --no-start`` (enabled, never started, nothing
pulled), like an image flashed at the factory. The fake Hub serves a ~4 MB tiny model under a real
catalog entry, throttled so that the pull takes ~12 s. The tests run in order on the same root:

3. boot → ``starting``, then ``pulling`` with progress on MQTT → power cut (SIGKILL to the container's
   PID 1) at >= 25 % → boot again → the download resumes with a ``Range`` request, is sha256-verified,
   the device serves.
4. the Hub stopped → reboot → the device serves from its cache.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support.broker import Broker
from tests.support.fake_hub import FakeHub, RequestRecord
from tests.system.device import Device, DeviceError
from tests.system.hub_catalog import SMOLLM_135M, tiny_model
from tests.system.observer import StatusWatch
from tests.system.provision import bootstrap, place_checkout
from tests.system.report import record
from tests.system.serving import ask, wait_active, wait_online

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO_ID, FILENAME = SMOLLM_135M
PULL_SECONDS = 12  # the throttle makes the whole file take about this long
CUT_AT_PERCENT = 25


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """This module's Hub: the catalog entry's file is a ~4 MB model, so a throttled pull lasts seconds."""
    model = tiny_model(tmp_path_factory.mktemp("hub-models") / "big.gguf", big=True, seed=3, name="tiny-big")
    fake = FakeHub().start()
    fake.add_repo(REPO_ID, {FILENAME: model})
    yield fake
    fake.stop()


@dataclass
class Flashed:
    device: Device
    device_id: str
    port: int


@pytest.fixture(scope="module")
def flashed(make_device: Callable[[str], Device], device_wheels: Path, hub: FakeHub, host_broker: Broker) -> Flashed:
    """Installed, enabled, never started: the model is pulled on the first boot."""
    device = make_device("c")
    place_checkout(device, device_wheels)
    started = time.monotonic()
    out = bootstrap(device, "--model", "smollm2-135m-instruct", "--hub-endpoint", hub.endpoint,
                    "--device-id", device.name, "--mqtt-host", "127.0.0.1", "--mqtt-port", str(host_broker.port),
                    "--no-start")
    record("bootstrap.sh --no-start (s)", round(time.monotonic() - started, 1))
    if out.returncode != 0:
        raise DeviceError(f"bootstrap.sh failed (exit {out.returncode}):\n{out.stdout[-5000:]}\n{out.stderr[-3000:]}")
    if device.run(["systemctl", "is-enabled", "edge-agent"], check=False).stdout.strip() != "enabled":
        raise DeviceError("bootstrap.sh --no-start did not enable edge-agent")
    assert not list((device.root / "var/lib/edge-agent").rglob("*.gguf")), "something was pulled already"
    return Flashed(device, device.name, host_broker.port)


def _file_gets(hub: FakeHub) -> list[RequestRecord]:
    return [r for r in hub.requests("GET") if FILENAME in unquote(r.path) and "/api/" not in r.path]


def _story(watch: StatusWatch, mark: int, since: float) -> list[str]:
    """The status messages after ``mark`` as "t+S state [percent]" lines, for the figures."""
    story = []
    for seen in watch.on(watch.topic, after=mark):
        body = seen.json() or {}
        percent = (body.get("progress") or {}).get("percent")
        line = f"+{seen.at - since:.1f}s {body.get('state')}"
        story.append(line + (f" {percent:.0f}%" if percent is not None else ""))
    return story


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes="):
        return None
    first = header[len("bytes="):].split("-", 1)[0]
    return int(first) if first else None


def test_first_boot_pulls_with_progress_survives_a_power_cut_and_resumes(flashed: Flashed, hub: FakeHub) -> None:
    """starting → pulling (progress on MQTT) → power cut → next boot resumes with Range, verifies sha256, serves."""
    d = flashed.device
    blob = hub.file(REPO_ID, FILENAME)
    watch = StatusWatch(flashed.port, flashed.device_id)
    try:
        kept = _first_boot_until_the_power_cut(flashed, hub, watch, len(blob.data))
        _second_boot_resumes(flashed, hub, watch, len(blob.data), kept)
        cached = [p for p in (d.root / "var/lib/edge-agent").rglob(blob.sha256) if p.is_file()]
        assert cached, "no blob named by its sha256 in the Hub cache"
        assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == blob.sha256
        assert not list((d.root / "var/lib/edge-agent").rglob("*.edge-agent-partial"))
        events = [e.get("event") for e in d.events()]
        assert "pull_resumed" in events, events
        wait_active(d)
        ask(flashed.port, flashed.device_id)
    finally:
        hub.throttle_bps = None
        watch.close()


def _first_boot_until_the_power_cut(flashed: Flashed, hub: FakeHub, watch: StatusWatch, size: int) -> int:
    """Boot, watch the pull's progress on MQTT, cut the power at CUT_AT_PERCENT; returns the partial file's size."""
    d = flashed.device
    hub.throttle_bps = size // PULL_SECONDS
    d.poweroff()
    hub.reset_log()
    mark = watch.mark()
    boot_started = time.monotonic()
    # Not until "running": the boot job waits for edge-agent's READY=1, which comes after the pull.
    d.boot(until_running=False)
    cut_at = watch.wait(watch.topic, lambda s: s["state"] == "pulling" and s["progress"]["percent"] >= CUT_AT_PERCENT,
                        after=mark, timeout=180).json()
    d.kill_power()
    record("scenario 3: boot → power cut at (s, %)",
           (round(time.monotonic() - boot_started, 1), cut_at["progress"]["percent"]))
    record("scenario 3: first boot states until the cut", _story(watch, mark, boot_started))

    first_boot = watch.states(after=mark)
    assert first_boot[0]["state"] == "starting", first_boot
    pulling = [s for s in first_boot if s["state"] == "pulling"]
    assert len(pulling) >= 2, first_boot
    done = [s["progress"]["bytes_done"] for s in pulling]
    assert done == sorted(done) and done[-1] > done[0], pulling
    assert all(s["progress"]["bytes_total"] == size for s in pulling), pulling
    assert all(abs(s["progress"]["percent"] - 100 * s["progress"]["bytes_done"] / size) < 1 for s in pulling)

    partials = list((d.root / "var/lib/edge-agent").rglob("*.edge-agent-partial"))
    assert len(partials) == 1, partials
    kept = partials[0].stat().st_size
    assert 0 < kept < size, (kept, size)
    record("scenario 3: partial file kept by the power cut (bytes of total)", (kept, size))
    return kept


def _second_boot_resumes(flashed: Flashed, hub: FakeHub, watch: StatusWatch, size: int, kept: int) -> None:
    """Boot again: the pull continues with a Range request from (at most) what was kept, and the device serves."""
    hub.throttle_bps = size // 4
    hub.reset_log()
    mark = watch.mark()
    resumed_at = time.monotonic()
    flashed.device.boot(until_running=False)
    watch.wait_state("online", after=mark, timeout=180)
    record("scenario 3: second boot → online (s)", round(time.monotonic() - resumed_at, 1))
    record("scenario 3: second boot states", _story(watch, mark, resumed_at))
    second_boot = [s["state"] for s in watch.states(after=mark)]
    assert second_boot[0] == "starting" and "pulling" in second_boot, second_boot

    gets = _file_gets(hub)
    starts = [_range_start(r.range) for r in gets]
    assert any(s is not None and 0 < s <= kept for s in starts), [(r.range, r.status) for r in gets]
    resume_from = min(s for s in starts if s)
    transferred = sum(r.body_bytes for r in gets if _range_start(r.range) not in (None, 0))
    assert transferred <= size - resume_from, (transferred, starts)
    headers = sum(r.body_bytes for r in gets if _range_start(r.range) in (None, 0))
    record("scenario 3: resumed at byte / bytes of the rest fetched / header-read bytes",
           (resume_from, transferred, headers))


def test_reboot_with_the_hub_unreachable_serves_from_the_cache(flashed: Flashed, hub: FakeHub) -> None:
    """The Hub stopped, the device reboots and serves its cached model."""
    d, port, device_id = flashed.device, flashed.port, flashed.device_id
    hub.stop()
    hub.reset_log()
    started = time.monotonic()
    d.reboot()
    wait_active(d)
    wait_online(port, device_id)
    record("scenario 4: reboot without a Hub → online (s)", round(time.monotonic() - started, 1))
    ask(port, device_id)
    assert hub.requests() == []
