# shellcheck shell=bash
# Shared set-up for scripts/demo.sh and scripts/test.sh: system packages, a venv, edge-agent installed.
# Sourced, not executed. Idempotent: a second run installs nothing new.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGE_AGENT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
for pair in mosquitto:mosquitto mosquitto_rr:mosquitto-clients cmake:cmake g++:g++ make:make; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
"$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
[ -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || need_pkgs+=(python3-dev)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "==> installing system packages: ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# The Debian package starts a system-wide broker on 1883; the scripts start their own on a free port.

# llama.cpp build flags. x86: no -march=native — on CPUs that advertise AMX a native build segfaults
# on quantized weights (measured, issue 2); AVX2/FMA/F16C is what every x86-64 board we target has.
# ARM (Raspberry Pi): the native build is right.
case "$(uname -m)" in
  x86_64|amd64)
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" ;;
  *)
    export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" ;;
esac
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.edge-agent-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "==> installing edge-agent and its dependencies (llama-cpp-python compiles once: ~5 min on 2 idle cores, 12 min measured with the cores shared)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e "$ROOT[test,provisioning]"
  touch "$stamp"
fi
