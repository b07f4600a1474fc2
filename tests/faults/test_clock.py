"""The device's wall clock jumping ±1 h while the real daemon serves (libfaketime, real Mosquitto).

The daemon runs under libfaketime with ``FAKETIME_TIMESTAMP_FILE`` re-read on every call
(``FAKETIME_NO_CACHE=1``), so the test moves the daemon's wall clock by rewriting one file, like an NTP step
would; ``FAKETIME_DONT_FAKE_MONOTONIC=1`` leaves CLOCK_MONOTONIC alone, as a step does. Only the daemon is
faked: the broker and the operator (this test) keep the true time.

libfaketime 0.9.10 (Debian/Ubuntu) mishandles ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`` when
monotonic is not faked (wolfcw/libfaketime#426): Python 3.11's ``time.sleep`` fails with EINVAL (and with
monotonic faked, a +1 h offset makes it sleep an hour). A ten-line preload shim, listed before
libfaketime, sends monotonic sleeps straight to the kernel; every wall-clock call still goes through
libfaketime.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.signing import load_private_key, write_keypair
from agent.fleet.wire import build_command
from agent.transport.topics import command_topic
from tests.support.broker import Broker
from tests.support.daemon import Client, DaemonProcess, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_S = 300.0  # fleet.signature_window_s default

_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem) {
    if (clock_id == CLOCK_MONOTONIC)
        return syscall(SYS_clock_nanosleep, clock_id, flags, req, rem) == 0 ? 0 : errno;
    static int (*real)(clockid_t, int, const struct timespec *, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_nanosleep");
    return real(clock_id, flags, req, rem);
}
"""


@pytest.fixture(scope="session")
def faketime_preload(tmp_path_factory: pytest.TempPathFactory) -> str:
    """LD_PRELOAD value: the monotonic-sleep shim, then libfaketimeMT."""
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") + glob.glob("/usr/lib/faketime/*MT.so.1"))
    if not libs:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the clock_nanosleep shim for libfaketime 0.9.10")
    out = tmp_path_factory.mktemp("faketime")
    (out / "shim.c").write_text(_SHIM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out / "shim.so"), str(out / "shim.c"), "-ldl"],
                   check=True, capture_output=True)
    return f"{out / 'shim.so'}:{libs[0]}"


@dataclass
class DeviceClock:
    """The daemon's wall clock offset, in whole seconds from the true time."""

    path: Path

    def set(self, offset_s: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:+d}\n")
        os.replace(tmp, self.path)  # libfaketime re-reads it on every call: never let it see half a file

    def env(self, preload: str) -> dict[str, str]:
        return {"LD_PRELOAD": preload, "FAKETIME_TIMESTAMP_FILE": str(self.path), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def clock(tmp_path: Path) -> DeviceClock:
    c = DeviceClock(tmp_path / "faketime-offset")
    c.set(0)
    return c


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "keys")


@pytest.fixture
def faked_daemon(request: pytest.FixtureRequest, tmp_path: Path, broker: Broker, clock: DeviceClock,
                 faketime_preload: str) -> Iterator[Any]:
    """Factory: the real daemon under libfaketime with a fleet public key (``keys``); waits until it serves."""
    tiny_models: dict[str, Path] = request.getfixturevalue("tiny_models")
    keys: tuple[Path, Path] = request.getfixturevalue("keys")
    started: list[DaemonProcess] = []

    def start(gguf: str = "Q8_0", **sections: dict[str, Any]) -> DaemonProcess:
        fleet = {"public_key": str(keys[1]), "state_dir": str(tmp_path / "state-dev1" / "fleet"),
                 **sections.pop("fleet", {})}
        cfg = write_config(tmp_path / "agent.toml", port=broker.port, model_file=tiny_models[gguf],
                           model={"threads": 1, **sections.pop("model", {})}, fleet=fleet, **sections)
        d = DaemonProcess(config=cfg, workdir=tmp_path, env=clock.env(faketime_preload)).start()
        started.append(d)
        d.wait_event("agent_started", timeout=90)
        return d

    yield start
    for d in started:
        d.stop()


@dataclass
class Operator:
    """Signs commands with the fleet key at the operator's (true) clock and reads their results."""

    port: int
    key_path: Path
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.key = load_private_key(self.key_path)
        self.client = Client(self.port)
        self.client.subscribe("edge/dev1/cmd/result")

    def signed(self, name: str = "ping", *, skew_s: float = 0.0) -> dict[str, Any]:
        return build_command(name, {}, "device", "dev1", key=self.key, now=time.time() + skew_s,
                             command_id=f"{name}-{uuid.uuid4().hex[:8]}")

    def send(self, payload: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """Publish ``payload`` and return the next result for its id."""
        self.client.publish(command_topic("edge", "device", "dev1", payload["cmd"]), payload)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.client.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            result = json.loads(m.payload)
            if m.topic == "edge/dev1/cmd/result" and result.get("id") == payload["id"]:
                return result
        raise AssertionError(f"no result for {payload['id']}")

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def operator(broker: Broker, keys: tuple[Path, Path]) -> Iterator[Operator]:
    op = Operator(broker.port, keys[0])
    yield op
    op.close()


def serve(broker: Broker, **body: Any) -> tuple[dict[str, Any], float]:
    """One request; its final reply and the seconds it took."""
    c = Client(broker.port)
    try:
        t0 = time.monotonic()
        reply = c.collect(c.request("dev1", {"prompt": "hi", "max_tokens": 2, **body}), timeout=60)
        return json.loads(reply[-1].payload), time.monotonic() - t0
    finally:
        c.close()


def test_signed_command_windows_follow_the_device_clock_and_come_back_with_it(
    faked_daemon: Any, clock: DeviceClock, operator: Operator, broker: Broker
) -> None:
    """Commands signed at the true time are refused 'stale' while the device clock is 1 h ahead (issued_at
    "behind" it) or 1 h behind ("ahead of" it), and accepted again once it is back; replays of commands
    accepted before and during the jump are answered from the result store, never run again; requests are
    served throughout."""
    d = faked_daemon()
    before = operator.send(operator.signed())
    assert before["ok"], before
    assert abs(before["result"]["time"] - time.time()) < 5

    clock.set(+3600)
    ahead = operator.send(operator.signed())
    assert (ahead["ok"], ahead["error"]["code"]) == (False, "stale"), ahead
    assert "s behind this device's clock" in ahead["error"]["message"]
    # An operator whose clock agrees with the device's is accepted: proof the daemon's clock really moved.
    agreeing = operator.signed(skew_s=3600)
    moved = operator.send(agreeing)
    assert moved["ok"], moved
    assert abs(moved["result"]["time"] - (time.time() + 3600)) < 5
    reply, _ = serve(broker, deadline_ms=5000)
    assert reply["usage"]["completion_tokens"] == 2

    clock.set(0)
    back = operator.send(operator.signed())
    assert back["ok"], back
    for replay in (agreeing,):  # the command accepted during the jump, sent again after it
        again = operator.send(replay)
        assert again.get("duplicate") is True, again

    clock.set(-3600)
    behind = operator.send(operator.signed())
    assert (behind["ok"], behind["error"]["code"]) == (False, "stale"), behind
    assert "s ahead of this device's clock" in behind["error"]["message"]

    clock.set(0)
    assert operator.send(operator.signed())["ok"]
    reply, _ = serve(broker)
    assert reply["usage"]["completion_tokens"] == 2
    assert d.proc.poll() is None
    assert "Traceback" not in d.log_text()
    print(f"\n[clock windows] +1h: {ahead['error']['message']!r}; -1h: {behind['error']['message']!r}")


class ReplayAcceptedError(AssertionError):
    """A captured signed command was run a second time."""


def test_a_replay_after_the_clock_steps_back_is_refused_even_once_its_result_left_the_store(
    faked_daemon: Any, clock: DeviceClock, operator: Operator
) -> None:
    """With the result store at its minimum (16), a command captured before a +1 h/-1 h clock excursion and
    replayed after 16 newer commands must still be refused 'replayed' by the nonce cache."""
    faked_daemon(fleet={"result_cache_size": 16})

    def push_out_of_the_store() -> None:
        for _ in range(16):
            assert operator.send(operator.signed())["ok"]

    # Control, no jump: once the id is out of the result store, the nonce cache refuses the replay.
    control = operator.signed()
    assert operator.send(control)["ok"]
    push_out_of_the_store()
    refused = operator.send(control)
    assert (refused["ok"], refused["error"]["code"]) == (False, "replayed"), refused

    captured = operator.signed()
    assert operator.send(captured)["ok"]
    clock.set(+3600)
    assert operator.send(operator.signed(skew_s=3600))["ok"]  # an operator on the device's clock
    clock.set(0)
    push_out_of_the_store()
    replay = operator.send(captured)
    if replay["ok"]:
        raise ReplayAcceptedError(f"replay run again after the clock stepped back: {replay}")
    assert replay["error"]["code"] == "replayed", replay


def test_deadlines_use_the_monotonic_clock_through_a_two_hour_backward_jump(
    faked_daemon: Any, clock: DeviceClock, broker: Broker
) -> None:
    """Behind a long generation, a queued request with deadline_ms 30,000 is served and one with 500 ms is
    refused 'timeout' within about a second of its arrival (deadline + the 0.5 s expiry sweep), although the
    wall clock stepped from +1 h to -1 h while they waited; each request gets exactly one final reply."""
    faked_daemon(gguf="slow", model={"n_ctx": 3072}, inference={"max_tokens_limit": 3000})
    clock.set(+3600)
    c = Client(broker.port)
    try:
        sent = time.monotonic()
        long_run = c.request("dev1", {"prompt": "hi", "max_tokens": 3000, "id": "long"})
        patient = c.request("dev1", {"prompt": "hi", "max_tokens": 2, "deadline_ms": 30_000, "id": "patient"})
        hurried = c.request("dev1", {"prompt": "hi", "max_tokens": 2, "deadline_ms": 500, "id": "hurried"})
        hurried_sent = time.monotonic()
        clock.set(-3600)
        finals: dict[str, tuple[dict[str, Any], float]] = {}
        for name, topic in (("hurried", hurried), ("long", long_run), ("patient", patient)):
            msgs = c.collect(topic, timeout=90)
            finals[name] = (json.loads(msgs[-1].payload), time.monotonic() - (hurried_sent if name == "hurried"
                                                                              else sent))
        time.sleep(0.5)
        leftovers = []
        while not c.messages.empty():
            leftovers.append(c.messages.get())
        assert [m for m in leftovers if json.loads(m.payload).get("done")] == []  # nothing answered twice
    finally:
        c.close()
        clock.set(0)
    hurried_reply, hurried_s = finals["hurried"]
    assert hurried_reply["error"]["code"] == "timeout", hurried_reply
    # Its deadline plus the half-second expiry sweep, with slack for a loaded box; a wall-clock deadline would
    # have expired it at once (+1 h) or kept it until the long generation ended (-1 h).
    assert 0.45 <= hurried_s < 3.0, hurried_s
    long_reply, long_s = finals["long"]
    assert long_reply["usage"]["completion_tokens"] == 3000, long_reply
    assert long_s > hurried_s + (hurried_sent - sent)  # it was still queued behind the long one when it expired
    assert finals["patient"][0]["usage"]["completion_tokens"] == 2, finals["patient"]
    reply, _ = serve(broker)
    assert reply["usage"]["completion_tokens"] == 2
    print(f"\n[clock deadlines] 500 ms deadline answered 'timeout' after {hurried_s:.2f} s; long generation "
          f"{long_s:.2f} s; 30 s deadline served after {finals['patient'][1]:.2f} s")
