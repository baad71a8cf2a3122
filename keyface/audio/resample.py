"""Band-limited resampling whose cost stays O(samples) for any pair of rates.

``torchaudio.functional.resample`` builds one filter per output phase of the reduced ratio: for
44100 -> 16000 (441 : 160) that is 160 filters of ~475 taps, but for a rate that shares no factor
with 16000 (44101 Hz, any prime) it is 16000 filters of ~44000 taps each -- 12 GB and 77 s for a
2 s clip, more for 96001 Hz than a machine has.

:func:`resample` keeps torchaudio for ratios whose filter bank is small (every common rate: the
results stay bit-identical to what KeyFace always computed) and otherwise evaluates the very same
filter -- torchaudio's ``sinc_interp_hann`` with ``lowpass_filter_width=6`` and ``rolloff=0.99`` --
at each output sample's exact position: y[n] = sum_j x[j] h((j / sr - n / new_sr) * B). Each output
sample reads ~12 sr / B input samples (B = 0.99 min(sr, new_sr)), so the work is O(input + output)
samples, and the gathered windows are processed in blocks of at most :data:`BLOCK_ELEMENTS`.
"""

from __future__ import annotations

import math

import torch

LOWPASS_FILTER_WIDTH = 6  # torchaudio's defaults, which KeyFace has always used
ROLLOFF = 0.99
# torchaudio's filter bank for a reduced ratio o : n has n x (2 ceil(6 o / (0.99 min(o, n))) + o)
# taps; up to this many (4 MB of float32) it is cheap, and every common rate is far below it
# (44.1 kHz: 76 000; 22.05 kHz: 76 000; 48 kHz: 42; 8 kHz: 14).
TORCHAUDIO_MAX_KERNEL = 1 << 20
BLOCK_ELEMENTS = 1 << 21  # gathered (output sample x tap) values per block: 8 MB of float32


def torchaudio_kernel_taps(orig_freq: int, new_freq: int) -> int:
    """Taps in torchaudio's filter bank for this ratio (what its memory and time scale with)."""
    g = math.gcd(orig_freq, new_freq)
    o, n = orig_freq // g, new_freq // g
    width = math.ceil(LOWPASS_FILTER_WIDTH * o / (ROLLOFF * min(o, n)))
    return n * (2 * width + o)


def output_length(num_samples: int, orig_freq: int, new_freq: int) -> int:
    """ceil(S * new / orig): torchaudio's output length, in exact integer arithmetic."""
    return -(-num_samples * new_freq // orig_freq)


def resample(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """Resample a 1-D float waveform from ``orig_freq`` to ``new_freq`` Hz (positive integers)."""
    if orig_freq == new_freq:
        return wave
    if torchaudio_kernel_taps(orig_freq, new_freq) <= TORCHAUDIO_MAX_KERNEL:
        from ._common import torchaudio_part  # imported here so `import keyface` stays light

        return torchaudio_part("functional").resample(wave, orig_freq, new_freq)
    return resample_direct(wave, orig_freq, new_freq)


def _hann_sinc(u: torch.Tensor) -> torch.Tensor:
    """torchaudio's sinc_interp_hann filter at ``u`` (in units of the cutoff), zero beyond +-6."""
    u = u.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(u * (math.pi / LOWPASS_FILTER_WIDTH / 2)) ** 2
    x = u * math.pi
    return torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x) * window


def resample_direct(wave: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """The filter of :func:`resample`, evaluated per output sample (any ratio, O(samples) work).

    Output n sits at input position c = n orig / new = floor(c) + frac (exact integer arithmetic);
    it reads input samples floor(c) - half ... floor(c) + half + 1, at offsets (k - half - frac)
    from it, small numbers that float32 holds exactly enough (errors ~1e-7 of the filter)."""
    num_in = wave.shape[-1]
    num_out = output_length(num_in, orig_freq, new_freq)
    cutoff = ROLLOFF * min(orig_freq, new_freq)  # B, in Hz
    half = math.ceil(LOWPASS_FILTER_WIDTH * orig_freq / cutoff)  # input samples either side
    taps = 2 * half + 2
    padded = torch.nn.functional.pad(wave.to(torch.float32), (half + 1, half + 2))
    out = torch.empty(num_out, dtype=torch.float32, device=wave.device)
    block = max(1, BLOCK_ELEMENTS // taps)
    offsets = torch.arange(taps, device=wave.device)
    offsets_f = (offsets - half).to(torch.float32)
    for start in range(0, num_out, block):
        n = torch.arange(start, min(start + block, num_out), device=wave.device, dtype=torch.int64)
        whole, rest = torch.div(n * orig_freq, new_freq, rounding_mode="floor"), (n * orig_freq) % new_freq
        frac = (rest.double() / new_freq).float()
        # [block, taps] offsets from the output's position, in units of the filter's zero crossings
        u = (offsets_f[None, :] - frac[:, None]) * (cutoff / orig_freq)
        weights = _hann_sinc(u) * (cutoff / orig_freq)
        samples = padded[whole[:, None] + offsets + 1]  # zeros outside the clip, as torchaudio
        out[start:start + n.shape[0]] = (samples * weights).sum(dim=1)
    return out.to(wave.dtype)
