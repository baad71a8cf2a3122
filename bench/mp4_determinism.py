"""Diagnostic: does Mp4Writer give the same mp4 bytes for the same frames and audio, every time?

Not part of the test suite (nothing collects bench/); run it by hand when the mp4 bytes of a resumed or
Ray render are in doubt:

    python -m bench.mp4_determinism                      # 50 repetitions at 32, 64 and 512 px, with and without audio
    python -m bench.mp4_determinism --reps 5 --sizes 64 --fresh 10

Each case encodes one fixed clip (random frames with a brightness ramp, a sine + noise waveform at 16 kHz)
once as the reference, then again ``--reps`` times, with work in between that a long-lived process
(a pytest session, the ComfyUI server) does: many buffers allocated and freed, torch matmuls (also on a
second thread while the encode runs), encodes of other frame sizes. ``--fresh N`` also encodes the
clip as the first encode of N new processes (a process's first encoder sees freshly mapped memory).

Any difference is reported by part: the video packets, the audio packets (bytes and pts) or, when both
streams are equal, the container (moov/mdat layout, metadata). Exit status 1 when anything differed.

Status (2026-12-03, PyAV 18.1 / libavcodec 62.28 / x264 core in the PyAV wheel): this script has not
reproduced the difference: ``--reps 50 --sizes 32,64,512 --fresh 5`` gave 0 differing encodes in
all six cases (300 in-process, 30 fresh-process; ~5.5 min on the loaded 2-core machine). A pytest session does:
``tests/tools/mp4_bytes_diag.py`` records every Mp4Writer input and output there. What it found: in
``tests/test_cli_job.py`` after test_video_io / test_pipeline / test_cli, one of three renders of the
same uint8 frames, the same audio samples, the same writer arguments and the same write() chunking was
written as another file; only the video stream differed, and only packets 2 and 3 (the first two
B-frames, display frames 1 and 2), 1319 / 1309 bytes against 1360 / 1330; the thread's flush-to-zero
flags were off at every write and close.
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
FRAMES = 12  # more than x264's B-frame and lookahead windows need to be exercised at this crf


def make_clip(size: int, with_audio: bool):
    rng = np.random.default_rng(size)
    noise = rng.integers(0, 128, (FRAMES, size, size, 3))
    ramp = np.linspace(0, 120, FRAMES).astype(int)[:, None, None, None]
    frames = (noise + ramp).astype(np.uint8)
    if not with_audio:
        return frames, None
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
    code = ("import sys; from bench.mp4_determinism import first_encode_digest as f; "
            f"print(f({size}, {with_audio}))")
    digests = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
               for _ in range(processes)]
    return len(digests) - digests.count(first_encode_digest(size, with_audio))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="encodes compared with the reference per case")
    parser.add_argument("--sizes", default="32,64,512", help="frame sizes (square, even), comma-separated")
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
