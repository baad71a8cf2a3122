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


def _pan(size=64, n=24):
    from PIL import Image

    photo = Image.open(FACE).convert("RGB")
    return np.stack([np.asarray(photo.crop((t * 4, t * 3, t * 4 + 400, t * 3 + 400)).resize((size, size))) for t in range(n)])


def test_encoding_overlaps_the_caller_with_a_bounded_queue(tmp_path, monkeypatch):
    """write() hands the chunk to the writer's thread and returns while the encoder is still busy (the
    render goes on meanwhile); what waits is bounded (MAX_QUEUED_BYTES, lowered here to one chunk), so a
    slow encoder holds the caller back rather than piling up frames."""
    import threading

    from keyface import video_io

    frames = _pan()
    release, busy = threading.Event(), threading.Event()
    real = Mp4Writer._encode

    def slow_encode(self, chunk):
        busy.set()
        assert release.wait(30)
        real(self, chunk)

    monkeypatch.setattr(Mp4Writer, "_encode", slow_encode)
    monkeypatch.setattr(video_io, "MAX_QUEUED_BYTES", frames[:8].nbytes)
    out = tmp_path / "overlap.mp4"
    with Mp4Writer(out, 64, 64, num_frames=24) as w:
        w.write(frames[:8])  # taken by the encoder thread, which now waits
        assert busy.wait(30)
        w.write(frames[8:16])  # waits in the queue: write() still returns
        third = threading.Thread(target=w.write, args=(frames[16:],))
        third.start()
        third.join(0.5)
        assert third.is_alive()  # the queue is full: the caller waits for the encoder
        release.set()
        third.join(30)
        assert not third.is_alive()
    assert probe_mp4(out)["frames"] == 24


def test_caller_may_reuse_its_buffer_after_write(tmp_path):
    frames = _pan()
    with Mp4Writer(tmp_path / "ref.mp4", 64, 64) as w:
        w.write(frames)
    buffer = frames.copy()
    with Mp4Writer(tmp_path / "reused.mp4", 64, 64) as w:
        for i in range(0, 24, 8):
            buffer[:8] = frames[i:i + 8]
            w.write(buffer[:8])  # the same memory each time, overwritten right after
            buffer[:8] = 0
    assert (tmp_path / "reused.mp4").read_bytes() == (tmp_path / "ref.mp4").read_bytes()


def test_encoder_error_reaches_the_caller_and_leaves_nothing(tmp_path, monkeypatch):
    real = Mp4Writer._encode
    calls = []

    def failing_encode(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, chunk)

    monkeypatch.setattr(Mp4Writer, "_encode", failing_encode)
    out = tmp_path / "full_disk.mp4"
    frames = _pan()
    with pytest.raises(MediaError, match="encoding the mp4 failed: .*No space left on device"):
        with Mp4Writer(out, 64, 64, num_frames=24) as w:
            for i in range(0, 24, 8):
                w.write(frames[i:i + 8])
    assert calls[:2] == [8, 8]
    assert not out.exists() and leftovers(tmp_path) == []


def test_abort_stops_the_encoder_thread(tmp_path):
    w = Mp4Writer(tmp_path / "cancelled.mp4", 64, 64)
    frames = _pan()
    w.write(frames)
    w.write(frames)
    thread = w._encoder._thread
    w.abort()  # as a cancelled render does, with chunks still queued
    assert not thread.is_alive()
    assert leftovers(tmp_path) == [] and not (tmp_path / "cancelled.mp4").exists()


def test_audio_that_decodes_to_too_many_samples_is_refused_early(tmp_path, monkeypatch):
    """A compressed file can decode to hours of samples; reading stops at the limit, naming the file
    and saying what to do. (Limit lowered here: 2 minutes of FLAC silence are 23 KB on disk.)"""
    import re

    import av

    from keyface import video_io

    path = tmp_path / "silence.flac"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("flac", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000 * 120), np.int16), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)
    assert path.stat().st_size < 40_000
    monkeypatch.setattr(video_io, "MAX_AUDIO_BYTES", 1 << 20)
    with pytest.raises(MediaError, match=r"silence\.flac: the audio decodes to more than .*16 kHz mono") as e:
        read_audio_file(path)
    seconds_read = float(re.search(r"\((\d+) s so far at 8000 Hz x 1 channel", str(e.value)).group(1))
    assert 30 <= seconds_read <= 40  # stopped at 1 MiB (32.8 s), not after decoding all 120 s
    monkeypatch.setattr(video_io, "MAX_AUDIO_BYTES", 8 << 20)
    wav, rate = read_audio_file(path)
    assert rate == 8000 and wav.shape == (1, 8000 * 120)


def test_full_resolution_video_uses_the_faster_preset(tmp_path):
    """x264 writes its settings into the stream: the model's 512 px output keeps "medium" (subme=7),
    a pasted-back 1920x1080 video gets "superfast" (subme=1), both with mbtree off."""
    import re

    from keyface.video_io import default_preset

    assert default_preset(512, 512) == "medium" and default_preset(1920, 1080) == "superfast"
    for width, height, subme in ((512, 512, "7"), (1920, 1080, "1")):
        out = tmp_path / f"{width}.mp4"
        with Mp4Writer(out, width, height) as w:
            w.write(np.zeros((2, height, width, 3), np.uint8))
        settings = re.search(rb"options: [^\x00]*", out.read_bytes()).group(0).decode()
        assert f" subme={subme} " in settings and " mbtree=0 " in settings, settings


@pytest.mark.parametrize("width,height", [(64, 64), (34, 20), (1922, 1080)])
def test_rgb_frame_converts_as_from_ndarray(width, height):
    """The writer fills FFmpeg's own (row-padded) RGB frame with numpy instead of calling
    VideoFrame.from_ndarray, whose copies hold the GIL; the YUV that reaches x264 must be the same,
    also where rows are padded (34 px: 102 bytes per row)."""
    import av

    img = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    w = Mp4Writer.__new__(Mp4Writer)
    w.width, w.height, w._rgb = width, height, None
    ours = w._rgb_frame(img).reformat(format="yuv420p")
    theirs = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
    assert np.array_equal(ours.to_ndarray(), theirs.to_ndarray())


def _double(chunk):
    """A frame filter for the tests: nearest-neighbour x2, as uint8."""
    import threading

    _double.threads.add(threading.current_thread().name)
    f = torch.as_tensor(chunk)
    return (f.repeat_interleave(2, 1).repeat_interleave(2, 2).clamp(0, 1) * 255).to(torch.uint8)


_double.threads = set()


def test_frame_filter_runs_in_the_writer_thread_on_a_copy(tmp_path):
    """With a frame_filter (the paste-back), write() takes chunks of another size, and the filter runs
    in the writer's thread, not the caller's; the caller may still reuse its buffer at once."""
    import av

    frames = torch.from_numpy(_pan(32, 12)).float() / 255
    expected = _double(frames).numpy()
    _double.threads.clear()
    buffer = frames.clone()
    with Mp4Writer(tmp_path / "filtered.mp4", 64, 64, num_frames=12, frame_filter=_double, crf=0) as w:
        for i in range(0, 12, 4):
            buffer[:4] = frames[i:i + 4]
            w.write(buffer[:4])
            buffer[:4] = 0.5  # overwritten right after write(): the writer kept a copy
        with pytest.raises(MediaError, match="too many frames: 13"):
            w.write(frames[:1])
    assert _double.threads == {"keyface-mp4-encoder"}
    with av.open(str(tmp_path / "filtered.mp4")) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == (12, 64, 64, 3)
    assert np.abs(decoded.astype(int) - expected).mean() < 3  # crf 0; only the YUV 4:2:0 round trip differs


def test_frame_filter_errors_reach_the_caller_as_raised(tmp_path):
    """A filter's own error (e.g. PasteError: "frames: hold NaN or infinite values") is raised as it is
    by the next write or close, naming the frames; a filter returning the wrong size is a MediaError.
    Either way nothing is left on disk."""
    from keyface.face.paste import PasteError

    def refuse(chunk):
        raise PasteError("frames: hold NaN or infinite values")

    out = tmp_path / "refused.mp4"
    with pytest.raises(PasteError, match="NaN or infinite"):
        with Mp4Writer(out, 64, 64, frame_filter=refuse) as w:
            w.write(np.zeros((2, 32, 32, 3), np.float32))
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(MediaError, match=r"frame_filter: expected \[2, 64, 64, 3\], got \(2, 32, 32, 3\)"):
        with Mp4Writer(out, 64, 64, frame_filter=lambda c: c) as w:
            w.write(np.zeros((2, 32, 32, 3), np.float32))
    assert not out.exists() and leftovers(tmp_path) == []


def test_chunk_buffers_are_reused_within_the_queue_bound(tmp_path, monkeypatch):
    """A fresh array per chunk of large frames is mapped fresh and faults in page by page on the
    caller's thread; finished chunk buffers are reused instead, and the pool plus the queue stay within
    MAX_QUEUED_BYTES (+ one chunk), however many chunks are written."""
    from keyface import video_io

    frames = _pan(n=8)
    monkeypatch.setattr(video_io, "MAX_QUEUED_BYTES", 3 * frames.nbytes)
    handed_out = []
    real_buffer = video_io._EncoderThread.buffer

    def spy(self, shape, dtype=np.uint8):
        a = real_buffer(self, shape, dtype)
        handed_out.append(a.base)  # kept alive: a new buffer cannot take a freed one's id
        pooled = sum(b.nbytes for b in self._free) + self._queued_bytes
        assert pooled <= video_io.MAX_QUEUED_BYTES
        return a

    monkeypatch.setattr(video_io._EncoderThread, "buffer", spy)
    with Mp4Writer(tmp_path / "pooled.mp4", 64, 64, num_frames=8 * 40) as w:
        for _ in range(40):
            w.write(frames)
    assert len(handed_out) == 40
    assert len({id(b) for b in handed_out}) <= 4  # 3 queued + the one being filled, then only reused ones
