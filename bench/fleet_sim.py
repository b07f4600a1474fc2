"""Fleet simulator: N simulated devices on a local Mosquitto, measuring command fan-out.

Each simulated device is real on the wire: its own MQTT client id and connection, a retained status
with a will, retained telemetry, subscriptions to its device, group and fleet command topics, and a
:class:`agent.fleet.service.FleetService` (idempotency store included) behind a fake DeviceControl;
no model. Devices are spread over a few worker processes (one paho network thread per device) so
one Python interpreter's GIL does not become the thing measured. The operator side is the same
:class:`agent.cli.fleet.Operator` that ``edge-agent fleet cmd`` uses.

    python bench/fleet_sim.py --devices 100 1000 --rounds 5

Writes bench/results/fleet.md (and prints the same table).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.cli.fleet import Operator  # noqa: E402 - needs the repo on sys.path when run as a script
from agent.logs import configure_logging  # noqa: E402
from tests.support.broker import free_port, wait_port  # noqa: E402
from tests.support.fleet import SimDevice, make_settings  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
GROUPS = ("north", "south", "east", "west")
# Result stores on tmpfs: on a real fleet every device fsyncs its own disk in parallel; here 1000
# devices would queue on one disk and the benchmark would measure that instead of the fan-out.
TMPFS = Path("/dev/shm")  # noqa: S108 - a private mkdtemp below it, on purpose


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_broker(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """Mosquitto tuned for many clients: no connection cap, deep queues, raised fd limit."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_connections -1",
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]) + "\n")

    raise_nofile()  # inherited by mosquitto: one fd per connection
    with (workdir / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
    wait_port(port)
    return proc


def host_devices(port: int, ids: list[str], state_root: str, ready: Any, stop: Any) -> None:
    """Worker process: run ``ids`` as simulated devices until ``stop`` is set."""
    configure_logging("warning", "console", stream=sys.stderr)
    sims = []
    for i, device in enumerate(ids):
        settings = make_settings(device, [GROUPS[i % len(GROUPS)]], port)
        sims.append(SimDevice(settings, Path(state_root) / device).start())
    for sim in sims:
        sim.wait_ready(120.0)
        sim.publish_telemetry()
    ready.put(len(sims))
    stop.wait()
    for sim in sims:
        with contextlib.suppress(Exception):
            sim.stop()


@dataclass
class Round:
    all_in_s: float
    latencies_s: list[float]
    executed_s: list[float]  # issued → device ran it (wall clocks of one machine): delivery + handling
    answered: int


@dataclass
class Measurement:
    devices: int
    processes: int
    startup_s: float
    rounds: list[Round]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(n: int, rounds: int, processes: int, workdir: Path, timeout_s: float) -> Measurement:
    port = free_port()
    broker = start_broker(workdir / f"broker-{n}", port)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    state_root = tempfile.mkdtemp(prefix=f"fleet-sim-{n}-", dir=TMPFS if TMPFS.is_dir() else None)
    ids = [f"sim{i:04d}" for i in range(n)]
    workers = [ctx.Process(target=host_devices, args=(port, ids[p::processes], state_root, ready, stop), daemon=True)
               for p in range(processes)]
    started = time.monotonic()
    op = Operator(make_settings("operator", port=port), client_id=f"bench-operator-{n}")
    try:
        for w in workers:
            w.start()
        up = 0
        while up < n:
            up += ready.get(timeout=timeout_s)
        startup = time.monotonic() - started
        op.start([op.status_filter, f"{op.prefix}/+/cmd/result"])
        deadline = time.monotonic() + 30
        while len(op.expected_for("all", None)) < n and time.monotonic() < deadline:
            op.settle(quiet_s=0.5, max_s=5.0)
        if len(op.expected_for("all", None)) < n:
            raise RuntimeError(f"only {len(op.expected_for('all', None))} of {n} devices visible")
        op.command("all", None, "ping", {}, timeout=timeout_s)  # warm-up: first-touch costs, page cache
        results = []
        for _ in range(rounds):
            run = op.command("all", None, "ping", {}, timeout=timeout_s)
            executed = [b["result"]["time"] - run.issued_at for b in run.results.values() if b.get("ok")]
            results.append(Round(max(run.latency_s.values()), list(run.latency_s.values()), executed, len(run.results)))
            time.sleep(0.5)
        return Measurement(n, processes, startup, results)
    finally:
        with contextlib.suppress(Exception):
            op.stop()
        stop.set()
        for w in workers:
            w.join(60)
            if w.is_alive():
                w.kill()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(state_root, ignore_errors=True)


def render(results: list[Measurement], command: str) -> str:
    version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
    lines = [
        "# Fleet command fan-out (bench/fleet_sim.py)",
        "",
        f"`{command}` on {platform.machine()} with {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{version[0] if version else 'mosquitto'} on loopback. Broker, operator and all simulated devices share "
        "the machine. Each device: own MQTT 5 client, QoS 1, FleetService with its persisted result store "
        "(on tmpfs). Timed: `cmd all ping` publish → result received by the operator, per device.",
        "",
        "| devices | processes | startup s | rounds | all results in, median s | worst round s | p50 ms | p99 ms |"
        " executed p50 / p99 ms | answered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results:
        latencies = [x for r in m.rounds for x in r.latencies_s]
        executed = [x for r in m.rounds for x in r.executed_s]
        all_in = [r.all_in_s for r in m.rounds]
        answered = f"{min(r.answered for r in m.rounds)}/{m.devices}"
        lines.append(
            f"| {m.devices} | {m.processes} | {m.startup_s:.1f} | {len(m.rounds)} | {statistics.median(all_in):.3f} | "
            f"{max(all_in):.3f} | {percentile(latencies, 0.5) * 1000:.1f} | {percentile(latencies, 0.99) * 1000:.1f} "
            f"| {percentile(executed, 0.5) * 1000:.0f} / {percentile(executed, 0.99) * 1000:.0f} | {answered} |"
        )
    lines += [
        "",
        "p50/p99: publish → result at the operator, over every device in every timed round (after one warm-up).",
        "executed: issued_at → the device ran the command (its result's `time`; same machine, same clock),",
        "i.e. broker delivery plus the simulated device's own handling; the rest is the way back.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=4, help="worker processes hosting the devices")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound for each wait, seconds")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fleet.md")
    args = parser.parse_args()
    configure_logging("warning", "console", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        results = [measure(n, args.rounds, min(args.processes, n), Path(tmp), args.timeout) for n in args.devices]
    command = "python bench/fleet_sim.py " + " ".join(sys.argv[1:])
    text = render(results, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
