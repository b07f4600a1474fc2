#!/usr/bin/env bash
# Run the whole test suite (unit + integration against real Mosquitto and real GGUF models).
# Extra arguments go to pytest, e.g. scripts/test.sh -k serving
set -euo pipefail
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
