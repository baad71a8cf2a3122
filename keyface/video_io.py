"""Media I/O for the command line and for ``render_to_file``: PyAV only, no ffmpeg binary needed.

* :class:`Mp4Writer` streams RGB frames into an H.264 (yuv420p) mp4, interleaved with an AAC track
  made from the input waveform. The optional frame filter (the face paste-back), conversion, encoding
  and muxing run in a background thread (up to MAX_QUEUED_BYTES of frames behind the caller), so they
  overlap the sampling; the bytes depend only on the frames and settings. The file is written
  under a temporary name in the target folder and moved into place (``os.replace``) only when
  :meth:`Mp4Writer.close` succeeds; on an error or :meth:`Mp4Writer.abort` nothing is left behind. With ``num_frames`` given, ``close`` checks that
  exactly that many frames were written.
* :func:`read_audio_file` decodes any audio (or video-with-audio) file to float32 ``[C, S]``.
* :func:`read_image` reads an RGB image to float ``[H, W, 3]`` in 0..1 (EXIF orientation applied).

Frames are quantised like the original (``x * 255`` then truncation to uint8, spec 1.7 / 9).
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from ._files import create_temp_beside
from . import validate
from .validate import pcm_to_float
from .planner import FPS
from .settings import DEFAULT_CRF

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def _aac_rate(sample_rate: int) -> int:
    """The rate the AAC track is written at: the input's if AAC can store it, else 48 kHz."""
    return sample_rate if sample_rate in AAC_RATES else 48000


class MediaError(ValueError):
    """An input media file that cannot be read, or frames that do not fit the writer."""


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach()
        if x.dtype.is_floating_point:
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _sample_rate(value) -> int:
    try:
        return validate.sample_rate("audio sample_rate", value)
    except ValueError as e:
        raise MediaError(str(e)) from None


def _audio_float32(audio) -> np.ndarray:
    """A waveform as float32 numpy in -1..1: integer PCM scaled (int16 / 32768, ...), never clipped to a
    square wave; NaN / infinite samples refused (the AAC encoder would turn them into noise or silence)."""
    try:
        a = pcm_to_float(_to_numpy(audio))
    except ValueError as e:
        raise MediaError(f"audio waveform: {e}") from None
    if not np.isfinite(a).all():
        raise MediaError(f"audio waveform: {int((~np.isfinite(a)).sum())} sample(s) are NaN or infinite")
    return a


def frames_to_uint8(frames, out: np.ndarray | None = None) -> np.ndarray:
    """[n, H, W, 3] float in 0..1 (clamped) or uint8 -> contiguous uint8, truncating like the original.
    ``out``: a uint8 array of the same shape to fill (returned). Float frames are converted frame by
    frame, so there are no full-size float temporaries."""
    a = _to_numpy(frames)
    if a.dtype == np.uint8 and out is None:
        return np.ascontiguousarray(a)
    if out is None:
        out = np.empty(a.shape, np.uint8)
    if a.dtype == np.uint8:
        np.copyto(out, a)
        return out
    for src, dst in zip(a, out):
        np.copyto(dst, np.clip(src.astype(np.float32, copy=False), 0.0, 1.0) * 255.0, casting="unsafe")
    return out


def fit_audio_to_frames(audio, sample_rate: int, num_frames: int) -> np.ndarray:
    """The waveform ``[C, S]`` (or ``[S]``) cut, or padded with silence at the end, to exactly
    ``num_frames`` video frames at 25 fps: ``audio_samples_for_frames(num_frames, sample_rate)``
    samples at its own rate. Returns float32 ``[C, S']``; the input is not modified.

    The team rule for output files: audio and video both last N / 25 s, so players that stop at
    the longer track neither cut the last frame nor show a frozen one.
    """
    from .planner import audio_samples_for_frames

    sample_rate = _sample_rate(sample_rate)
    a = _audio_float32(audio)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise MediaError(f"audio waveform: expected [channels, samples], got shape {a.shape}")
    target = audio_samples_for_frames(num_frames, sample_rate)
    if a.shape[1] >= target:
        return a[:, :target]
    return np.pad(a, ((0, 0), (0, target - a.shape[1])))


class _EncoderThread:
    """Runs a function on each queued array in one background thread, in order: the mp4 writer's
    colour conversion, H.264 encoding and muxing overlap with the caller's work (sampling the next
    segment group, decoding on a GPU). At most ``max_bytes`` wait (one item always may), so memory
    stays bounded however long the clip. The first error stops the work; ``check`` raises it.

    Finished arrays go back to a pool that :meth:`buffer` hands out again, as long as the pool and
    the queue together stay within ``max_bytes``. A fresh array per chunk would be mapped fresh by
    the allocator (chunks of large frames are above glibc's mmap threshold) and fault in page by
    page: 2.1-2.4 s of system time on the caller's thread per 10 s of 1920x1080 video (measured)."""

    def __init__(self, work, max_bytes: int):
        import collections
        import threading

        self._work, self._max_bytes = work, int(max_bytes)
        self._items = collections.deque()
        self._queued_bytes = 0
        self._free: list[np.ndarray] = []  # flat uint8 buffers, ready for reuse
        self._lent: dict[int, np.ndarray] = {}  # id -> flat buffer handed out by buffer(), not yet recycled
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="keyface-mp4-encoder", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._items or self._closing)
                if not self._items:
                    return
                item = self._items.popleft()
            try:
                if self._error is None:  # after an error or a cancel, only drain
                    self._work(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by check()
                self._error = e
            with self._cond:
                self._queued_bytes -= item.nbytes
                self._recycle(item)
                self._cond.notify_all()

    def _recycle(self, item: np.ndarray):
        flat = self._lent.pop(id(item.base), None)
        if flat is None or self._error is not None:
            return
        if self._queued_bytes + sum(b.nbytes for b in self._free) + flat.nbytes <= self._max_bytes:
            self._free.append(flat)

    def buffer(self, shape, dtype=np.uint8) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` for the caller to fill and then :meth:`put`: a finished
        one reused when one is large enough, else a new one."""
        dtype = np.dtype(dtype)
        need = int(np.prod(shape)) * dtype.itemsize
        with self._cond:
            i = next((i for i, b in enumerate(self._free) if b.nbytes >= need), None)
            flat = np.empty(need, np.uint8) if i is None else self._free.pop(i)
            self._lent[id(flat)] = flat
        return flat[:need].view(dtype).reshape(shape)

    def check(self):
        if isinstance(self._error, _FilterError):  # about the frames: raised as the filter raised it
            raise self._error.error
        if self._error is not None and not isinstance(self._error, _Cancelled):
            raise MediaError(f"encoding the mp4 failed: {self._error}") from self._error

    def put(self, item):
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._items
                                or self._queued_bytes + item.nbytes <= self._max_bytes)
            self.check()
            self._items.append(item)
            self._queued_bytes += item.nbytes
            self._cond.notify_all()

    def finish(self):
        """Wait until every queued item is done (raises the work's error, if any)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._free.clear()
        self._lent.clear()
        self.check()

    def cancel(self):
        """Drop what is queued and stop; returns once the thread no longer touches the writer."""
        with self._cond:
            self._error = self._error or _Cancelled()
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._free.clear()
        self._lent.clear()


class _Cancelled(Exception):
    pass


class _FilterError(Exception):
    """An error of the writer's frame_filter (e.g. a PasteError about non-finite frames)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# x264 presets by picture size. At 512 x 512 (the model's output) "medium" costs ~0.2 CPU-s per output
# second. A pasted-back 1920x1080 video is written with "superfast": x264 alone costs 9.6 ms per frame
# against 19.4 ("veryfast") and 44.0 ("medium"), at the same quality as veryfast (43.47 dB PSNR against
# 43.48 and 43.67 at crf 18) for +18% size (+44% against medium); bench/face_bench.py's preset rows, on a
# face panned in the 1920x1080 test photo. Next to a fast render (the smoke models on a CPU) veryfast
# added 14% to the render time per output second, superfast 3-4% (docs/FACE.md).
FULL_RESOLUTION_PIXELS = 1024 * 1024
# Frames waiting for the encoder thread: a segment group at 1920x1080 (27 frames, 168 MB as uint8)
# fits, so its encoding overlaps the sampling of the next group.
MAX_QUEUED_BYTES = 256 << 20


def default_preset(width: int, height: int) -> str:
    return "medium" if width * height <= FULL_RESOLUTION_PIXELS else "superfast"


def add_h264_stream(container, width: int, height: int, fps: int, crf: int, preset: str):
    """The writer's H.264 video stream (yuv420p, the settings below) added to an open PyAV container;
    ``bench/face_bench.py`` times x264 with exactly these settings."""
    vs = container.add_stream("libx264", rate=fps)
    vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
    # Resumed and Ray renders must equal uninterrupted ones byte for byte.
    # mbtree=0: x264's macroblock-tree rate control was measured to read memory it never wrote
    # at some frame widths (64-192 px of those tried; 128-1920 px widths were clean): the same
    # frames gave other bytes depending on what the heap held (MALLOC_PERTURB_ changes them).
    # Off for every size: +10.6% file size at the same crf, -0.2 dB PSNR (512 px portrait pan).
    vs.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
    # One x264 thread: its output depends on the thread count, which differs between machines
    # (a Ray driver, a resumed job elsewhere). The encoding overlaps the render instead: it runs
    # in the writer's own thread (_EncoderThread).
    vs.codec_context.thread_count = 1
    return vs


class Mp4Writer:
    """Streaming mp4 writer (H.264 yuv420p video + optional AAC audio), atomic on close.

    ``audio``: waveform ``[C, S]`` or ``[S]`` (float, -1..1) at ``sample_rate``; it is written in full
    (the track lasts S / sample_rate seconds), interleaved with the video as frames arrive. Rates
    AAC cannot store are resampled to 48 kHz; more than 2 channels are averaged to mono.
    ``preset``: the x264 preset; by default :func:`default_preset` of the frame size.
    ``frame_filter``: chunk -> frames ``[n, height, width, 3]`` (float 0..1 or uint8), run in the
    writer's thread on each written chunk before it is encoded, e.g. a
    :class:`~keyface.face.paste.FacePaster`'s ``paste_uint8`` with ``reuse=True`` (each result is
    encoded before the next call). ``write`` then takes chunks of any frame size. Running it here
    rather than in the caller takes it, and the copy of the full-size result, off the render's thread.
    """

    def __init__(self, path, width: int, height: int, fps: int = FPS, audio=None, sample_rate: int | None = None,
                 num_frames: int | None = None, crf: int = DEFAULT_CRF, preset: str | None = None, audio_bitrate: int = 128000,
                 frame_filter=None):
        import av

        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise MediaError(f"H.264 yuv420p needs even, positive frame sizes, got {width}x{height}")
        crf = validate.integer("crf", crf, 0, 51)  # libx264's range; it would clamp silently
        self.path = os.fspath(path)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.num_frames = None if num_frames is None else int(num_frames)
        self.frames_written = 0  # accepted by write(); the encoder thread may still be working on them
        self._frames_encoded = 0
        self._frame_filter = frame_filter
        self._rgb = None  # the RGB frame handed to swscale (_rgb_frame)
        self._encoder = None
        self._closed = False
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise MediaError(f"output folder does not exist: {folder}")
        self._tmp = create_temp_beside(self.path, ".part")  # mode 0o666 & ~umask, as a normally created file
        try:
            options = {}
            if audio is not None and sample_rate:
                # the edit lists are stored in the movie timescale (1000 by default, i.e. the audio
                # duration rounded to ms); the AAC rate is a multiple of 25, so both tracks stay exact
                options["movie_timescale"] = str(_aac_rate(_sample_rate(sample_rate)))
            self._container = av.open(self._tmp, mode="w", format="mp4", options=options)
            vs = add_h264_stream(self._container, self.width, self.height, self.fps, crf,
                                 preset or default_preset(self.width, self.height))
            self._vstream = vs
            self._audio = None
            if audio is not None:
                self._setup_audio(audio, sample_rate, audio_bitrate)
            self._encoder = _EncoderThread(self._encode, MAX_QUEUED_BYTES)
        except BaseException:
            self.abort()
            raise

    # ---- audio ---------------------------------------------------------------------------------
    def _setup_audio(self, audio, sample_rate, bitrate):
        import av

        sample_rate = _sample_rate(sample_rate)
        a = _audio_float32(audio)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] == 0:
            raise MediaError(f"audio waveform: expected [channels, samples] with samples > 0, got {a.shape}")
        if a.shape[0] > 2:
            a = a.mean(axis=0, keepdims=True)
        a = np.ascontiguousarray(np.clip(a, -1.0, 1.0))
        rate = int(sample_rate)
        layout = "mono" if a.shape[0] == 1 else "stereo"
        out_rate = _aac_rate(rate)
        st = self._container.add_stream("aac", rate=out_rate)
        st.layout = layout
        st.bit_rate = bitrate
        self._astream = st
        self._audio = a
        self._in_rate = rate
        self._out_rate = out_rate
        self._layout = layout
        self._a_pos = 0  # input samples already sent
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        self._fifo = av.AudioFifo()
        self._a_pts = 0

    def _push_audio(self, upto_sample: int, final: bool = False):
        import av

        upto = min(int(upto_sample), self._audio.shape[1])
        if upto > self._a_pos:
            chunk = self._audio[:, self._a_pos:upto]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self._layout)
            frame.sample_rate = self._in_rate
            frame.pts = self._a_pos
            frame.time_base = Fraction(1, self._in_rate)
            for f in self._resampler.resample(frame):
                self._fifo.write(f)
            self._a_pos = upto
        if final:
            for f in self._resampler.resample(None):
                self._fifo.write(f)
        fs = self._astream.codec_context.frame_size or 1024
        while self._fifo.samples >= fs or (final and self._fifo.samples > 0):
            f = self._fifo.read(min(fs, self._fifo.samples))
            f.pts = self._a_pts
            f.time_base = Fraction(1, self._out_rate)
            self._a_pts += f.samples
            for pkt in self._astream.encode(f):
                self._container.mux(pkt)
        if final:
            for pkt in self._astream.encode(None):
                self._container.mux(pkt)

    # ---- video ---------------------------------------------------------------------------------
    def write(self, frames):
        """Append frames [n, H, W, 3] (float 0..1 or uint8; a single [H, W, 3] frame also works), or,
        with a ``frame_filter``, chunks of what the filter takes. Returns once they are copied: the
        filter and the encoding run in the writer's thread, and their errors are raised by the next
        ``write`` or by ``close``. The caller may reuse its buffer at once."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")
        given = _to_numpy(frames)
        if given.ndim == 3:
            given = given[None]
        sized = self._frame_filter is None  # a filter takes frames of its own size
        if given.ndim != 4 or (sized and given.shape[1:] != (self.height, self.width, 3)):
            size = f"{self.height}, {self.width}, 3" if sized else "H, W, C"
            raise MediaError(f"frames: expected [n, {size}], got {given.shape}")
        if self.num_frames is not None and self.frames_written + given.shape[0] > self.num_frames:
            raise MediaError(
                f"too many frames: {self.frames_written + given.shape[0]} written, the clip has {self.num_frames}"
            )
        # always a copy: the caller may reuse its buffer (a paste-back buffer is, for the next chunk)
        if self._frame_filter is None:
            item = frames_to_uint8(given, out=self._encoder.buffer(given.shape))
        else:  # the filter's input as given (float stays float: it is quantised after the filter)
            item = self._encoder.buffer(given.shape, np.float32 if given.dtype.kind == "f" else given.dtype)
            np.copyto(item, given, casting="same_kind")
        self._encoder.put(item)
        self.frames_written += given.shape[0]

    def _encode(self, chunk):
        """In the encoder thread: the frame filter, colour conversion, H.264, and the audio up to the
        end of these frames."""
        import av

        frames = chunk
        if self._frame_filter is not None:
            try:
                frames = self._frame_filter(chunk)
            except Exception as e:  # noqa: BLE001 - re-raised as it is by the next write / close
                raise _FilterError(e) from e
            frames = _to_numpy(frames)
            if frames.shape != (chunk.shape[0], self.height, self.width, 3):
                raise MediaError(f"frame_filter: expected [{chunk.shape[0]}, {self.height}, {self.width}, 3], "
                                 f"got {frames.shape}")
            if frames.dtype != np.uint8:
                frames = frames_to_uint8(frames)
        for img in frames:
            vf = self._rgb_frame(img).reformat(format="yuv420p")
            vf.pts = self._frames_encoded
            for pkt in self._vstream.encode(vf):
                self._container.mux(pkt)
            self._frames_encoded += 1
        if self._audio is not None:
            self._push_audio(self._frames_encoded * self._in_rate // self.fps)

    def _rgb_frame(self, img: np.ndarray):
        """``img`` [H, W, 3] uint8 in the writer's one RGB frame (FFmpeg's aligned buffer), reused for
        every frame. ``VideoFrame.from_ndarray`` would copy each frame twice while holding the GIL
        (5.7 ms at 1920x1080, measured), stalling the render's thread; numpy copies without it."""
        import av

        if self._rgb is None:
            self._rgb = av.VideoFrame(self.width, self.height, "rgb24")
        plane = self._rgb.planes[0]
        view = np.ndarray((self.height, self.width, 3), np.uint8, buffer=plane, strides=(plane.line_size, 3, 1))
        np.copyto(view, img)
        return self._rgb

    def close(self):
        """Flush, check the frame count, and move the file into place."""
        if self._closed:
            return
        try:
            if self.num_frames is not None and self.frames_written != self.num_frames:
                raise MediaError(f"clip has {self.num_frames} frames but {self.frames_written} were written")
            if self.frames_written == 0:
                raise MediaError("no frames were written")
            self._encoder.finish()
            for pkt in self._vstream.encode(None):
                self._container.mux(pkt)
            if self._audio is not None:
                self._push_audio(self._audio.shape[1], final=True)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Drop the partial output (idempotent)."""
        self._closed = True
        encoder = getattr(self, "_encoder", None)
        if encoder is not None:
            encoder.cancel()
        c = getattr(self, "_container", None)
        self._container = None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
        tmp = getattr(self, "_tmp", None)
        if tmp and os.path.exists(tmp):
            os.remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


# The whole waveform is held in memory (float32), and a small compressed file can decode to hours of
# samples. 2 GiB is 9.3 h of 16 kHz mono, or 1.5 h of 48 kHz stereo.
MAX_AUDIO_BYTES = 2 << 30


def read_audio_file(path):
    """Decode the first audio stream of ``path`` -> (waveform float32 torch.Tensor [C, S], sample_rate).
    Refuses (MediaError) a stream that decodes to more than MAX_AUDIO_BYTES of float32 samples."""
    import av
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f"audio file not found: {path}")
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        raise MediaError(f"cannot open audio file {path}: {e}") from e
    with container:
        streams = container.streams.audio
        if not streams:
            raise MediaError(f"{path} has no audio stream")
        resampler = rate = None
        chunks = []
        decoded_bytes = 0
        for frame in container.decode(streams[0]):
            if resampler is None:  # the first decoded frame fixes the layout and rate of the whole waveform
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=frame.sample_rate)
                rate = frame.sample_rate
            for f in resampler.resample(frame):
                chunks.append(f.to_ndarray())
                decoded_bytes += chunks[-1].nbytes
            if decoded_bytes > MAX_AUDIO_BYTES:
                raise _too_much_audio(path, chunks, rate)
        if resampler is not None:
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray())
    if not chunks:
        raise MediaError(f"{path}: the audio stream holds no samples")
    wav = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(wav)), int(rate)


def _too_much_audio(path, chunks, rate) -> MediaError:
    channels = chunks[-1].shape[0]
    seconds = sum(c.shape[1] for c in chunks) / rate
    return MediaError(
        f"{path}: the audio decodes to more than {MAX_AUDIO_BYTES >> 30} GiB of samples ({seconds:.0f} s so far at "
        f"{rate} Hz x {channels} channel(s)), more than KeyFace holds in memory. Split the clip, or convert it "
        f"to 16 kHz mono first (ffmpeg -i IN -ac 1 -ar 16000 OUT.wav; the audio encoders use 16 kHz mono)")


# A portrait this large already costs 0.5 GB as float32 RGB; a small compressed file can declare far
# more (PIL itself refuses only above ~179 megapixels), and the model works at 512 x 512.
MAX_IMAGE_PIXELS = 40_000_000


def read_image(path):
    """Read an image -> float32 torch.Tensor [H, W, 3] in 0..1 (RGB, EXIF orientation applied)."""
    import torch
    from PIL import Image, ImageOps

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:  # reads the header only: the size is known before any decoding
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"image {path} is {im.width} x {im.height} ({im.width * im.height / 1e6:.0f} megapixels); "
                    f"KeyFace reads portraits of up to {MAX_IMAGE_PIXELS // 10**6} megapixels (it scales them to "
                    "the model's 512 px anyway): downscale the image first"
                )
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many error types
        raise MediaError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(rgb))


def probe_mp4(path) -> dict:
    """Read back an mp4: decoded video frame count, size, fps; audio track duration (container
    metadata, i.e. after the edit list that hides AAC priming/padding), rate, channels, decoded samples."""
    import av

    info = {"frames": 0, "width": None, "height": None, "fps": None, "audio_seconds": None, "audio_rate": None,
            "audio_channels": None, "audio_decoded_samples": None, "video_seconds": None}
    with av.open(os.fspath(path)) as c:
        if c.streams.video:
            v = c.streams.video[0]
            info["width"], info["height"] = v.codec_context.width, v.codec_context.height
            info["fps"] = float(v.average_rate) if v.average_rate else None
            if v.duration is not None:
                info["video_seconds"] = float(v.duration * v.time_base)
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_rate"] = a.codec_context.sample_rate
            info["audio_channels"] = a.codec_context.channels
            if a.duration is not None:
                info["audio_seconds"] = float(a.duration * a.time_base)
        n_audio = 0
        for frame in c.decode(*c.streams.video, *c.streams.audio):
            if isinstance(frame, av.VideoFrame):
                info["frames"] += 1
            else:
                n_audio += frame.samples
        if c.streams.audio:
            info["audio_decoded_samples"] = n_audio
    return info
