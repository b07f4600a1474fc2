#!/usr/bin/env bash
# Install edge-agent on this one board, without Ansible: the same steps as roles/edge_agent.
#
#   sudo ./bootstrap.sh --wheelhouse DIR --model SPEC [options]
#
#   --wheelhouse DIR        wheels to install from: edge_agent-*.whl (required) and any prebuilt ones
#   --model SPEC            required: catalog NAME (gemma-3-270m-it), NAME:QUANT, or /abs/path/model.gguf
#   --device-id ID          MQTT topic level of this device (default: short host name)
#   --mqtt-host H  --mqtt-port P  --mqtt-user U  --mqtt-password-file F
#   --tls --ca-file F --cert-file F --tls-key-file F    broker TLS (files are copied to the device)
#   --hf-token-file F       the Hugging Face token, as a systemd credential
#   --fleet-pubkey-file F   the fleet's public key (edge-agent fleet keygen) as the fleet_pubkey credential:
#                           the device runs only fleet commands signed by its private key
#   --allow-unsigned-commands  no fleet key: run UNSIGNED fleet commands ([fleet] allow_unsigned = true).
#                           Without this or --fleet-pubkey-file the device refuses every fleet command
#                           (fine for an inference-only board; bootstrap warns)
#   --hub-endpoint URL      [hub] endpoint: a Hub mirror or test server
#   --hub-offline           [hub] offline = true: serve only what the cache holds
#   --catalog FILE          [model] catalog: a models.toml on the device instead of the shipped one
#   --n-ctx N               [model] n_ctx (default 2048)
#   --prepull               download the model now, as the service user, before the service starts
#   --operator USER         add an existing user to the edge-agent group (repeatable)
#   --reset-overrides       delete the fleet's runtime config overrides (edge-agent config reset-overrides)
#   --memory-max SIZE       MemoryMax= for the service (e.g. 1200M)
#   --shutdown-grace-s N    [inference] shutdown_grace_s (default 20); TimeoutStopSec follows
#   --with-mosquitto        a loopback-only Mosquitto on this board
#   --pip-offline           pip --no-index: every wheel must be in the wheelhouse (alias: --offline)
#   --no-build-tools        do not install compilers (default: only when no llama_cpp_python wheel is given)
#   --root DIR              install into an image at DIR (enabled, never started)
#   --no-start  --dry-run  -h|--help
#
# Idempotent: every step checks first and says "ok" (nothing to do) or "changed" (what it did);
# with --dry-run it says "would ..." and changes nothing. The last line is "done: N change(s)".
# pip's full output goes to /var/log/edge-agent-install.log (inside --root); compiling llama.cpp
# shows cmake's progress. The unit file is taken from the repository this script lives in.
set -euo pipefail
# The service user must read the venv pip writes, whatever umask sudo hands over; secrets and the
# install log get their own modes explicitly.
umask 022

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
ALLOW_UNSIGNED="false"
MODEL=""
N_CTX="2048"
HUB_ENDPOINT=""
HUB_OFFLINE="false"
CATALOG=""
PREPULL="false"
OPERATORS=()
RESET_OVERRIDES="false"
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
RUNTIME_PACKAGES=(libgomp1 libstdc++6 libgcc-s1)  # what llama_cpp/lib/*.so link against beyond glibc
INSTALL_LOG="/var/log/edge-agent-install.log"
OVERRIDES_FILE="$STATE_DIR/fleet/config-overrides.toml"
# Exit 0 if the venv's llama-cpp-python satisfies the Requires-Dist of the wheel in argv[1]
# (roles/edge_agent/vars/main.yml checks the same, and also the other dependencies and the installed files).
LLAMA_SATISFIED_PY='
import importlib.metadata as md, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
reqs = [Requirement(l.split(":", 1)[1]) for l in lines if l.startswith("Requires-Dist:")]
req = next(r for r in reqs if r.name.lower().replace("_", "-") == "llama-cpp-python")
sys.exit(0 if req.specifier.contains(md.version("llama_cpp_python"), prereleases=True) else 1)
'
CHANGED=0

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
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
        --allow-unsigned-commands) ALLOW_UNSIGNED="true"; shift ;;
        --model) MODEL="$2"; shift 2 ;;
        --n-ctx) N_CTX="$2"; shift 2 ;;
        --hub-endpoint) HUB_ENDPOINT="$2"; shift 2 ;;
        --hub-offline) HUB_OFFLINE="true"; shift ;;
        --catalog) CATALOG="$2"; shift 2 ;;
        --prepull) PREPULL="true"; shift ;;
        --operator) OPERATORS+=("$2"); shift 2 ;;
        --reset-overrides) RESET_OVERRIDES="true"; shift ;;
        --memory-max) MEMORY_MAX="$2"; shift 2 ;;
        --shutdown-grace-s) SHUTDOWN_GRACE_S="$2"; shift 2 ;;
        --with-mosquitto) WITH_MOSQUITTO="true"; shift ;;
        --pip-offline|--offline) OFFLINE="true"; shift ;;
        --no-build-tools) BUILD_TOOLS="false"; shift ;;
        --no-start) START="false"; shift ;;
        --dry-run) DRY_RUN="true"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "bootstrap: unknown option: $1" >&2; usage 2 ;;
    esac
done

[[ -n "$WHEELHOUSE" ]] || die "--wheelhouse DIR is required (pip wheel --no-deps -w DIR <repo>)"
[[ -n "$MODEL" ]] || die "--model is required: a catalog name (e.g. gemma-3-270m-it), NAME:QUANT \
(e.g. gemma-3-270m-it:Q8_0), or the absolute path of a .gguf file on this device (catalog: models.toml)"
[[ "$MODEL" =~ ^(/[^[:space:]]+|[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9_]+)?)$ ]] \
    || die "--model must be NAME, NAME:QUANT or an absolute path: $MODEL"
[[ "$N_CTX" =~ ^[0-9]+$ ]] || die "--n-ctx must be a number: $N_CTX"
if [[ "$PREPULL" == "true" && "$HUB_OFFLINE" == "true" && "$MODEL" != /* ]]; then
    die "--prepull needs the Hub, but --hub-offline was given"
fi
[[ -d "$WHEELHOUSE" ]] || die "wheelhouse not found: $WHEELHOUSE"
[[ "$DEVICE_ID" =~ ^[^/+#[:space:]]+$ ]] || die "--device-id must be one MQTT topic level: $DEVICE_ID"
[[ "$MQTT_PORT" =~ ^[0-9]+$ ]] || die "--mqtt-port must be a number: $MQTT_PORT"
[[ "$SHUTDOWN_GRACE_S" =~ ^[0-9]+$ ]] || die "--shutdown-grace-s must be whole seconds"
if [[ "$DRY_RUN" != "true" && "$(id -u)" -ne 0 ]]; then die "run as root (or use --dry-run)"; fi
if [[ -n "$FLEET_PUBKEY_FILE" ]]; then
    [[ -r "$FLEET_PUBKEY_FILE" ]] || die "--fleet-pubkey-file: cannot read $FLEET_PUBKEY_FILE"
    grep -q -- "-----BEGIN PUBLIC KEY-----" "$FLEET_PUBKEY_FILE" \
        || die "--fleet-pubkey-file $FLEET_PUBKEY_FILE is not a PEM public key (give fleet_pubkey.pem from 'edge-agent fleet keygen', never fleet_key.pem)"
fi
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

# Checks that only read, before anything changes (an empty --root in a dry run has nothing to read).
if [[ "$MODEL" == /* && ( "$DRY_RUN" != "true" || -d "$ROOT/etc" ) ]]; then
    [[ -f "$ROOT$MODEL" ]] || die "--model $MODEL: no such file${ROOT:+ in $ROOT}; copy the .gguf there first"
fi
for user in "${OPERATORS[@]}"; do
    [[ "$user" =~ ^[a-z_][a-z0-9_.-]*[$]?$ ]] || die "--operator: not a user name: $user"
    if [[ "$DRY_RUN" != "true" || -d "$ROOT/etc" ]]; then
        in_root getent passwd "$user" >/dev/null 2>&1 \
            || die "--operator $user: no such user${ROOT:+ in $ROOT} (bootstrap adds existing users to the group)"
    fi
done

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

# Run edge-agent as the service user, the way the unit does: HF_HOME in the state directory, JSON logs,
# and the hf_token credential (if installed) in a private $CREDENTIALS_DIRECTORY, never on a command line.
as_service() {
    # shellcheck disable=SC2016  # expanded by the inner sh, inside the root
    in_root sh -c '
        set -eu
        user="$1" config_dir="$2" state_dir="$3"; shift 3
        creds="$(mktemp -d)"
        trap '"'"'rm -rf "$creds"'"'"' EXIT
        if [ -f "$config_dir/credentials/hf_token" ]; then
            install -m 0400 -o "$user" "$config_dir/credentials/hf_token" "$creds/hf_token"
        fi
        chown "$user" "$creds"
        runuser -u "$user" -- env CREDENTIALS_DIRECTORY="$creds" HF_HOME="$state_dir/hf-cache" \
            EDGE_AGENT_LOG__FORMAT=json "$@"
    ' sh "$AGENT_USER" "$CONFIG_DIR" "$STATE_DIR" "$PREFIX/venv/bin/edge-agent" "$@"
}

# pip -v output -> the install log in full; on the terminal only pip's headline lines and the build's
# progress: make's "[ NN%]" lines, each percentage once, or ninja's "[N/M]" steps in 5 % strides
# (scikit-build-core builds with ninja when it finds it; compiling llama.cpp is ~200 steps).
show_progress() {
    awk '
        /^ *\[ *[0-9]+%\]/ { pct = $0; sub(/\].*/, "]", pct); if (pct != last) { last = pct; print "  build   " $0; fflush() } next }
        /^ *\[[0-9]+\/[0-9]+\] / {
            split(substr($1, 2), nm, "/"); stride = int(nm[1] * 20 / nm[2])
            if (stride != last_stride || nm[1] == nm[2]) { last_stride = stride; print "  build   " $0; fflush() }
            next
        }
        /^(Building wheel|Successfully|ERROR|error:)/ { print "  pip     " $0; fflush() }
    '
}

# Fleet commands are signed: say now what this device will do with them.
if [[ -n "$FLEET_PUBKEY_FILE" && "$ALLOW_UNSIGNED" == "true" ]]; then
    echo "bootstrap: warning: --allow-unsigned-commands is ignored: with --fleet-pubkey-file the device runs only signed fleet commands" >&2
    ALLOW_UNSIGNED="false"
elif [[ "$ALLOW_UNSIGNED" == "true" ]]; then
    echo "bootstrap: warning: --allow-unsigned-commands: this device runs UNSIGNED fleet commands; anyone who can publish to its command topics controls it" >&2
elif [[ -z "$FLEET_PUBKEY_FILE" ]]; then
    echo "bootstrap: warning: no --fleet-pubkey-file: this device will refuse every fleet command (edge-agent fleet cmd); give the fleet's public key (edge-agent fleet keygen) or --allow-unsigned-commands" >&2
fi

RESTART=0
mode="install"
[[ "$DRY_RUN" != "true" ]] || mode="dry run"
echo "edge-agent bootstrap ($mode): device $DEVICE_ID, wheel $(basename "$WHEEL")${ROOT:+, root $ROOT}"

# --- packages -------------------------------------------------------------------------------------
packages=(python3 python3-venv ca-certificates "${RUNTIME_PACKAGES[@]}")
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
for d in "$STATE_DIR" "$STATE_DIR/models" "$STATE_DIR/hf-cache" "$STATE_DIR/buffers" "$STATE_DIR/fleet"; do
    ensure_dir "$d" "$AGENT_USER:$AGENT_USER" 0700
done
# The operator group is the service's group: members read agent.toml and run `edge-agent` commands.
for user in "${OPERATORS[@]}"; do
    if in_root id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx "$AGENT_USER"; then
        ok "operator $user in group $AGENT_USER"
    else
        changed "usermod -aG $AGENT_USER $user"
        act in_root usermod -aG "$AGENT_USER" "$user"
    fi
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
arch="$(uname -m)"
case "$arch" in
    x86_64) cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *) cmake_args="-DGGML_NATIVE=ON" ;;
esac
# Rough compile times (docs/deploy.md says where each comes from).
case "$arch" in
    x86_64) build_minutes="5-15" ;;
    aarch64) build_minutes="15-40" ;;
    *) build_minutes="40-90" ;;
esac
# One compile job per core, but no more than one per ~700 MB of RAM (a Pi Zero 2 W has 512 MB).
mem_mb="$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo 2>/dev/null || echo 700)"
build_jobs="$(nproc 2>/dev/null || echo 1)"
(( build_jobs <= mem_mb / 700 )) || build_jobs=$((mem_mb / 700))
(( build_jobs >= 1 )) || build_jobs=1
pip_args=(--disable-pip-version-check --prefer-binary --find-links "$PREFIX/wheelhouse")
if [[ "$OFFLINE" == "true" ]]; then pip_args+=(--no-index); fi
wheel_version="$(basename "$WHEEL" | cut -d- -f2)"
installed_version="$(in_root "$PREFIX/venv/bin/python" -c \
    'import importlib.metadata as m; print(m.version("edge-agent"))' 2>/dev/null || true)"
# Does the venv's llama-cpp-python satisfy what the edge-agent wheel requires? If not, pip installs it
# (first install, or a raised requirement), which may mean compiling llama.cpp. Same check as the role.
llama_ok="false"
if in_root "$PREFIX/venv/bin/python" -c "$LLAMA_SATISFIED_PY" "$PREFIX/wheelhouse/$(basename "$WHEEL")" \
        >/dev/null 2>&1; then
    llama_ok="true"
fi
if [[ "$installed_version" == "$wheel_version" && $wheel_changed -eq 0 && "$llama_ok" == "true" ]]; then
    ok "edge-agent $installed_version installed"
else
    changed "pip install $(basename "$WHEEL") and its dependencies (log: $INSTALL_LOG)"
    if [[ "$llama_ok" != "true" ]]; then
        if compgen -G "$WHEELHOUSE/llama_cpp_python-*.whl" >/dev/null; then
            say "" "llama-cpp-python from the prebuilt wheel in the wheelhouse"
        else
            say "" "compiling llama.cpp (llama-cpp-python): roughly $build_minutes minutes on $arch with $build_jobs job(s); CMAKE_ARGS=$cmake_args"
        fi
    fi
    if [[ "$DRY_RUN" != "true" ]]; then
        started=$SECONDS
        install -m 0640 /dev/null "$ROOT$INSTALL_LOG"
        # A rebuilt wheel of the same version: pip would call it satisfied, so replace it first.
        in_root "$PREFIX/venv/bin/pip" install -q "${pip_args[@]}" --force-reinstall --no-deps \
            "$PREFIX/wheelhouse/$(basename "$WHEEL")" >/dev/null
        if ! in_root env CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$build_jobs" \
                "$PREFIX/venv/bin/pip" install -v "${pip_args[@]}" "$PREFIX/wheelhouse/$(basename "$WHEEL")" 2>&1 \
                | tee "$ROOT$INSTALL_LOG" | show_progress; then
            tail -n 30 "$ROOT$INSTALL_LOG" >&2
            die "pip install failed after $((SECONDS - started)) s; full log: $ROOT$INSTALL_LOG"
        fi
        say "" "installed in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
    fi
    RESTART=1
fi
# The venv is on nobody's PATH: operators (group edge-agent) and scripts call it by this name.
if [[ "$(readlink "$ROOT/usr/local/bin/edge-agent" 2>/dev/null)" == "$PREFIX/venv/bin/edge-agent" ]]; then
    ok "/usr/local/bin/edge-agent"
else
    changed "link /usr/local/bin/edge-agent -> $PREFIX/venv/bin/edge-agent"
    act mkdir -p "$ROOT/usr/local/bin"
    act ln -sfn "$PREFIX/venv/bin/edge-agent" "$ROOT/usr/local/bin/edge-agent"
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
    echo "# Fleet overrides ($OVERRIDES_FILE) win over this file."
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
    echo "[model]"
    if [[ "$MODEL" == /* ]]; then
        echo "path = $(toml_string "$MODEL")"
    else
        echo "name = $(toml_string "${MODEL%%:*}")"
        [[ "$MODEL" != *:* ]] || echo "quant = $(toml_string "${MODEL#*:}")"
    fi
    [[ -z "$CATALOG" ]] || echo "catalog = $(toml_string "$CATALOG")"
    echo "n_ctx = $N_CTX"
    if [[ -n "$HUB_ENDPOINT" || "$HUB_OFFLINE" == "true" ]]; then
        echo
        echo "[hub]"
        [[ -z "$HUB_ENDPOINT" ]] || echo "endpoint = $(toml_string "$HUB_ENDPOINT")"
        [[ "$HUB_OFFLINE" != "true" ]] || echo "offline = true"
    fi
    echo
    echo "[inference]"
    echo "shutdown_grace_s = $SHUTDOWN_GRACE_S"
    if [[ "$ALLOW_UNSIGNED" == "true" ]]; then
        echo
        echo "[fleet]"
        echo "# No fleet key: anyone who can publish to this device's command topics controls it."
        echo "allow_unsigned = true"
    fi
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

# --- fleet overrides and the model ----------------------------------------------------------------
if [[ "$RESET_OVERRIDES" == "true" ]]; then
    if [[ -e "$ROOT$OVERRIDES_FILE" ]]; then
        changed "edge-agent config reset-overrides (delete $OVERRIDES_FILE)"
        act as_service config reset-overrides --config "$CONFIG_DIR/agent.toml"
        RESTART=1
    else
        ok "no fleet config overrides"
    fi
fi
if [[ "$PREPULL" == "true" && "$MODEL" == /* ]]; then
    ok "model is a local file: nothing to pull"
elif [[ "$PREPULL" == "true" && "$DRY_RUN" == "true" ]]; then
    changed "edge-agent pull $MODEL (if not in the cache)"
elif [[ "$PREPULL" == "true" ]]; then
    # Before the service starts: its first start then finds the model in the cache.
    pulled="$(as_service pull "$MODEL" --config "$CONFIG_DIR/agent.toml" --json)" \
        || die "edge-agent pull $MODEL failed (see above)"
    if grep -q '"from_cache": true' <<<"$pulled"; then
        ok "model $MODEL in the cache"
    else
        changed "edge-agent pull $MODEL"
    fi
fi

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
