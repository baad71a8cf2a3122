#!/usr/bin/env bash
# The main job: set up, start a real ComfyUI with the KeyFace pack, render
# workflows/keyface_talking_head.json on the bundled portrait and speech, print where the mp4 is, and
# leave the UI on http://127.0.0.1:8188 (Ctrl-C stops it).
#
#   bash scripts/run.sh            # render, then keep the UI running
#   bash scripts/run.sh --once     # render and exit (uses a free port if 8188 is taken)
#
# Models: the folder in $KEYFACE_MODELS, else ./models, when it holds the KeyFace files
# (keyframe.pt, interpolation.pt, interpolation_bad.pt, WavLM-Base+.pt,
# BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt, wav2vec2-base-960h/, svd_vae.safetensors or the
# diffusers VAE file). Otherwise tiny RANDOM smoke weights are generated and the video is NOISE.
# Environment: KEYFACE_PORT (default 8188), KEYFACE_IMAGE / KEYFACE_AUDIO (other inputs),
# KEYFACE_RUN_DIR (default ./.cache/run: ComfyUI's input/output/user folders),
# KEYFACE_THREADS (torch CPU threads in ComfyUI; default 1 on machines with <= 2 cores).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ONCE=0
for arg in "$@"; do
  case "$arg" in
    --once) ONCE=1 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;  # the comment block above
    *) echo "unknown argument: $arg (use --once or --help)" >&2; exit 2 ;;
  esac
done

KEYFACE_WITH_BROWSER=${KEYFACE_WITH_BROWSER:-0} bash "$ROOT/scripts/setup_env.sh"
PY="${KEYFACE_VENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
export KEYFACE_ONCE=$ONCE PYTHONUNBUFFERED=1
exec "$PY" - <<'PYEOF'
import json, os, shutil, signal, socket, sys, time
from pathlib import Path

ROOT = Path.cwd()
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from comfy_server import ComfyServer, free_port  # noqa: E402
from keyface import model_files, smoke  # noqa: E402
from workflow_to_api import convert  # noqa: E402

once = os.environ.get("KEYFACE_ONCE") == "1"
run_dir = Path(os.environ.get("KEYFACE_RUN_DIR", ROOT / ".cache" / "run")).resolve()
image = Path(os.environ.get("KEYFACE_IMAGE", ROOT / "tests/fixtures/media/face_grace_hopper.jpg")).resolve()
audio = Path(os.environ.get("KEYFACE_AUDIO", ROOT / "tests/fixtures/media/speech_male_arctic_a0007.wav")).resolve()

# ---- models: real ones if present, else smoke weights (loudly) --------------------------------
candidates = [os.environ.get("KEYFACE_MODELS"), str(ROOT / "models")]
models_dir, real = None, False
for c in candidates:
    if c and model_files.is_complete(c) and not smoke.is_smoke_folder(c):
        models_dir, real = Path(c).resolve(), True
        break
if models_dir is None:
    for c in candidates:
        if c and Path(c).is_dir():
            found = model_files.find_models(c)
            if found:
                print(f"[run] {c} has {sorted(found)} but lacks {model_files.missing(found)}", flush=True)
    models_dir = (ROOT / ".cache" / "smoke_models").resolve()
    if not model_files.is_complete(models_dir):
        smoke.write_smoke_models(models_dir, seed=0)
    bar = "!" * 78
    print(f"\n{bar}\n!!  NO KEYFACE WEIGHTS FOUND (looked in $KEYFACE_MODELS and ./models).\n"
          f"!!  Using tiny RANDOM smoke weights from {models_dir}:\n"
          f"!!  THE VIDEO WILL BE NOISE (64x64). It only proves the pipeline runs end to end.\n"
          f"!!  Put the released files in ./models (or set KEYFACE_MODELS) for a real render.\n{bar}\n", flush=True)

# ---- ComfyUI ------------------------------------------------------------------------------------
def port_free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False

port = int(os.environ.get("KEYFACE_PORT", "8188"))
if not port_free(port):
    if once and "KEYFACE_PORT" not in os.environ:
        port = free_port()
    else:
        sys.exit(f"[run] port {port} is in use; set KEYFACE_PORT to another port")
threads = os.environ.get("KEYFACE_THREADS")
threads = int(threads) if threads else (1 if (os.cpu_count() or 1) <= 2 else 0)
run_dir.mkdir(parents=True, exist_ok=True)
server = ComfyServer(run_dir, port, models_dir, threads=threads)
server.prepare()
shutil.copy(image, server.input_dir / image.name)
shutil.copy(audio, server.input_dir / audio.name)
print(f"[run] starting ComfyUI on {server.url} (log: {server.log_path})", flush=True)
t0 = time.monotonic()
server.start(timeout=300)
print(f"[run] ComfyUI is up after {time.monotonic() - t0:.1f} s", flush=True)

def stop(*_):
    server.stop()
    sys.exit(130)

signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)

try:
    wf = json.loads((ROOT / "workflows" / "keyface_talking_head.json").read_text(encoding="utf-8"))
    prompt = convert(wf, server.object_info())
    found = model_files.find_models(models_dir)
    rel = {k: os.path.relpath(v, models_dir).replace(os.sep, "/") for k, v in found.items()}
    for node in prompt.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "LoadImage":
            ins["image"] = image.name
        elif ct == "LoadAudio":
            ins["audio"] = audio.name
        elif ct == "KeyFaceVAELoader":
            ins["vae_name"] = rel["vae"]
        elif ct == "KeyFaceAudioEncoderLoader":
            ins.update(wavlm_name=rel["wavlm"], beats_name=rel["beats"], wav2vec2_name=rel["wav2vec2"])
        elif ct == "KeyFaceKeyframeModelLoader":
            ins["model_name"] = rel["keyframe"]
        elif ct == "KeyFaceInterpolationModelLoader":
            ins.update(model_name=rel["interpolation"], bad_model_name=rel["interpolation_bad"])
    print(f"[run] rendering {image.name} + {audio.name} with {'the KeyFace weights' if real else 'SMOKE (noise) weights'}"
          f" from {models_dir}", flush=True)
    t0 = time.monotonic()
    pid = server.submit(prompt)
    entry = server.wait(pid, timeout=24 * 3600)
    wall = time.monotonic() - t0
    if entry["status"]["status_str"] != "success":
        msgs = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        print(f"[run] the render FAILED: {json.dumps(msgs, indent=1)[:4000]}", file=sys.stderr)
        print(f"[run] ComfyUI log: {server.log_path}", file=sys.stderr)
        server.stop()
        sys.exit(1)
    videos = [server.output_dir / i.get("subfolder", "") / i["filename"]
              for o in entry["outputs"].values() for i in o.get("images", [])
              if i.get("type") == "output" and i["filename"].endswith(".mp4")]
    from keyface.video_io import probe_mp4
    for v in videos:
        info = probe_mp4(v)
        print(f"[run] wrote {v}\n[run]   {info['frames']} frames at {info['fps']:g} fps, {info['width']}x{info['height']}, "
              f"audio {info['audio_seconds']:.3f} s; render took {wall:.1f} s"
              + ("" if real else "  (SMOKE WEIGHTS: the picture is noise)"), flush=True)
    if not videos:
        print("[run] the workflow finished but wrote no mp4", file=sys.stderr)
        server.stop()
        sys.exit(1)
    if once:
        server.stop()
        sys.exit(0)
    print(f"[run] the ComfyUI UI stays open at {server.url}  (workflow templates: KeyFace; Ctrl-C to stop)", flush=True)
    while server.proc.poll() is None:
        time.sleep(1)
    sys.exit(server.proc.returncode or 0)
except BaseException:
    server.stop()
    raise
PYEOF
