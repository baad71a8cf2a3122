"""Per-video-frame audio features, as ``scripts/util/get_audio_embeddings.py`` (--skip_video) and
``full_pipeline.get_audio_embeddings(audio_emb_type="wavlm", extra_audio="both")`` compute them
(spec 2.2; parity kind ``audio_features``).

At 16 kHz and 25 fps a video frame owns 640 samples, and every encoder is brought to 2 feature
vectors per frame:

* WavLM and BEATs: the clip, zero-padded to a multiple of 640 (F frames) and, if F is odd, by one more
  all-zero frame (F' even), is encoded as ONE sequence; the L output vectors are resampled to 2F'
  rows with PyTorch's legacy ``nearest`` interpolation (row i takes vector floor(i * L / 2F')); the
  result is [F', 2, d].
* wav2vec2: the unpadded clip is normalised ``(w - mean) / sqrt(var_unbiased + 1e-7)``, then
  zero-padded to 640 F samples and encoded as one sequence (2F - 1 vectors); one zero vector is
  appended when the count is odd; [F, 2, d].
* keyframe = cat(WavLM, BEATs), interpolation = cat(wav2vec2, BEATs), both cut to the common length
  (F = ceil(S / 640)) after an optional ``max_frames`` crop.

Clip length. The original renders F = ceil(S / 640) frames, so its video runs up to one frame (40 ms)
longer than the audio. KeyFace renders N = round(S * 25 / 16000) frames instead: the video length
closest to the audio's (within half a frame). :func:`compute_features` therefore cuts the arrays to N
rows by default (``trim_to_duration=True``); the rows it drops belong to the zero padding of the
last partial frame. ``trim_to_duration=False`` keeps the original's F rows (parity tests).

Memory: like the original, each encoder sees the whole clip as one sequence (about 50 tokens per
second for WavLM, wav2vec2 and BEATs alike), so attention memory grows with the square of the clip
length. Measured peak RSS increase on the CPU (float32, one thread) for 60 s of audio (1500 frames,
L = 3000 tokens) with the tiny test encoders (4 heads, width 32, 2 layers):

=============  ===========================  =================================
encoder        whole clip (default)         ``attention_chunk=512``
=============  ===========================  =================================
WavLM          +611 MB                      +267 MB
BEATs          +581 MB                      +301 MB
wav2vec2       +81 MB (SDPA, no L x L)      (not needed)
=============  ===========================  =================================

(120 s, chunk 512: WavLM +580 MB, BEATs +799 MB; 300 s, all three, chunk 512: +820 MB.) The
whole-clip L x L tensors scale with the head count: for Base+ (12 heads) one such tensor is
12 x 3000^2 x 4 B = 0.43 GB at 60 s and 10.8 GB at 5 min, and transformers' WavLM holds several at
once (bias, gated bias, scores, weights). ``compute_features(..., attention_chunk=n)`` (or
``encoder(waveform, attention_chunk=n)``) computes WavLM and BEATs attention in blocks of n query rows: the
same function (differences ~1e-6), with memory ~ heads x n x L per block. :func:`compute_features`
uses blocks of :data:`DEFAULT_ATTENTION_CHUNK` rows unless told otherwise, made smaller for long clips
so that a block holds at most ``keyface.audio._common.ATTENTION_BLOCK_VALUES`` scores.

Progress and cancel: every encoder works in small units (feature-extractor convolutions in time
chunks, fbank chunks, attention blocks, the rest of each layer) and ``compute_features(progress=)``
is called after each one; a cancel raised there stops the encoding within one unit. Measured on a
10-minute clip with the test encoders (one CPU thread, on a 2-core machine shared with other jobs,
load average ~7): the longest gap between two reports in each encoder's first 6 s was 0.46 s
(WavLM), 0.57 s (BEATs) and 0.59 s (wav2vec2); before, a cancel waited for the running encoder to
finish the whole clip (163 s for WavLM, 212 s for BEATs there). The pieces give the same features as
one call (bitwise in the tests at the default sizes; within 1e-5 for any size). Memory is not
bounded by them: the first convolution's output for the whole clip is still held (hidden size x
3200 values per second of audio). On long clips the process's peak RSS is mostly glibc keeping the
freed blocks: BEATs (test encoder) on a 360 s clip grew the peak RSS by 2108 MB with the default
malloc and by 206 MB with ``MALLOC_MMAP_THRESHOLD_=131072`` (WavLM 1638 MB, wav2vec2 452 MB with
the default; all three on 600 s in one process: 7198 MB, 446 s at load average ~12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..planner import FPS, video_frame_count
from ..validate import pcm_to_float, sample_rate as check_sample_rate, stage_output
from .resample import resample
from .wav2vec2 import normalize_waveform

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = math.ceil(SAMPLE_RATE / FPS)  # 640
# the shortest clip KeyFace renders: N = round(S / 16000 x 25) >= 1, i.e. half a frame (20 ms); a
# one-frame clip is padded to whole frames for the encoders and rendered as one frame
MIN_SAMPLES = (SAMPLES_PER_FRAME + 1) // 2  # 320
SILENCE_THRESHOLD = 1e-5
# Query rows per attention block in WavLM and BEATs (about 20 s of audio). Clips shorter than that
# are one block; longer ones keep attention memory linear in the clip length (see above).
DEFAULT_ATTENTION_CHUNK = 1024
BEATS_MIN_SAMPLES = 400 + 15 * 160  # 16 fbank frames = one 16 x 16 patch row
# A 2-D waveform with more rows than this, each of at most CHANNELS_LAST_MAX_COLS values, is
# channels-last [S, C]: no clip has that many channels (7.1 = 8), nor is 8 samples a usable clip
CHANNELS_LAST_MIN_ROWS = 64
CHANNELS_LAST_MAX_COLS = 8


class AudioInputError(ValueError):
    """The audio given to KeyFace cannot be used (empty, too short, silent, not finite, wrong shape)."""


@dataclass
class AudioFeatures:
    keyframe: torch.Tensor  # [N, 2, d_wavlm + d_beats] = cat(WavLM, BEATs)
    interpolation: torch.Tensor  # [N, 2, d_wav2vec2 + d_beats] = cat(wav2vec2, BEATs)
    num_frames: int  # rows of keyframe / interpolation: N = video_frame_count(S) (or F with trim_to_duration=False)
    wavlm: torch.Tensor | None = None  # per-encoder arrays as the original script saves them
    beats: torch.Tensor | None = None
    wav2vec2: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Waveform preparation
# --------------------------------------------------------------------------------------------------


def _to_float(waveform) -> torch.Tensor:
    if not isinstance(waveform, torch.Tensor):
        try:
            waveform = torch.as_tensor(waveform)
        except Exception as err:  # noqa: BLE001
            raise AudioInputError(f"audio: expected a waveform tensor, got {type(waveform).__name__} ({err})") from None
    try:
        return pcm_to_float(waveform)  # integer PCM -> -1..1 (int16 / 32768, ...)
    except ValueError as err:
        raise AudioInputError(str(err)) from None


def prepare_waveform(waveform, sample_rate) -> torch.Tensor:
    """Any mono / multichannel waveform -> mono float32 [S] at 16 kHz (on the input's device).

    Accepts ``[S]``, ``[C, S]`` or ``[1, C, S]`` (a ComfyUI AUDIO batch of one); channels-last
    ``[S, C]`` (more than 64 rows of at most 8 values, e.g. ``[48000, 2]``) is refused with a message
    saying so, not transposed on a guess. Channels are averaged (any count), then the clip is
    resampled to 16 kHz with :func:`keyface.audio.resample.resample` (torchaudio's filter; memory and
    time O(samples) at any rate, 44101 Hz or a prime included). Raises :class:`AudioInputError` for
    empty, non-finite, too short (rounds to 0 video frames: under :data:`MIN_SAMPLES` = 320 samples at 16 kHz = 20 ms) or silent
    audio, and for other shapes. A clip that rounds to one frame (20-60 ms) is accepted.
    """
    x = _to_float(waveform)
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise AudioInputError(
                f"audio: got a batch of {x.shape[0]} clips (shape {tuple(x.shape)}); KeyFace takes one clip at a time"
            )
        x = x[0]
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise AudioInputError(
            f"audio: expected a waveform [samples], [channels, samples] or [1, channels, samples], got shape {tuple(x.shape)}"
        )
    if x.shape[0] > CHANNELS_LAST_MIN_ROWS and x.shape[1] <= CHANNELS_LAST_MAX_COLS:
        # refused rather than transposed on a guess: the array comes from a caller with the wrong
        # layout, which would also be wrong wherever else it is used (muxing the audio track, ...)
        raise AudioInputError(
            f"audio: expected [channels, samples], got [samples, channels]? shape {tuple(x.shape)} would be "
            f"{x.shape[0]} channels of {x.shape[1]} sample(s); transpose it (waveform.T) if it is channels-last"
        )
    if x.numel() == 0:
        raise AudioInputError(f"audio: the clip is empty (shape {tuple(x.shape)})")
    try:
        sr = check_sample_rate("audio: sample_rate", sample_rate)
    except ValueError as err:
        raise AudioInputError(str(err)) from None
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise AudioInputError(f"audio: the waveform contains {bad} NaN or infinite sample(s)")
    x = x.mean(dim=0)  # downmix (a no-op for mono)
    x = resample(x, sr, SAMPLE_RATE)  # O(samples) for any rate (see keyface.audio.resample)
    if video_frame_count(x.shape[0], SAMPLE_RATE) < 1:
        seconds = x.shape[0] / SAMPLE_RATE
        raise AudioInputError(
            f"audio: the clip is too short: {x.shape[0]} samples at 16 kHz ({seconds * 1000:.1f} ms; input shape "
            f"{tuple(waveform.shape) if hasattr(waveform, 'shape') else '?'} at {sr} Hz) rounds to 0 video frames "
            f"at {FPS} fps; at least {MIN_SAMPLES} samples at 16 kHz ({MIN_SAMPLES * 1000 // SAMPLE_RATE} ms, half "
            "a frame, which rounds to one frame) are needed"
        )
    peak = float(x.abs().max())
    if peak < SILENCE_THRESHOLD:
        raise AudioInputError(
            f"audio: the clip is silent (peak amplitude {peak:.2e}, below {SILENCE_THRESHOLD:g}); "
            "give a clip with speech in it"
        )
    return x.contiguous()


def encoder_frame_count(num_samples_16k: int) -> int:
    """F = ceil(S / 640): the 640-sample frames the encoders see (the original's clip length). The clip
    KeyFace renders has :func:`keyface.planner.video_frame_count` frames (rounded) instead."""
    return -(-int(num_samples_16k) // SAMPLES_PER_FRAME)


# --------------------------------------------------------------------------------------------------
# Per-encoder arrays (exactly what get_audio_embeddings.py saves)
# --------------------------------------------------------------------------------------------------


def _pad_frames(wave: torch.Tensor, even: bool) -> tuple[torch.Tensor, int]:
    """Zero-pad a mono clip to whole 640-sample frames (and to an even count if ``even``)."""
    frames = encoder_frame_count(wave.shape[-1])
    if even and frames % 2:
        frames += 1
    return F.pad(wave, (0, frames * SAMPLES_PER_FRAME - wave.shape[-1])), frames


def _to_rows(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, L, d] -> legacy ``nearest`` to 2 * frames rows -> [frames, 2, d]."""
    x = F.interpolate(feats.transpose(1, 2).float(), size=2 * frames, mode="nearest")
    return x.transpose(1, 2).reshape(frames, 2, -1)


@torch.no_grad()
def wavlm_frames(wave16k: torch.Tensor, wavlm, attention_chunk: int | None = None, progress=None) -> torch.Tensor:
    """WavLM array [F', 2, d] (F' = F rounded up to even) of a prepared mono 16 kHz clip.
    ``attention_chunk``, ``progress``: see :class:`~keyface.audio.wavlm.WavLMEncoder` (None: whole clip)."""
    padded, frames = _pad_frames(wave16k, even=True)
    return _to_rows(wavlm(padded[None], attention_chunk=attention_chunk, progress=progress), frames)


@torch.no_grad()
def beats_frames(wave16k: torch.Tensor, beats, attention_chunk: int | None = None, progress=None) -> torch.Tensor:
    """BEATs array [F', 2, d] of a prepared mono 16 kHz clip (``attention_chunk`` as for WavLM).

    Clips shorter than 6 frames (0.24 s) give the original no BEATs token at all (it fails there);
    their encoder input is extended with zeros to one 16-frame fbank patch row (2800 samples).
    Longer clips are computed exactly as the original.
    """
    padded, frames = _pad_frames(wave16k, even=True)
    if padded.shape[-1] < BEATS_MIN_SAMPLES:
        padded = F.pad(padded, (0, BEATS_MIN_SAMPLES - padded.shape[-1]))
    return _to_rows(beats(padded[None], attention_chunk=attention_chunk, progress=progress), frames)


@torch.no_grad()
def wav2vec2_frames(wave16k: torch.Tensor, wav2vec2, progress=None) -> torch.Tensor:
    """wav2vec2 array [F, 2, d]: whole-clip normalisation, zero pad, encode, zero vector if odd."""
    normed = normalize_waveform(wave16k)
    padded, frames = _pad_frames(normed, even=False)
    h = wav2vec2(padded[None], progress=progress)[0].float()  # [L, d]
    if h.shape[0] % 2:
        h = torch.cat([h, h.new_zeros(1, h.shape[1])], dim=0)
    return h.reshape(-1, 2, h.shape[1])


# --------------------------------------------------------------------------------------------------
# The clip's features
# --------------------------------------------------------------------------------------------------


def _finite_features(encoder: str, feats: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """``feats`` if finite; else an AudioInputError naming the encoder and the waveform's amplitude
    (float audio far outside -1..1, e.g. 1e15, overflows the encoders: their features become NaN)."""
    if bool(torch.isfinite(feats).all()):
        return feats
    peak = float(wave.abs().max())
    try:
        stage_output(f"audio features ({encoder})", feats,
                     f"the waveform's peak amplitude is {peak:.3g}; float audio is expected in -1..1 (integer PCM "
                     "is scaled automatically); scale the clip down" if peak > 1.0 else
                     "a model file with non-finite or overflowing weights")
    except ValueError as err:
        raise AudioInputError(f"audio: {err}") from None
    return feats
# Progress steps per encoder reported by compute_features (progress(done, 3 x this)).
PROGRESS_STEPS_PER_ENCODER = 100


def _encoder_progress(progress, index: int, count: int = 3):
    """The ``progress(done, total)`` of encoder ``index`` of ``count``, as a share of the whole call's."""
    if progress is None:
        return None
    steps = PROGRESS_STEPS_PER_ENCODER

    def report(done, total):
        progress(index * steps + (steps * done) // max(total, 1), count * steps)

    return report


@torch.no_grad()
def compute_features(waveform, sample_rate, wavlm, beats, wav2vec2, max_frames=None,
                     attention_chunk=DEFAULT_ATTENTION_CHUNK,
                     trim_to_duration=True, progress=None) -> AudioFeatures:
    """Raw audio -> :class:`AudioFeatures` (keyframe / interpolation arrays, one row per 25 fps frame).

    ``waveform``: [S], [C, S] or [1, C, S] at ``sample_rate`` (see :func:`prepare_waveform`).
    ``max_frames``: optional crop of the arrays (the original crops at 1125 = 45 s) before the
    common-length cut. ``attention_chunk``: WavLM and BEATs compute attention in blocks of that many
    query rows, passed to each encoder call (memory ~ L x chunk instead of L^2; the same function, see
    the module docstring); ``None`` attends over the whole clip at once, as the original. ``trim_to_duration``:
    cut to N = :func:`video_frame_count` rows (the default; see "Clip length" above) instead of the
    original's F = ceil(S / 640). Outputs are float32 on the CPU.

    ``progress(done, total)`` is called after every unit of each encoder's work (a conv layer, an
    attention block of at most :data:`~keyface.audio._common.ATTENTION_BLOCK_VALUES` scores, a
    layer), ``total`` = 3 x :data:`PROGRESS_STEPS_PER_ENCODER`; an exception it raises (a cancel)
    stops the encoding there, so a cancel lands within one unit (about 0.1 s on a CPU thread for the
    test encoders, at any clip length). With ``attention_chunk=None`` WavLM runs as one call (no
    reports inside it). The features do not depend on ``progress``.
    """
    wave = prepare_waveform(waveform, sample_rate)
    n = video_frame_count(wave.shape[0]) if trim_to_duration else encoder_frame_count(wave.shape[0])
    # the chunk size goes into each call: the encoders hold no per-call state, so threads may share them
    w = _finite_features("WavLM", wavlm_frames(wave, wavlm, attention_chunk, _encoder_progress(progress, 0)).float().cpu(), wave)
    b = _finite_features("BEATs", beats_frames(wave, beats, attention_chunk, _encoder_progress(progress, 1)).float().cpu(), wave)
    v = _finite_features("wav2vec2", wav2vec2_frames(wave, wav2vec2, _encoder_progress(progress, 2)).float().cpu(), wave)
    key = [w, b]
    interp = [v, b]
    if max_frames is not None:
        key = [t[: int(max_frames)] for t in key]
        interp = [t[: int(max_frames)] for t in interp]
    length = min([t.shape[0] for t in key + interp] + [n])
    keyframe = torch.cat([t[:length] for t in key], dim=-1)
    interpolation = torch.cat([t[:length] for t in interp], dim=-1)
    return AudioFeatures(keyframe=keyframe, interpolation=interpolation, num_frames=length, wavlm=w, beats=b, wav2vec2=v)
