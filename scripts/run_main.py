"""The Python half of scripts/run.sh (run that, not this: it sets up the environment first).

Finds the models, starts a real ComfyUI with the pack, renders the workflow "workflows/KeyFace - Talking head.json"
(scripts/workflow_files.py) on the bundled portrait and speech, prints where the mp4 is, then keeps the UI open (or exits: --once).

Models root: ``$KEYFACE_MODELS``, else ``./models``, laid out like ``ComfyUI/models`` (so it can be
ComfyUI's own models folder): the KeyFace files in ``<root>/keyface/``; the audio encoders there or in
``<root>/audio_encoders/``; the VAE there or in ``<root>/vae/``. File names: keyface/model_files.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]  # comfyui_server, workflow_to_api, workflow_files; keyface

import workflow_files  # noqa: E402
from keyface import model_files, smoke  # noqa: E402

KEYFACE_FOLDER = model_files.KEYFACE_FOLDER
find_layout = model_files.find_layout  # the layout the loader nodes search


def combo_values(root, found) -> dict[str, str]:
    """{kind: loader combo value}: the path relative to the ComfyUI folder it was found in."""
    return {kind: os.path.relpath(path, Path(root) / folder).replace(os.sep, "/")
            for kind, (folder, path) in found.items()}


def use_cpu(real_weights: bool, force_cpu: bool, cuda_available: bool) -> tuple[bool, str]:
    """(run ComfyUI with --cpu?, why). Smoke weights stay on the CPU, like the tests, so their output
    is the same everywhere; real weights use the GPU when there is one (512 px renders are slow on a CPU)."""
    if force_cpu:
        return True, "--cpu was given"
    if not real_weights:
        return True, "smoke weights always run on the CPU"
    if not cuda_available:
        return True, "no CUDA device is available"
    return False, "real weights and a CUDA device: ComfyUI picks the GPU"


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception as e:  # a broken driver must not stop a CPU render
        print(f"[run] CUDA check failed ({e}); using the CPU", flush=True)
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_models(root: Path) -> tuple[Path, dict, bool]:
    """(models root, layout, real?): ``root`` when it holds every file (and not smoke ones), else
    smoke weights generated under .cache/smoke_models, announced loudly."""
    found = find_layout(root)
    if not model_files.missing(found) and not smoke.is_smoke_folder(root / KEYFACE_FOLDER):
        return root, found, True
    flat = model_files.find_models(root)
    if flat and not smoke.is_smoke_folder(root):
        # real files in the old flat layout: rendering noise instead would hide the mistake
        raise SystemExit(
            f"[run] {root} holds KeyFace files at its top level ({', '.join(sorted(flat))}), but this script reads "
            f"it like ComfyUI/models: move them into {root / KEYFACE_FOLDER}/ (audio encoders may also go in "
            f"audio_encoders/, the VAE in vae/), or point KEYFACE_MODELS at the folder above it.")
    if found:
        print(f"[run] {root} has {sorted(found)} but lacks {model_files.missing(found)}", flush=True)
    smoke_root = (ROOT / ".cache" / "smoke_models").resolve()
    if not model_files.is_complete(smoke_root / KEYFACE_FOLDER):
        smoke.write_smoke_models(smoke_root / KEYFACE_FOLDER, seed=0)
    bar = "!" * 78
    print(f"\n{bar}\n!!  NO COMPLETE SET OF KEYFACE WEIGHTS IN {root}\n"
          f"!!  (looked for keyface/, audio_encoders/, vae/ in it; see README 'Models').\n"
          f"!!  Using tiny RANDOM smoke weights from {smoke_root}:\n"
          f"!!  THE VIDEO WILL BE NOISE (64x64). It only proves the pipeline runs end to end.\n{bar}\n", flush=True)
    return smoke_root, find_layout(smoke_root), False


def fill_prompt(prompt: dict, image: str, audio: str, names: dict) -> None:
    """Point the converted workflow at our inputs and at the model files found."""
    for node in prompt.values():
        ins, ct = node["inputs"], node["class_type"]
        if ct == "LoadImage":
            ins["image"] = image
        elif ct == "LoadAudio":
            ins["audio"] = audio
        elif ct == "KeyFaceVAELoader":
            ins["vae_name"] = names["vae"]
        elif ct == "KeyFaceAudioEncoderLoader":
            ins.update(wavlm_name=names["wavlm"], beats_name=names["beats"], wav2vec2_name=names["wav2vec2"])
        elif ct == "KeyFaceKeyframeModelLoader":
            ins["model_name"] = names["keyframe"]
        elif ct == "KeyFaceInterpolationModelLoader":
            ins.update(model_name=names["interpolation"], bad_model_name=names["interpolation_bad"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/run.sh", description="Render the example workflow in a real ComfyUI.")
    p.add_argument("--once", action="store_true", help="render, then stop ComfyUI and exit")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even with real weights and a GPU")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from comfyui_server import ComfyServer, free_port
    from workflow_to_api import convert

    run_dir = Path(os.environ.get("KEYFACE_RUN_DIR", ROOT / ".cache" / "run")).resolve()
    image = Path(os.environ.get("KEYFACE_IMAGE", ROOT / "tests/fixtures/media/face_grace_hopper.jpg")).resolve()
    audio = Path(os.environ.get("KEYFACE_AUDIO", ROOT / "tests/fixtures/media/speech_male_arctic_a0007.wav")).resolve()
    for what, p in (("KEYFACE_IMAGE", image), ("KEYFACE_AUDIO", audio)):
        if not p.is_file():
            sys.exit(f"[run] {what}: {p} is not a file")

    root, found, real = pick_models(Path(os.environ.get("KEYFACE_MODELS", ROOT / "models")).resolve())
    cpu, why = use_cpu(real, args.cpu, real and not args.cpu and cuda_available())  # torch only when it matters
    print(f"[run] device: {'CPU' if cpu else 'GPU'} ({why})", flush=True)

    port = int(os.environ.get("KEYFACE_PORT", "8188"))
    if not port_free(port):
        if args.once and "KEYFACE_PORT" not in os.environ:
            port = free_port()
        else:
            sys.exit(f"[run] port {port} is in use; set KEYFACE_PORT to another port")
    threads = os.environ.get("KEYFACE_THREADS")
    threads = int(threads) if threads else (1 if (os.cpu_count() or 1) <= 2 else 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Every folder of the layout is registered, so the loaders' combos list what find_layout found.
    extra = {name: root / name for name in ("audio_encoders", "vae") if (root / name).is_dir()}
    server = ComfyServer(run_dir, port, root / KEYFACE_FOLDER, threads=threads, cpu=cpu, extra_folders=extra)
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
    try:  # render_and_serve returns after the render (--once, failure) or once ComfyUI has exited
        return render_and_serve(server, convert, image, audio, root, found, real, args.once)
    finally:
        server.stop()


def render_and_serve(server, convert, image, audio, root, found, real, once) -> int:
    wf = json.loads(workflow_files.workflow_path(workflow_files.TALKING_HEAD).read_text(encoding="utf-8"))
    prompt = convert(wf, server.object_info())
    fill_prompt(prompt, image.name, audio.name, combo_values(root, found))
    print(f"[run] rendering {image.name} + {audio.name} with {'the KeyFace weights' if real else 'SMOKE (noise) weights'}"
          f" from {root}", flush=True)
    t0 = time.monotonic()
    entry = server.wait(server.submit(prompt), timeout=24 * 3600)
    wall = time.monotonic() - t0
    if entry["status"]["status_str"] != "success":
        msgs = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        print(f"[run] the render FAILED: {json.dumps(msgs, indent=1)[:4000]}\n[run] ComfyUI log: {server.log_path}",
              file=sys.stderr)
        return 1
    videos = [server.output_dir / i.get("subfolder", "") / i["filename"]
              for o in entry["outputs"].values() for i in o.get("images", [])
              if i.get("type") == "output" and i["filename"].endswith(".mp4")]
    if not videos:
        print("[run] the workflow finished but wrote no mp4", file=sys.stderr)
        return 1
    from keyface.video_io import probe_mp4

    for v in videos:
        info = probe_mp4(v)
        print(f"[run] wrote {v}\n[run]   {info['frames']} frames at {info['fps']:g} fps, {info['width']}x{info['height']}, "
              f"audio {info['audio_seconds']:.3f} s; render took {wall:.1f} s"
              + ("" if real else "  (SMOKE WEIGHTS: the picture is noise)"), flush=True)
    if once:
        return 0
    print(f"[run] the ComfyUI UI stays open at {server.url}  (workflow templates: KeyFace; Ctrl-C to stop)", flush=True)
    while server.proc.poll() is None:
        time.sleep(1)
    return server.proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
