#!/usr/bin/env bash
# Run the whole test suite (unit, parity, real-ComfyUI end-to-end, browser). Installs what it needs
# first; chromium only where it can (else a notice says the browser test is skipped). Extra arguments
# go to pytest. Under .ci/run (CI=true, KEYFACE_REQUIRE_BROWSER=1) every missing piece is an error instead.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEYFACE_WITH_BROWSER=${KEYFACE_WITH_BROWSER:-1} bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${KEYFACE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
