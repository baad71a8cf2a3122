"""Face framing benchmark (issue 10): detection + crop time per photo, paste-back cost per output second
at 1080p next to the render's own cost (smoke models, CPU), and peak memory of a streamed 1080p save
at 5 s and 60 s.

    python bench/face_bench.py [--weights .cache/facenet_pytorch-2.6.0/facenet_pytorch/data] [--threads 1]
                               [--seconds 5 60] [--out bench/results/face_cpu.json]

Rows:
* ``detect_crop``: ``keyface.face.framing.frame_face`` (MTCNN + aligned crop) per photo, median of 5
  after one warm-up (real MTCNN weights).
* ``render`` / ``paste``: one 10 s clip rendered by ``pipeline.render_to_file`` with the smoke models
  (their 64 px frames) with and without pasting back into the 1920x1080 photo (same seed, same
  settings), alternated 3 times, median of each; the difference per output second is what
  paste-back (warp + blend + encoding the larger picture) adds. ``paste_only`` times ``FacePaster.paste_uint8`` alone on the same frames and on
  512 px frames (the released model's size).
* ``preset``: x264 alone (process CPU time per frame, after the RGB -> YUV conversion), file size and
  PSNR against the frames, for the presets the writer could use at 1920x1080 (the default crf 18 and
  the writer's stream settings: ``video_io.add_h264_stream``): 100 frames of the test photo with its
  face crop, panned and zoomed a little each frame, pasted back.
* ``memory``: one subprocess per clip length streams that many seconds of 512 px frames into
  ``pipeline.mp4_writer(..., paste_back=...)`` at 1920x1080, as KeyFace Save Video does (pasted and
  encoded in the writer's thread, default preset); peak RSS (``VmHWM``) per length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTO = ROOT / "tests" / "fixtures" / "media" / "photo_wide_1920x1080.jpg"
PORTRAITS = ("face_astronaut.png", "face_grace_hopper.jpg", "photo_wide_1920x1080.jpg")
FPS = 25
# the wide photo's face, as MTCNN finds it (x, y, w, h); used where the bench needs no detector
PHOTO_FACE_BOX = (1335, 341, 229, 271)
RENDER_REPEATS = 3


def _peak_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _median_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def detect_rows(weights):
    import torch

    from keyface.face.framing import frame_face
    from keyface.face.mtcnn import load_mtcnn
    from keyface.video_io import read_image

    model = load_mtcnn(weights)
    rows = []
    pictures = [(name, read_image(ROOT / "tests" / "fixtures" / "media" / name)) for name in PORTRAITS]
    big = torch.nn.functional.interpolate(pictures[1][1].permute(2, 0, 1)[None], size=(3000, 2560),
                                          mode="bilinear")[0].permute(1, 2, 0)
    pictures.append(("grace_hopper upscaled 2560x3000", big))
    for name, img in pictures:
        seconds = _median_time(lambda: frame_face(img, detector=model))
        rows.append({"row": "detect_crop", "photo": name, "size": f"{img.shape[1]}x{img.shape[0]}",
                     "seconds": round(seconds, 3)})
    return rows


def _smoke_models(folder):
    from keyface import model_files as mf
    from keyface.loading import load_diffusion_models
    from keyface import smoke

    smoke.write_smoke_models(folder, seed=0)
    return load_diffusion_models(mf.locate_models(folder), device="cpu")


def render_rows(seconds: float):
    import torch

    from keyface import pipeline
    from keyface.face.framing import frame_face
    from keyface.face.paste import FacePaster
    from keyface.video_io import read_image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kf, good, bad, vae = _smoke_models(Path(tmp) / "models")
        size = pipeline.model_resolution(good)
        photo = read_image(PHOTO)
        crop, face_crop, _ = frame_face(photo, box=PHOTO_FACE_BOX, size=size[0])
        z = pipeline.encode_identity(vae, pipeline.prepare_identity(crop, size))
        n = int(seconds * FPS)
        g = torch.Generator().manual_seed(0)
        feats = _features(kf, good, n, g)
        paster = FacePaster(face_crop, even=True)
        runs = {"render": [], "paste": []}
        for _ in range(RENDER_REPEATS):  # alternated, median of each: the shared machine's speed drifts
            for kind, paste_back in (("render", None), ("paste", paster)):
                t0 = time.perf_counter()
                pipeline.render_to_file(kf, good, bad, vae, z, feats, Path(tmp) / f"{kind}.mp4", device="cpu",
                                        paste_back=paste_back, seed=1)
                runs[kind].append(time.perf_counter() - t0)
        timings = {kind: statistics.median(t) for kind, t in runs.items()}
        for kind in ("render", "paste"):
            rows.append({"row": kind, "clip_seconds": seconds, "frames": n, "runs_seconds": [round(t, 2) for t in runs[kind]],
                         "seconds_per_output_second": round(timings[kind] / seconds, 3),
                         "video": f"{size[1]}x{size[0]}" if kind == "render" else f"{paster.width}x{paster.height}"})
        added = (timings["paste"] - timings["render"]) / timings["render"]
        rows.append({"row": "paste_and_1080p_encode_added_fraction", "value": round(added, 4)})
        for frame_px in (size[0], 512):
            frames = torch.rand(n, frame_px, frame_px, 3, generator=g)
            t = _median_time(lambda: [paster.paste_uint8(frames[i:i + 16], reuse=True) for i in range(0, n, 16)],
                             repeats=3)
            rows.append({"row": "paste_only", "frame_px": frame_px, "into": f"{paster.width}x{paster.height}",
                         "seconds_per_output_second": round(t / seconds, 4),
                         "fraction_of_render": round(t / timings["render"], 4)})
        rows.append(_encode_row(paster, n, seconds, Path(tmp)))
    return rows


def _encode_row(paster, n, seconds, folder):
    """H.264 (the writer's default preset for the size: superfast at 1920x1080) of n full-size frames, pasted beforehand (16 distinct frames
    with a random face, cycled) so only the encoding is timed: the cost of the output size itself,
    which any full-resolution video pays."""
    import torch

    from keyface.video_io import Mp4Writer

    frame = paster.paste_uint8(torch.rand(16, 64, 64, 3, generator=torch.Generator().manual_seed(5)))
    t0 = time.perf_counter()
    with Mp4Writer(folder / "encode.mp4", paster.width, paster.height, fps=FPS, num_frames=n) as w:
        for i in range(0, n, 16):
            w.write(frame[:min(16, n - i)])
    t = time.perf_counter() - t0
    return {"row": "encode_1080p_only", "frames": n, "seconds_per_output_second": round(t / seconds, 3)}


def preset_rows(presets=("medium", "veryfast", "superfast"), n=100):
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F

    from keyface.face.framing import frame_face
    from keyface.face.paste import FacePaster
    from keyface.settings import DEFAULT_CRF
    from keyface.video_io import add_h264_stream, read_image

    crop, face_crop, _ = frame_face(read_image(PHOTO), box=PHOTO_FACE_BOX, size=512)
    paster = FacePaster(face_crop, even=True)
    c = crop.permute(2, 0, 1)[None]
    frames = []
    for i in range(n):  # a moving face: the crop zoomed and shifted a little each frame
        s = 1 + 0.05 * math.sin(i / 7)
        theta = torch.tensor([[[s, 0, 0.03 * math.sin(i / 5)], [0, s, 0.02 * math.cos(i / 6)]]])
        grid = F.affine_grid(theta, c.shape, align_corners=False)
        frames.append(F.grid_sample(c, grid, align_corners=False)[0].permute(1, 2, 0))
    pasted = np.concatenate([paster.paste_uint8(torch.stack(frames[i:i + 16])).numpy() for i in range(0, n, 16)])
    yuv = [av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p") for img in pasted]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            path = os.path.join(tmp, f"{preset}.mp4")
            t0 = time.process_time()
            with av.open(path, "w") as container:
                stream = add_h264_stream(container, paster.width, paster.height, FPS, DEFAULT_CRF, preset)
                for i, frame in enumerate(yuv):
                    frame.pts = i
                    container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
            ms = (time.process_time() - t0) / n * 1000
            with av.open(path) as container:
                decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            mse = np.mean((decoded.astype(np.float64) - pasted) ** 2)
            rows.append({"row": "preset", "preset": preset, "size": f"{paster.width}x{paster.height}", "frames": n,
                         "x264_ms_per_frame": round(ms, 1), "bytes": os.path.getsize(path),
                         "psnr_db": round(10 * math.log10(255 ** 2 / mse), 2)})
    return rows


def _features(kf, good, n, g):
    """Random audio features of the smoke models' widths, n rows (the bench times sampling, not audio)."""
    import torch

    from keyface.audio.features import AudioFeatures

    width_kf, width_it = kf.audio_projection.feature_dim, good.audio_projection.feature_dim
    return AudioFeatures(keyframe=torch.randn(n, 2, width_kf, generator=g),
                         interpolation=torch.randn(n, 2, width_it, generator=g), num_frames=n)


def memory_worker(seconds: float) -> dict:
    import torch

    from keyface.face.framing import frame_face
    from keyface.face.paste import FacePaster
    from keyface.pipeline import mp4_writer
    from keyface.video_io import read_image

    photo = read_image(PHOTO)
    _, face_crop, _ = frame_face(photo, box=PHOTO_FACE_BOX, size=512)
    paster = FacePaster(face_crop, even=True)
    n = int(seconds * FPS)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with mp4_writer(Path(tmp) / "m.mp4", 512, 512, paste_back=paster, fps=FPS, num_frames=n) as w:
            for i in range(0, n, 16):  # as KeyFace Save Video: decoded chunks in, pasted in the writer's thread
                w.write(torch.rand(min(16, n - i), 512, 512, 3, generator=g))
    return {"row": "memory", "clip_seconds": seconds, "frames": n, "peak_rss_mib": round(_peak_rss_mib(), 1),
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / ".cache" / "facenet_pytorch-2.6.0" / "facenet_pytorch" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, nargs="+", default=[5, 60])
    p.add_argument("--render-seconds", type=float, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "face_cpu.json"))
    p.add_argument("--memory-worker", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(args.memory_worker)))
        return 0
    rows = detect_rows(args.weights) if Path(args.weights).is_dir() else []
    rows += render_rows(args.render_seconds)
    rows += preset_rows()
    for s in args.seconds:
        r = subprocess.run([sys.executable, __file__, "--memory-worker", str(s), "--threads", str(args.threads)],
                           capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(r)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
            "loadavg_1": round(os.getloadavg()[0], 2), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
