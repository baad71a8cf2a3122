"""Diagnostic: does Mp4Writer give the same mp4 bytes for the same frames and audio, every time?

Not part of the test suite (nothing collects bench/); run it by hand when the mp4 bytes of a resumed or
Ray render are in doubt:

    python -m bench.mp4_determinism                      # 50 repetitions at 64, 192 and 512 px, with and without audio
    python -m bench.mp4_determinism --reps 5 --sizes 64 --fresh 10

Each case encodes one fixed clip (a pan over a real portrait, a sine + noise waveform at 16 kHz)
once as the reference, then again ``--reps`` times, with work in between that a long-lived process
(a pytest session, the ComfyUI server) does: many buffers allocated and freed, torch matmuls (also on a
second thread while the encode runs), encodes of other frame sizes. ``--fresh N`` also encodes the
clip as the first encode of N new processes (a process's first encoder sees freshly mapped memory).

Any difference is reported by part: the video packets, the audio packets (bytes and pts) or, when both
streams are equal, the container (moov/mdat layout, metadata). Exit status 1 when anything differed.

What it found (2026-12-03, PyAV 18.1 / libavcodec 62.28 / x264 in the PyAV wheel): x264's
macroblock-tree rate control read memory it never wrote at some frame widths (64-192 px among those
tried), so the same frames gave other bytes depending on what the heap held: in a long pytest session
3 of 4 sessions wrote one job render as two or three different files (only the first B-frames
differed). Random-noise clips never showed it; this pan does. ``--fresh`` runs each new process
under another ``MALLOC_PERTURB_`` value (glibc fills new allocations with it). Before the fix,
``--reps 1 --sizes 64,192 --fresh 5`` gave 1 of 1 in-process and 5 of 5 fresh encodes differing at
192 px; with mbtree off, 0 at both sizes. The writer turns mbtree off;
``tests/test_video_io.py::test_same_frames_same_bytes_whatever_the_heap_held`` guards it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

SAMPLE_RATE = 16000
FRAMES = 40  # more than x264's B-frame and lookahead windows need to be exercised at this crf
PHOTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "media",
                     "face_grace_hopper.jpg")


def make_clip(size: int, with_audio: bool):
    """A slow pan over a real portrait (random noise frames never showed the x264 difference)."""
    from PIL import Image

    photo = Image.open(PHOTO).convert("RGB")
    frames = np.stack([np.asarray(photo.crop((t * 4, t * 3, t * 4 + 400, t * 3 + 400)).resize((size, size), Image.BILINEAR))
                       for t in range(FRAMES)])
    if not with_audio:
        return frames, None
    rng = np.random.default_rng(size)
    t = np.arange(FRAMES * SAMPLE_RATE // 25)
    audio = (0.3 * np.sin(t / 7.0) + rng.normal(0, 0.05, t.shape)).astype(np.float32)[None]
    return frames, audio


def encode(path: str, frames, audio) -> bytes:
    from keyface.video_io import Mp4Writer

    height, width = frames.shape[1:3]
    with Mp4Writer(path, width, height, audio=audio, sample_rate=SAMPLE_RATE if audio is not None else None,
                   num_frames=len(frames)) as writer:
        for start in range(0, len(frames), 5):  # several write() calls, as the decoder's chunks arrive
            writer.write(frames[start:start + 5])
    with open(path, "rb") as f:
        return f.read()


def stream_parts(data: bytes) -> dict:
    """{'video': [(pts, dts, bytes)...], 'audio': [...]} of the mp4 ``data``."""
    import av

    parts = {}
    with av.open(io.BytesIO(data)) as container:
        for packet in container.demux():
            if packet.size:
                parts.setdefault(packet.stream.type, []).append((packet.pts, packet.dts, bytes(packet)))
    return parts


def describe_difference(a: bytes, b: bytes) -> str:
    pa, pb = stream_parts(a), stream_parts(b)
    differing = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
    if not differing:
        return f"container only (streams equal; sizes {len(a)} / {len(b)})"
    lines = []
    for kind in differing:
        first = next((i for i, (x, y) in enumerate(zip(pa.get(kind, []), pb.get(kind, []))) if x != y), None)
        lines.append(f"{kind}: {len(pa.get(kind, []))} / {len(pb.get(kind, []))} packets, first differing #{first}")
    return "; ".join(lines)


def busy_work(folder: str, rng) -> None:
    """What a long-lived process does between two renders."""
    import torch

    junk = [bytearray(os.urandom(int(n))) for n in rng.integers(64, 1 << 20, 40)]
    (torch.randn(256, 256) @ torch.randn(256, 256)).sum().item()
    for other in (48, 96):
        encode(os.path.join(folder, f"other{other}.mp4"), *make_clip(other, bool(rng.integers(2))))
    del junk


def repeat_in_process(size: int, with_audio: bool, reps: int, folder: str) -> int:
    import torch

    frames, audio = make_clip(size, with_audio)
    reference = encode(os.path.join(folder, "reference.mp4"), frames, audio)
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def torch_in_background():  # another thread computing while x264 runs, as in the ComfyUI server
        while not stop.is_set():
            torch.randn(128, 128) @ torch.randn(128, 128)

    background = threading.Thread(target=torch_in_background, daemon=True)
    background.start()
    differing = 0
    try:
        for rep in range(reps):
            busy_work(folder, rng)
            again = encode(os.path.join(folder, "again.mp4"), frames, audio)
            if again != reference:
                differing += 1
                print(f"  {size} px, audio {with_audio}, repetition {rep}: {describe_difference(reference, again)}")
    finally:
        stop.set()
        background.join()
    return differing


def first_encode_digest(size: int, with_audio: bool) -> str:
    with tempfile.TemporaryDirectory() as folder:
        return hashlib.sha256(encode(os.path.join(folder, "first.mp4"), *make_clip(size, with_audio))).hexdigest()


def repeat_in_fresh_processes(size: int, with_audio: bool, processes: int) -> int:
    """The first encode of new processes, each with another heap filling (MALLOC_PERTURB_ 1, 51, ...)."""
    code = ("import sys; from bench.mp4_determinism import first_encode_digest as f; "
            f"print(f({size}, {with_audio}))")
    digests = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              env=dict(os.environ, MALLOC_PERTURB_=str(1 + 50 * (i % 5)))).stdout.strip()
               for i in range(processes)]
    return len(digests) - digests.count(first_encode_digest(size, with_audio))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="encodes compared with the reference per case")
    parser.add_argument("--sizes", default="64,192,512", help="frame sizes (square, even), comma-separated")
    parser.add_argument("--fresh", type=int, default=0, help="also compare the first encode of this many new processes")
    args = parser.parse_args(argv)
    total = 0
    with tempfile.TemporaryDirectory() as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            for with_audio in (False, True):
                differing = repeat_in_process(size, with_audio, args.reps, folder)
                line = f"{size} px, audio {with_audio}: {differing} of {args.reps} in-process encodes differ"
                if args.fresh:
                    fresh = repeat_in_fresh_processes(size, with_audio, args.fresh)
                    line += f"; {fresh} of {args.fresh} fresh processes differ"
                    differing += fresh
                print(line, flush=True)
                total += differing
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
