"""Diagnostic pytest plugin (never loaded by default): did Mp4Writer write other mp4 bytes for the same input?

    PYTHONPATH=tests/tools .venv/bin/python -m pytest -p mp4_bytes_diag tests/test_video_io.py \\
        tests/test_pipeline.py tests/test_cli.py tests/test_cli_job.py -q

For every Mp4Writer output it records a digest of everything the writer was given (constructor
arguments, audio samples, the uint8 frames, the write() chunk sizes), the thread's flush-to-zero state
at each write and at close ('0'/'1', 'c' marks close) and the digest of the file written. Every file
is kept under $MP4DIAG_DIR (default /tmp/mp4diag) with the records in records.json; at the end it
prints the inputs that gave more than one file. MP4DIAG_YUV=1 also records a digest of each yuv420p
frame handed to x264 (that extra work was seen to hide the difference). Compare two kept files by
stream with ``bench.mp4_determinism.describe_difference``.
"""

import hashlib
import json
import os
import shutil
import sys

import numpy as np

FOLDER = os.environ.get("MP4DIAG_DIR", "/tmp/mp4diag")
RECORDS = []
YUV = []


def _input_digest(width, height, args, kwargs):
    h = hashlib.sha256(repr((width, height, args, sorted((k, v) for k, v in kwargs.items() if k != "audio"))).encode())
    audio = kwargs.get("audio", args[1] if len(args) > 1 else None)
    if audio is not None:
        a = np.asarray(audio.detach().cpu().numpy() if hasattr(audio, "detach") else audio)
        h.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    return h


def _record_yuv(mod):
    real = mod._packed_yuv420p

    def packed(rgb):
        frame = real(rgb)
        YUV.append(hashlib.sha256(frame.to_ndarray().tobytes()).hexdigest()[:8])
        return frame

    mod._packed_yuv420p = packed


def _patch(mod):
    cls = mod.Mp4Writer
    if getattr(cls, "_diag", False):
        return
    cls._diag = True
    if os.environ.get("MP4DIAG_YUV"):
        _record_yuv(mod)
    init, write, close = cls.__init__, cls.write, cls.close

    def new_init(self, path, width, height, *args, **kwargs):
        self._diag_in, self._diag_frames, self._diag_chunks, self._diag_ftz = (
            _input_digest(width, height, args, kwargs), hashlib.sha256(), [], "")
        YUV.clear()
        init(self, path, width, height, *args, **kwargs)

    def new_write(self, frames):
        u = mod.frames_to_uint8(frames)
        self._diag_ftz += str(int(_flushes_denormals()))
        self._diag_frames.update(u.tobytes())
        self._diag_chunks.append(int(u.shape[0]) if u.ndim == 4 else 1)
        write(self, frames)

    def new_close(self):
        done = self._closed
        self._diag_ftz += "c" + str(int(_flushes_denormals()))
        close(self)
        if not done and os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                out = hashlib.sha256(f.read()).hexdigest()[:12]
            rec = dict(test=os.environ.get("PYTEST_CURRENT_TEST", ""), path=self.path, out=out,
                       args=self._diag_in.hexdigest()[:12], frames=self._diag_frames.hexdigest()[:12],
                       chunks=self._diag_chunks, ftz=self._diag_ftz, yuv=list(YUV))
            os.makedirs(FOLDER, exist_ok=True)
            rec["kept"] = os.path.join(FOLDER, f"{len(RECORDS):03d}_{rec['frames']}_{out}.mp4")
            shutil.copy(self.path, rec["kept"])
            RECORDS.append(rec)

    cls.__init__, cls.write, cls.close = new_init, new_write, new_close


def _flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ or DAZ), read from the arithmetic."""
    with np.errstate(all="ignore"):
        return bool(np.float32(1e-40) * np.float32(1.0) == 0 or np.float32(1e-38) * np.float32(1e-3) == 0)


def _patch_all():
    # ComfyUI-style imports load the library a second time under the pack's name: patch every copy
    for name, mod in list(sys.modules.items()):
        if name.endswith("video_io") and hasattr(mod, "Mp4Writer") and hasattr(mod, "_packed_yuv420p"):
            _patch(mod)


def pytest_configure(config):
    import keyface.video_io  # noqa: F401

    _patch_all()


def pytest_runtest_setup(item):
    _patch_all()


def pytest_unconfigure(config):
    os.makedirs(FOLDER, exist_ok=True)
    with open(os.path.join(FOLDER, "records.json"), "w") as f:
        json.dump(RECORDS, f, indent=1)
    outputs = {}
    for r in RECORDS:
        outputs.setdefault((r["args"], r["frames"], tuple(r["chunks"])), set()).add(r["out"])
    differing = {k: v for k, v in outputs.items() if len(v) > 1}
    print(f"\nmp4_bytes_diag: {len(RECORDS)} files, {len(outputs)} distinct inputs, "
          f"{len(differing)} inputs written as more than one file: {differing}")
