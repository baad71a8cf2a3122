"""Command line: ``python -m keyface render --image face.png --audio speech.wav --models DIR --out out.mp4``.

Renders a talking-face video without ComfyUI: image + audio + a models folder (see
:mod:`keyface.model_files` for the file names) -> an mp4 with exactly N = round(seconds x 25)
frames at 25 fps and the input audio, cut or padded with silence to exactly N / 25 s, as its AAC
track. The output appears only when complete.

``python -m keyface plan --frames N`` (or ``--audio FILE``) prints the clip plan (keyframes, batches,
segments) without loading any model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import ATTENTION_BACKENDS  # torch-free, like this module's top level
from .face.cli_args import add_face_arguments, check_face_args, face_from_args  # torch-free at import
from .settings import DEFAULT_CRF, DEFAULTS

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m keyface", description="KeyFace: audio-driven talking-face video.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render image + audio -> mp4",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--image", required=True, help="identity image (png/jpg/...)")
    r.add_argument("--audio", required=True, help="speech audio (wav/mp3/flac/... or a video with audio)")
    r.add_argument("--models", required=True, help="models folder (keyframe, interpolation, interpolation_bad, vae, "
                                                   "WavLM, BEATs, wav2vec2)")
    r.add_argument("--out", required=True, help="output .mp4 (written atomically)")
    r.add_argument("--seed", type=int, default=DEFAULTS.seed)
    r.add_argument("--steps", type=int, default=DEFAULTS.keyframe_steps, help="sampling steps of both stages (10 = 11 evaluations)")
    r.add_argument("--keyframe-steps", type=int, default=None, help="override --steps for the keyframes")
    r.add_argument("--interpolation-steps", type=int, default=None, help="override --steps for the interpolation")
    emo = r.add_mutually_exclusive_group()
    emo.add_argument("--emotion", default=None,
                     help="named emotion (e.g. happy) or a schedule of names the emotion module accepts")
    emo.add_argument("--emotion-curve", default=None, help="emotion curve JSON file (valence/arousal over time)")
    r.add_argument("--intensity", type=float, default=None, help="emotion intensity 0..2 (default: the curve's)")
    r.add_argument("--ref-ratio", type=float, default=DEFAULTS.ref_ratio, help="keyframe identity guidance")
    r.add_argument("--audio-ratio", type=float, default=DEFAULTS.audio_ratio, help="keyframe audio guidance")
    r.add_argument("--scale", type=float, default=DEFAULTS.scale, help="interpolation autoguidance scale")
    r.add_argument("--no-autoguidance", action="store_true", help="interpolate with the main network only")
    r.add_argument("--unguided-last-step", action="store_true",
                   help="skip both stages' guidance at the last step (sigma 0.002): about 5%% fewer UNet evaluations, "
                        "an approximation (see bench/README.md)")
    r.add_argument("--segments-per-call", type=int, default=DEFAULTS.segments_per_call,
                   help="interpolation segments (14 frames each) per UNet call; halved automatically if a call runs "
                        "out of memory. Same result; more is faster on a big GPU and needs more memory")
    r.add_argument("--branches-per-call", type=int, choices=(1, 2, 3), default=DEFAULTS.branches_per_call,
                   help="keyframe guidance branches per UNet call; halved automatically on out-of-memory. Same result")
    r.add_argument("--attention", choices=tuple(ATTENTION_BACKENDS), default=DEFAULTS.attention,
                   help="scaled-dot-product attention backend (auto: torch picks per call). Same result up to "
                        "rounding; a backend this device cannot run is an error")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the UNets (opt-in): the first calls compile (minutes), then faster sampling; "
                        "same result up to rounding")
    r.add_argument("--chunk-frames", type=int, default=DEFAULTS.chunk_frames,
                   help="most frames per VAE decode call; on a GPU fewer when its free memory cannot hold that many "
                        "(see keyface.vae.decode_memory)")
    r.add_argument("--identity-mode", choices=("crop", "pad"), default="crop",
                   help="square the identity image by centre crop or by padding")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, ...")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="UNet weight dtype (default: fp16 on CUDA, fp32 elsewhere); the VAE and audio encoders "
                        "stay fp32")
    r.add_argument("--crf", type=int, default=DEFAULT_CRF, help="H.264 quality (lower = better)")
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    r.add_argument("--quiet", action="store_true")
    add_face_arguments(r)
    _add_job_arguments(r)

    pl = sub.add_parser("plan", help="print the clip plan for a length")
    g = pl.add_mutually_exclusive_group(required=True)
    g.add_argument("--frames", type=int)
    g.add_argument("--audio")
    pl.add_argument("--verbose", action="store_true", help="list every batch and segment")
    return p


def _add_job_arguments(r):
    """Resumable jobs and Ray fan-out (keyface.jobs, keyface.ray_render)."""
    r.add_argument("--job", default=None, metavar="DIR",
                   help="job folder: finished blocks are kept there, and running the same command again resumes "
                        "a stopped render (same mp4 bytes); other inputs, models or settings are refused")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the keyframe batches and segment groups on Ray actors (pip install 'keyface[ray]'): "
                        "no ADDRESS starts Ray on this machine; 'auto' or HOST:PORT joins a cluster "
                        "(ray start --head / --address). Uses --job, or a temporary job folder beside --out")
    r.add_argument("--ray-workers", type=int, default=None,
                   help="Ray actors (default: one per GPU of the cluster, else one per CPU)")
    r.add_argument("--ray-gpus-per-worker", type=float, default=None,
                   help="GPUs per Ray actor (default: 1 if the cluster has GPUs, else 0)")
    r.add_argument("--ray-cpus", type=int, default=None,
                   help="CPUs of the Ray started on this machine (no ADDRESS; default: all)")


def _device(name: str):
    """The torch device of ``--device``, checked to exist here (before any model loads)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device: {name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if device.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device: {name!r} is not available on this machine (torch finds no {device.type} device); "
                         "use --device cpu or auto")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ValueError(f"--device: {name!r}: this machine has {count()} {device.type} device(s), numbered from 0")
    return device


def _check_options(args):
    """Numbers and paths of the command line, checked before anything is loaded; the errors name the option."""
    from . import validate
    from .emotion import INTENSITY_RANGE

    for option in ("ref_ratio", "audio_ratio", "scale"):
        validate.number("--" + option.replace("_", "-"), getattr(args, option))  # NaN would render a black video
    if args.intensity is not None:
        validate.number("--intensity", args.intensity, *INTENSITY_RANGE)
    validate.integer("--crf", args.crf, 0, 51)  # libx264's range (it clamps silently otherwise)
    if args.threads is not None:
        validate.integer("--threads", args.threads, 1)
    validate.integer("--seed", args.seed, 0)
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        raise ValueError(f"--out: {args.out} is a folder; give the output file name, e.g. {os.path.join(args.out, 'out.mp4')}")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"--out: the output folder does not exist: {os.path.dirname(out)}")


def _dtype(name, device):
    import torch

    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.last = {}

    def log(self, msg):
        if not self.quiet:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def __call__(self, ev):
        if self.quiet:
            return
        now = time.monotonic()
        if ev.step == ev.total or now - self.last.get(ev.stage, 0.0) >= 1.0:
            self.last[ev.stage] = now
            self.log(f"{ev.stage}: {ev.step}/{ev.total} ({100.0 * ev.fraction:.0f}%)")


def _find_models(folder):
    from . import model_files as mf

    if not os.path.isdir(folder):
        raise ValueError(f"models folder not found: {folder}")
    found = mf.locate_models(folder)
    missing = mf.missing(found)
    if missing:
        names = "; ".join(f"{k}: {' or '.join(mf.FILE_NAMES[k])}" for k in missing)
        raise ValueError(f"models folder {folder} lacks {', '.join(missing)} (expected {names}; looked in the folder, "
                         "in its ComfyUI siblings ../audio_encoders and ../vae, and in keyface/, audio_encoders/, vae/ "
                         "below it)")
    return found


def _read(option, reader, path):
    """``reader(path)`` with the option named in its error (a missing file, a folder, an unreadable file)."""
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path} is a folder; expected a file")
    try:
        return reader(path)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


def _emotion_curve(args):
    """The EmotionCurve of --emotion / --emotion-curve (None: neutral), parsed before any model loads."""
    from . import validate
    from .emotion import as_curve, parse_curve

    if args.emotion_curve:  # a file is always curve JSON, never a name or schedule
        option, parse, text = "--emotion-curve", parse_curve, validate.read_text_file("--emotion-curve", args.emotion_curve)
    elif args.emotion:
        option, parse, text = "--emotion", as_curve, args.emotion
    else:
        return None
    try:
        return parse(text)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


def _emotion(curve, args, num_frames):
    from .emotion import per_frame_emotion

    if curve is None and args.intensity is None:
        return None, None
    return per_frame_emotion(curve, num_frames, intensity=args.intensity)


def _settings(args):
    """RenderSettings from the command line (validated there; the error names the option)."""
    from .diffusion import UNGUIDED_LAST_STEP_SIGMA
    from .pipeline import RenderSettings

    values = dict(
        seed=args.seed,
        keyframe_steps=args.keyframe_steps or args.steps,
        interpolation_steps=args.interpolation_steps or args.steps,
        ref_ratio=args.ref_ratio, audio_ratio=args.audio_ratio, scale=args.scale,
        autoguidance=not args.no_autoguidance, segments_per_call=args.segments_per_call,
        branches_per_call=args.branches_per_call,
        guidance_min_sigma=UNGUIDED_LAST_STEP_SIGMA if args.unguided_last_step else DEFAULTS.guidance_min_sigma,
        chunk_frames=args.chunk_frames, attention=args.attention, compile=args.compile,
    )
    try:
        return RenderSettings(**values)
    except ValueError as e:  # its messages start with the field: "chunk_frames must be an integer >= 1, ..."
        field = str(e).split(" ", 1)[0].rstrip(":")
        option = "--" + field.replace("_", "-")
        if field.endswith("_steps") and getattr(args, field) is None:
            option = "--steps"
        raise ValueError(f"{option}: {e}") from None


def cmd_render(args) -> int:
    import torch

    from . import model_files as mf
    from . import pipeline
    from .audio import compute_features, load_beats, load_wav2vec2, load_wavlm
    from .loading import load_diffusion_models
    from .planner import FPS, plan_clip
    from .video_io import read_audio_file, read_image

    _check_options(args)  # bad values fail here, before any model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _Progress(args.quiet)
    settings = _settings(args)
    check_face_args(args)  # --face options, before any model loads
    device = _device(args.device)
    curve = _emotion_curve(args)
    found = _find_models(args.models)
    dtype = _dtype(args.dtype, device)

    image = _read("--image", read_image, args.image)
    waveform, sample_rate = _read("--audio", read_audio_file, args.audio)
    progress.log(f"audio: {waveform.shape[1] / sample_rate:.3f} s at {sample_rate} Hz, {waveform.shape[0]} channel(s)")

    # 1. audio features (encoders are freed before the diffusion models load)
    with torch.no_grad():
        wavlm = load_wavlm(found[mf.WAVLM], device=device)
        beats = load_beats(found[mf.BEATS], device=device)
        w2v = load_wav2vec2(found[mf.WAV2VEC2], device=device)
        features = compute_features(waveform, sample_rate, wavlm, beats, w2v)
        del wavlm, beats, w2v
    n = int(features.num_frames)
    plan = plan_clip(n)
    progress.log(f"features: {plan.describe()}")
    valence, arousal = _emotion(curve, args, n)

    if args.job or args.ray:
        return _render_job(args, found, image, waveform, sample_rate, features, valence, arousal, settings, device,
                           dtype, progress)

    # 2. models
    kf_net, good, bad, vae = load_diffusion_models(found, dtype=dtype, device=device)
    height, width = pipeline.model_resolution(good)
    if height != width:
        raise ValueError(f"non-square model resolution {width}x{height} is not supported by the identity crop")
    face_image, paste_back = face_from_args(args, image, height, progress.log)
    identity = pipeline.prepare_identity(image if face_image is None else face_image, (height, width),
                                         mode=args.identity_mode)
    z_id = pipeline.encode_identity(vae, identity, device=device)
    progress.log(f"models loaded on {device} ({str(dtype).replace('torch.', '')}), {width}x{height} px")

    pipeline.render_to_file(
        kf_net, good, bad, vae, z_id, features, args.out,
        audio=waveform, sample_rate=sample_rate, crf=args.crf,
        valence=valence, arousal=arousal, device=device, callback=progress, settings=settings,
        paste_back=paste_back,
    )
    progress.log(f"wrote {args.out}: {n} frames ({n / FPS:.2f} s) at {FPS} fps")
    return 0


def _render_job(args, found, image, waveform, sample_rate, features, valence, arousal, settings, device, dtype,
                progress) -> int:
    """``--job`` / ``--ray``: the render through a job folder, its blocks here or on Ray actors."""
    import shutil
    import tempfile

    from . import jobs
    from . import model_files as mf
    from . import pipeline
    from .loading import load_diffusion_models
    from .planner import FPS
    from .vae import load_vae

    # the files decide the networks: their digests identify the models whichever process loads them
    digests = {name: jobs.digest_file(found[kind]) for name, kind in
               zip(jobs.MODEL_NAMES, (mf.KEYFRAME, mf.INTERPOLATION, mf.INTERPOLATION_BAD))}
    runner, networks = None, None
    folder, temporary = args.job, False
    if folder is None:  # --ray alone: a job folder that lives as long as this render
        folder = tempfile.mkdtemp(prefix=".keyface-job-", dir=os.path.dirname(os.path.abspath(args.out)))
        temporary = True
    try:
        if args.ray:
            from .ray_render import files_runner

            runner = files_runner(found, args.dtype, address=args.ray, num_workers=args.ray_workers,
                                  gpus_per_worker=args.ray_gpus_per_worker, num_cpus=args.ray_cpus)
            height, width = runner.resolution()
            vae = load_vae(found[mf.VAE], device=device)
            progress.log(f"Ray: {runner.num_workers} worker(s) ({runner.compute_description()['device']})")
        else:
            kf_net, good, bad, vae = load_diffusion_models(found, dtype=dtype, device=device)
            networks = (kf_net, good, bad)
            height, width = pipeline.model_resolution(good)
        face_image, paste_back = face_from_args(args, image, height, progress.log)
        identity = pipeline.prepare_identity(image if face_image is None else face_image, (height, width),
                                             mode=args.identity_mode)
        z_id = pipeline.encode_identity(vae, identity, device=device)
        report = jobs.render_job(folder, vae, z_id, features, args.out, networks=networks, runner=runner,
                                 model_digests=digests, valence=valence, arousal=arousal, settings=settings,
                                 device=device, audio=waveform, sample_rate=sample_rate, crf=args.crf,
                                 callback=progress, paste_back=paste_back)
    finally:
        if runner is not None:
            runner.close()
        if temporary:  # without --job nothing can resume it: never leave it behind
            shutil.rmtree(folder, ignore_errors=True)
    n = int(features.num_frames)
    progress.log(f"job {report.job_folder}: {report.summary()}")
    progress.log(f"wrote {args.out}: {n} frames ({n / FPS:.2f} s) at {FPS} fps")
    return 0


def cmd_plan(args) -> int:
    from .planner import plan_clip, video_frame_count

    if args.audio:
        from .video_io import read_audio_file

        wav, sr = read_audio_file(args.audio)
        n = video_frame_count(wav.shape[1], sr)
    else:
        n = args.frames
    plan = plan_clip(n)
    print(plan.describe())
    print(f"keyframes at frames {list(plan.keyframe_frames)} (rows past {n - 1} repeat the last audio row: "
          f"{plan.padded_rows})")
    if args.verbose:
        for b, batch in enumerate(plan.batches):
            print(f"batch {b}: " + " ".join(f"{s.kind[0]}{s.audio_row}" for s in batch))
        for s in plan.segments:
            print(f"segment {s.index}: keyframes ({s.start_keyframe},{s.end_keyframe}) frames "
                  f"{s.first_frame}..{s.first_frame + 13} rows {s.audio_rows[0]}..{s.audio_rows[-1]}")
    return 0


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "render":
            return cmd_render(args)
        return cmd_plan(args)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a file system error during the run (disk full, permissions): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
