#!/usr/bin/env bash
# Install edge-agent on this one board, without Ansible: the same steps as roles/edge_agent.
#
#   sudo ./bootstrap.sh --wheelhouse ./wheelhouse --device-id kitchen-1 --mqtt-host broker.lan \
#        [--mqtt-port 1883] [--mqtt-user edge --mqtt-password-file pw.txt] [--hf-token-file t.txt] \
#        [--tls --ca-file ca.crt --cert-file client.crt --tls-key-file client.key] \
#        [--fleet-pubkey-file fleet.pub] [--memory-max 1200M] [--with-mosquitto] [--no-start] [--dry-run]
#
# Idempotent: every step checks first and says "ok" (nothing to do) or "changed" (what it did);
# with --dry-run it says "would ..." and changes nothing. The unit file is taken from the repository
# this script lives in (../systemd/edge-agent.service). --root installs into another root directory
# (an image being built): the service is then enabled but not started.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"

ROOT=""
WHEELHOUSE=""
DEVICE_ID="$(hostname -s 2>/dev/null || echo edge-agent)"
MQTT_HOST="127.0.0.1"
MQTT_PORT="1883"
MQTT_USER=""
MQTT_TLS="false"
CA_FILE=""
CERT_FILE=""
MQTT_PASSWORD_FILE=""
HF_TOKEN_FILE=""
TLS_KEY_FILE=""
FLEET_PUBKEY_FILE=""
MEMORY_MAX=""
SHUTDOWN_GRACE_S="20"
WITH_MOSQUITTO="false"
START="true"
DRY_RUN="false"
OFFLINE="false"
BUILD_TOOLS="auto"

AGENT_USER="edge-agent"
PREFIX="/opt/edge-agent"
CONFIG_DIR="/etc/edge-agent"
STATE_DIR="/var/lib/edge-agent"
UNIT_DIR="/etc/systemd/system"
CREDENTIAL_IDS=(mqtt_password tls_key hf_token fleet_pubkey)
CHANGED=0

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

die() { echo "bootstrap: error: $*" >&2; exit 2; }
say() { printf '%-8s %s\n' "$1" "$2"; }
ok() { say "ok" "$1"; }
changed() {
    CHANGED=$((CHANGED + 1))
    if [[ "$DRY_RUN" == "true" ]]; then say "would" "$1"; else say "changed" "$1"; fi
}
# Run a command unless --dry-run.
act() { if [[ "$DRY_RUN" == "true" ]]; then return 0; fi; "$@"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) ROOT="${2%/}"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
        --device-id) DEVICE_ID="$2"; shift 2 ;;
        --mqtt-host) MQTT_HOST="$2"; shift 2 ;;
        --mqtt-port) MQTT_PORT="$2"; shift 2 ;;
        --mqtt-user) MQTT_USER="$2"; shift 2 ;;
        --mqtt-password-file) MQTT_PASSWORD_FILE="$2"; shift 2 ;;
        --tls) MQTT_TLS="true"; shift ;;
        --ca-file) CA_FILE="$2"; shift 2 ;;
        --cert-file) CERT_FILE="$2"; shift 2 ;;
        --tls-key-file) TLS_KEY_FILE="$2"; shift 2 ;;
        --hf-token-file) HF_TOKEN_FILE="$2"; shift 2 ;;
        --fleet-pubkey-file) FLEET_PUBKEY_FILE="$2"; shift 2 ;;
        --memory-max) MEMORY_MAX="$2"; shift 2 ;;
        --shutdown-grace-s) SHUTDOWN_GRACE_S="$2"; shift 2 ;;
        --with-mosquitto) WITH_MOSQUITTO="true"; shift ;;
        --offline) OFFLINE="true"; shift ;;
        --no-build-tools) BUILD_TOOLS="false"; shift ;;
        --no-start) START="false"; shift ;;
        --dry-run) DRY_RUN="true"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "bootstrap: unknown option: $1" >&2; usage 2 ;;
    esac
done

[[ -n "$WHEELHOUSE" ]] || die "--wheelhouse DIR is required (pip wheel --no-deps -w DIR <repo>)"
[[ -d "$WHEELHOUSE" ]] || die "wheelhouse not found: $WHEELHOUSE"
[[ "$DEVICE_ID" =~ ^[^/+#[:space:]]+$ ]] || die "--device-id must be one MQTT topic level: $DEVICE_ID"
[[ "$MQTT_PORT" =~ ^[0-9]+$ ]] || die "--mqtt-port must be a number: $MQTT_PORT"
[[ "$SHUTDOWN_GRACE_S" =~ ^[0-9]+$ ]] || die "--shutdown-grace-s must be whole seconds"
if [[ "$DRY_RUN" != "true" && "$(id -u)" -ne 0 ]]; then die "run as root (or use --dry-run)"; fi
shopt -s nullglob
wheels=("$WHEELHOUSE"/edge_agent-*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -gt 0 ]] || die "no edge_agent-*.whl in $WHEELHOUSE"
WHEEL="$(printf '%s\n' "${wheels[@]}" | sort | tail -n 1)"
if [[ "$BUILD_TOOLS" == "auto" ]]; then
    if compgen -G "$WHEELHOUSE/llama_cpp_python-*.whl" >/dev/null; then BUILD_TOOLS="false"; else BUILD_TOOLS="true"; fi
fi
# Outside a booted system (an image in --root) nothing can be started.
if [[ -n "$ROOT" ]] || [[ ! -d /run/systemd/system ]]; then START="false"; fi

# Run a command inside the target root.
in_root() { if [[ -n "$ROOT" ]]; then chroot "$ROOT" "$@"; else "$@"; fi; }

# Install $2 (file content on stdin) at $1 with owner $3 and mode $4, only if it differs.
install_content() {
    local dest="$1" owner="$2" mode="$3" tmp
    tmp="$(mktemp)"
    cat >"$tmp"
    if [[ -f "$ROOT$dest" ]] && cmp -s "$tmp" "$ROOT$dest" \
        && [[ "$(stat -c '%a' "$ROOT$dest")" == "${mode#0}" ]]; then
        ok "$dest"
        rm -f "$tmp"
        return 1
    fi
    changed "install $dest (mode $mode)"
    if [[ "$DRY_RUN" != "true" ]]; then
        install -m "$mode" "$tmp" "$ROOT$dest"
        in_root chown "$owner" "$dest"
    fi
    rm -f "$tmp"
    return 0
}

ensure_dir() {
    local path="$1" owner="$2" mode="$3"
    if [[ -d "$ROOT$path" ]] && [[ "$(stat -c '%a' "$ROOT$path")" == "${mode#0}" ]] \
            && [[ "$(in_root stat -c '%U:%G' "$path" 2>/dev/null)" == "$owner" ]]; then
        ok "directory $path"
        return 0
    fi
    changed "directory $path ($owner $mode)"
    act mkdir -p "$ROOT$path"
    act chmod "$mode" "$ROOT$path"
    act in_root chown "$owner" "$path"
}

toml_string() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

RESTART=0
mode="install"
[[ "$DRY_RUN" != "true" ]] || mode="dry run"
echo "edge-agent bootstrap ($mode): device $DEVICE_ID, wheel $(basename "$WHEEL")${ROOT:+, root $ROOT}"

# --- packages -------------------------------------------------------------------------------------
packages=(python3 python3-venv ca-certificates)
if [[ "$BUILD_TOOLS" == "true" ]]; then packages+=(build-essential cmake python3-dev pkg-config); fi
if [[ "$WITH_MOSQUITTO" == "true" ]]; then packages+=(mosquitto); fi
missing=()
for p in "${packages[@]}"; do
    # shellcheck disable=SC2016  # ${Status} is dpkg-query's format, not a shell expansion
    if ! in_root dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    ok "packages ${packages[*]}"
else
    changed "apt-get install ${missing[*]}"
    act in_root apt-get update -q
    act in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- user and directories -------------------------------------------------------------------------
if in_root getent passwd "$AGENT_USER" >/dev/null 2>&1; then
    ok "user $AGENT_USER"
else
    changed "create system user $AGENT_USER"
    act in_root useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "edge-agent daemon" "$AGENT_USER"
fi
GROUP_OWNER="root:$AGENT_USER"
ensure_dir "$PREFIX" root:root 0755
ensure_dir "$PREFIX/wheelhouse" root:root 0755
ensure_dir "$CONFIG_DIR" "$GROUP_OWNER" 0750
ensure_dir "$CONFIG_DIR/tls" "$GROUP_OWNER" 0750
ensure_dir "$CONFIG_DIR/credentials" root:root 0700
ensure_dir "$UNIT_DIR/edge-agent.service.d" root:root 0755
for d in "$STATE_DIR" "$STATE_DIR/models" "$STATE_DIR/hf-cache" "$STATE_DIR/buffers"; do
    ensure_dir "$d" "$AGENT_USER:$AGENT_USER" 0700
done

# --- venv and wheels ------------------------------------------------------------------------------
wheel_changed=0
for w in "$WHEELHOUSE"/*.whl; do
    # shellcheck disable=SC2094  # reads the wheelhouse copy, writes under $ROOT$PREFIX: different files
    if install_content "$PREFIX/wheelhouse/$(basename "$w")" root:root 0644 <"$w"; then
        [[ "$(basename "$w")" == "$(basename "$WHEEL")" ]] && wheel_changed=1
    fi
done
if [[ -x "$ROOT$PREFIX/venv/bin/python" ]]; then
    ok "virtualenv $PREFIX/venv"
else
    changed "python3 -m venv $PREFIX/venv"
    act in_root python3 -m venv "$PREFIX/venv"
fi
case "$(uname -m)" in
    x86_64) cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *) cmake_args="-DGGML_NATIVE=ON" ;;
esac
pip_args=(--disable-pip-version-check --prefer-binary --find-links "$PREFIX/wheelhouse")
if [[ "$OFFLINE" == "true" ]]; then pip_args+=(--no-index); fi
wheel_version="$(basename "$WHEEL" | cut -d- -f2)"
installed_version="$(in_root "$PREFIX/venv/bin/python" -c \
    'import importlib.metadata as m; print(m.version("edge-agent"))' 2>/dev/null || true)"
if [[ "$installed_version" == "$wheel_version" && $wheel_changed -eq 0 ]]; then
    ok "edge-agent $installed_version installed"
else
    changed "pip install $(basename "$WHEEL") (CMAKE_ARGS=$cmake_args)"
    act in_root env CMAKE_ARGS="$cmake_args" "$PREFIX/venv/bin/pip" install -q "${pip_args[@]}" \
        --force-reinstall --no-deps "$PREFIX/wheelhouse/$(basename "$WHEEL")"
    act in_root env CMAKE_ARGS="$cmake_args" "$PREFIX/venv/bin/pip" install -q "${pip_args[@]}" \
        "$PREFIX/wheelhouse/$(basename "$WHEEL")"
    RESTART=1
fi

# --- configuration --------------------------------------------------------------------------------
if [[ -n "$CA_FILE" ]] && install_content "$CONFIG_DIR/tls/ca.crt" "$GROUP_OWNER" 0640 <"$CA_FILE"; then
    RESTART=1
fi
if [[ -n "$CERT_FILE" ]] && install_content "$CONFIG_DIR/tls/client.crt" "$GROUP_OWNER" 0640 <"$CERT_FILE"; then
    RESTART=1
fi
config="$(
    echo "# Written by provisioning/bootstrap.sh. Reference: docs/configuration.md."
    echo "device_id = $(toml_string "$DEVICE_ID")"
    echo
    echo "[mqtt]"
    echo "host = $(toml_string "$MQTT_HOST")"
    echo "port = $MQTT_PORT"
    echo "tls = $MQTT_TLS"
    [[ -z "$MQTT_USER" ]] || echo "username = $(toml_string "$MQTT_USER")"
    [[ -z "$CA_FILE" ]] || echo "ca_file = \"$CONFIG_DIR/tls/ca.crt\""
    [[ -z "$CERT_FILE" ]] || echo "cert_file = \"$CONFIG_DIR/tls/client.crt\""
    echo
    echo "[inference]"
    echo "shutdown_grace_s = $SHUTDOWN_GRACE_S"
)"
if [[ "$DRY_RUN" != "true" ]]; then
    # Validate before installing: a bad value never replaces a working config.
    candidate="$(mktemp -p "$ROOT/tmp")"
    printf '%s\n' "$config" >"$candidate"
    in_root "$PREFIX/venv/bin/edge-agent" config check --config "${candidate#"$ROOT"}" >/dev/null \
        || { rm -f "$candidate"; die "generated agent.toml does not pass 'edge-agent config check'"; }
    rm -f "$candidate"
fi
printf '%s\n' "$config" | install_content "$CONFIG_DIR/agent.toml" "$GROUP_OWNER" 0640 && RESTART=1

# --- credentials (root-only; systemd hands copies to the service) ---------------------------------
declare -A cred_src=([mqtt_password]="$MQTT_PASSWORD_FILE" [tls_key]="$TLS_KEY_FILE"
                     [hf_token]="$HF_TOKEN_FILE" [fleet_pubkey]="$FLEET_PUBKEY_FILE")
dropin="# Written by provisioning/bootstrap.sh: only configured secrets are listed.
[Service]"
for id in "${CREDENTIAL_IDS[@]}"; do
    src="${cred_src[$id]}"
    if [[ -n "$src" ]]; then
        [[ -r "$src" ]] || die "cannot read $src"
        install_content "$CONFIG_DIR/credentials/$id" root:root 0600 <"$src" && RESTART=1
        dropin+=$'\n'"LoadCredential=$id:$CONFIG_DIR/credentials/$id"
    elif [[ -e "$ROOT$CONFIG_DIR/credentials/$id" ]]; then
        changed "remove unconfigured credential $id"
        act rm -f "$ROOT$CONFIG_DIR/credentials/$id"
        RESTART=1
    fi
done
printf '%s\n' "$dropin" | install_content "$UNIT_DIR/edge-agent.service.d/10-credentials.conf" root:root 0644 && RESTART=1

# --- systemd --------------------------------------------------------------------------------------
install_content "$UNIT_DIR/edge-agent.service" root:root 0644 <"$REPO_DIR/systemd/edge-agent.service" && RESTART=1
resources="[Service]
TimeoutStopSec=$((SHUTDOWN_GRACE_S + 10))s"
[[ -z "$MEMORY_MAX" ]] || resources+=$'\n'"MemoryMax=$MEMORY_MAX"
printf '%s\n' "$resources" | install_content "$UNIT_DIR/edge-agent.service.d/20-resources.conf" root:root 0644 && RESTART=1

if [[ "$WITH_MOSQUITTO" == "true" ]]; then
    printf '%s\n' "listener 1883 127.0.0.1" "allow_anonymous true" "set_tcp_nodelay true" \
        | install_content /etc/mosquitto/conf.d/edge-agent.conf root:root 0644 \
        && { [[ "$START" != "true" ]] || act systemctl restart mosquitto.service; }
fi

enable_units=(edge-agent.service)
[[ "$WITH_MOSQUITTO" != "true" ]] || enable_units+=(mosquitto.service)
for unit in "${enable_units[@]}"; do
    if [[ -L "$ROOT$UNIT_DIR/multi-user.target.wants/$unit" ]]; then
        ok "enabled $unit"
    else
        changed "systemctl enable $unit"
        if [[ -n "$ROOT" ]]; then act systemctl --root="$ROOT" enable "$unit" >/dev/null 2>&1
        else act systemctl enable "$unit" >/dev/null 2>&1; fi
    fi
done

if [[ "$START" == "true" ]]; then
    if [[ $RESTART -eq 1 ]]; then
        changed "systemctl daemon-reload && systemctl restart edge-agent"
        act systemctl daemon-reload
        act systemctl restart edge-agent.service
    elif systemctl is-active --quiet edge-agent.service; then
        ok "edge-agent running"
    else
        changed "systemctl start edge-agent"
        act systemctl start edge-agent.service
    fi
else
    say "skipped" "start/restart (no running systemd${ROOT:+ in $ROOT}, or --no-start)"
fi

if [[ "$DRY_RUN" == "true" ]]; then
    echo "dry run: $CHANGED change(s) would be made"
else
    echo "done: $CHANGED change(s)"
fi
