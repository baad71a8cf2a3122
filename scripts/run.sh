#!/usr/bin/env bash
# The main job: set up, start a real ComfyUI with the KeyFace pack, render
# "workflows/KeyFace - Talking head.json" on the bundled portrait and speech, print where the mp4 is, and
# leave the UI on http://127.0.0.1:8188 (Ctrl-C stops it).
#
#   bash scripts/run.sh            # render, then keep the UI running
#   bash scripts/run.sh --once     # render and exit (uses a free port if 8188 is taken)
#   bash scripts/run.sh --cpu      # run ComfyUI on the CPU even with real weights and a GPU
#
# Models: $KEYFACE_MODELS, else ./models, laid out like ComfyUI/models (it may be ComfyUI's own):
#   keyface/         keyframe.pt, interpolation.pt, interpolation_bad.pt (or .safetensors conversions)
#   audio_encoders/  WavLM-Base+.pt, BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt,
#                    wav2vec2-base-960h/ (config.json + model.safetensors)   [or all in keyface/]
#   vae/             svd_vae.safetensors (or diffusion_pytorch_model[.fp16].safetensors) [or in keyface/]
# README.md "Models" has the download commands. Without a complete set, tiny RANDOM smoke weights are
# generated and the video is NOISE. Real weights run on the GPU when CUDA is available; smoke weights,
# --cpu or no CUDA run ComfyUI with --cpu.
# Environment: KEYFACE_PORT (default 8188), KEYFACE_IMAGE / KEYFACE_AUDIO (other inputs),
# KEYFACE_RUN_DIR (default ./.cache/run: ComfyUI's input/output/user folders),
# KEYFACE_THREADS (torch CPU threads in ComfyUI; default 1 on machines with <= 2 cores),
# KEYFACE_VENV / KEYFACE_COMFYUI (default ./.venv, ./.comfyui: see scripts/setup_env.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for arg in "$@"; do  # checked before the setup, so a typo does not cost an install
  case "$arg" in
    --once|--cpu) ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;  # the comment block above
    *) echo "unknown argument: $arg (use --once, --cpu or --help)" >&2; exit 2 ;;
  esac
done

KEYFACE_WITH_BROWSER=0 bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PYTHONUNBUFFERED=1 exec "${KEYFACE_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/run_main.py" "$@"
