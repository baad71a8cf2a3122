"""PyAV media I/O: streaming mp4 writer (exact frame count, audio duration, atomic write), readers."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from keyface.video_io import MediaError, Mp4Writer, frames_to_uint8, probe_mp4, read_audio_file, read_image

MEDIA = Path(__file__).parent / "fixtures" / "media"
WAV = MEDIA / "speech_female_arctic_a0009.wav"
FACE = MEDIA / "face_grace_hopper.jpg"


def leftovers(folder):
    return [p for p in os.listdir(folder) if p.endswith(".part")]


def test_read_audio_and_image():
    wav, sr = read_audio_file(WAV)
    assert sr == 16000 and wav.dtype == torch.float32 and wav.shape == (1, 49520)
    assert 0.1 < wav.abs().max() <= 1.0
    img = read_image(FACE)
    assert img.shape == (600, 512, 3) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    with pytest.raises(MediaError, match="not found"):
        read_audio_file(MEDIA / "missing.wav")
    with pytest.raises(MediaError, match="audio"):
        read_audio_file(FACE)


def test_mp4_exact_frames_and_audio(tmp_path):
    wav, sr = read_audio_file(WAV)
    n = -(-wav.shape[1] // 640)  # 78 frames at 25 fps
    out = tmp_path / "clip.mp4"
    with Mp4Writer(out, 64, 48, audio=wav, sample_rate=sr, num_frames=n) as w:
        for i in range(0, n, 10):  # streamed in chunks
            w.write(torch.rand(min(10, n - i), 48, 64, 3))
        assert not out.exists()  # only the temp file exists until close
    info = probe_mp4(out)
    assert info["frames"] == n == 78
    assert (info["width"], info["height"], info["fps"]) == (64, 48, 25.0)
    assert info["audio_rate"] == 16000 and info["audio_channels"] == 1
    assert info["audio_seconds"] == pytest.approx(49520 / 16000, abs=1e-6)
    assert leftovers(tmp_path) == []


def test_audio_duration_exact_to_the_sample(tmp_path):
    out = tmp_path / "odd.mp4"
    with Mp4Writer(out, 32, 32, audio=0.1 * torch.randn(1, 12701), sample_rate=16000, num_frames=20) as w:
        w.write(torch.rand(20, 32, 32, 3))
    info = probe_mp4(out)
    assert info["frames"] == 20 and info["audio_seconds"] == 12701 / 16000 and info["video_seconds"] == 0.8


@pytest.mark.parametrize("rate,channels", [(44100, 2), (22222, 1)])
def test_mp4_other_rates(tmp_path, rate, channels):
    audio = 0.1 * torch.randn(channels, int(rate * 1.3))
    out = tmp_path / "x.mp4"
    with Mp4Writer(out, 32, 32, audio=audio, sample_rate=rate, num_frames=33) as w:
        w.write(np.zeros((33, 32, 32, 3), np.uint8))
    info = probe_mp4(out)
    assert info["frames"] == 33
    assert info["audio_seconds"] == pytest.approx(1.3, abs=2e-3)


def test_mp4_errors_leave_nothing(tmp_path):
    out = tmp_path / "bad.mp4"
    w = Mp4Writer(out, 32, 32, num_frames=5)
    w.write(torch.zeros(3, 32, 32, 3))
    with pytest.raises(MediaError, match="5 frames but 3"):
        w.close()
    assert not out.exists() and leftovers(tmp_path) == []

    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(out, 32, 32) as w:
            w.write(torch.zeros(2, 32, 32, 3))
            raise RuntimeError("boom")
    assert not out.exists() and leftovers(tmp_path) == []

    with pytest.raises(MediaError, match="expected"):
        with Mp4Writer(out, 32, 32) as w:
            w.write(torch.zeros(2, 16, 32, 3))
    with pytest.raises(MediaError, match="even"):
        Mp4Writer(out, 33, 32)
    assert leftovers(tmp_path) == []

    # an existing file is replaced only by a complete one
    out.write_bytes(b"old")
    with pytest.raises(MediaError):
        with Mp4Writer(out, 32, 32, num_frames=2) as w:
            w.write(torch.zeros(1, 32, 32, 3))
    assert out.read_bytes() == b"old"


def test_quantisation_truncates():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0, 0.999]).reshape(1, 1, 2, 3)
    assert frames_to_uint8(x).reshape(-1).tolist() == [0, 127, 255, 255, 0, 254]


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: a few KB on disk however many pixels it declares."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = zlib.compressobj(9)
    body = b"".join(idat.compress(row) for _ in range(height)) + idat.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_huge_declared_image_is_refused_before_decoding(tmp_path):
    """A ~10 KB PNG of 9000 x 5000 pixels (below PIL's own bomb limit) would become 0.7 GB of RGB and
    float32 arrays; it is refused from its header. A portrait of normal size still reads."""
    import resource

    big = tmp_path / "bomb.png"
    big.write_bytes(_bilevel_png(9000, 5000))
    assert big.stat().st_size < 50_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MediaError, match=r"bomb.png is 9000 x 5000 \(45 megapixels\); KeyFace reads portraits of up to 40"):
        read_image(big)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024  # KB: nothing decoded
    ok = tmp_path / "ok.png"
    ok.write_bytes(_bilevel_png(64, 48))
    assert read_image(ok).shape == (48, 64, 3)


_ENCODE_PAN = """
import hashlib, sys
import numpy as np
from PIL import Image
from keyface.video_io import Mp4Writer
size, photo_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
photo = Image.open(photo_path).convert("RGB")
frames = np.stack([np.asarray(photo.crop((t * 4, t * 3, t * 4 + 400, t * 3 + 400)).resize((size, size), Image.BILINEAR))
                   for t in range(40)])
with Mp4Writer(out, size, size, num_frames=len(frames)) as w:
    w.write(frames)
print(hashlib.sha256(open(out, "rb").read()).hexdigest())
"""


@pytest.mark.parametrize("size", [64, 192])
def test_same_frames_same_bytes_whatever_the_heap_held(tmp_path, size):
    """Resumed and Ray renders are compared with uninterrupted ones byte for byte. glibc's
    MALLOC_PERTURB_ fills freshly allocated memory with a chosen byte, so an encoder that reads memory
    it never wrote gives other bytes per value. x264's macroblock-tree did, at these widths: three
    values gave three files before the writer turned it off."""
    import subprocess
    import sys

    digests = set()
    for perturb in ("60", "1", "200"):
        env = dict(os.environ, MALLOC_PERTURB_=perturb, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        run = subprocess.run([sys.executable, "-c", _ENCODE_PAN, str(size), str(FACE), str(tmp_path / f"{perturb}.mp4")],
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1, digests
