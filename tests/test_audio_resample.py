"""Resampling to 16 kHz at any rate: bounded memory and time, and the same filter as torchaudio
(issue 9 item 3)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keyface.audio.features import SAMPLE_RATE, prepare_waveform
from keyface.audio.resample import TORCHAUDIO_MAX_KERNEL, resample, resample_direct, torchaudio_kernel_taps

ROOT = Path(__file__).resolve().parent.parent
COMMON_RATES = (8000, 11025, 22050, 32000, 44100, 48000, 96000)
ODD_RATES = (44101, 96001, 16001, 7919)  # all prime: no factor shared with 16000


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def peak_frequency(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.shape[0], dtype=torch.float64))
    return float(spectrum.abs().argmax()) * rate / wave.shape[0]


def test_common_rates_keep_the_torchaudio_path_bit_for_bit():
    from torchaudio.functional import resample as torchaudio_resample

    for rate in COMMON_RATES:
        assert torchaudio_kernel_taps(rate, SAMPLE_RATE) <= TORCHAUDIO_MAX_KERNEL, rate
        wave = sine(rate, 0.5)
        assert torch.equal(resample(wave, rate, SAMPLE_RATE), torchaudio_resample(wave, rate, SAMPLE_RATE))


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_direct_path_is_the_same_filter_as_torchaudio(rate):
    """The path odd rates take, run at common rates, matches torchaudio (in float64, where neither
    side's rounding hides a wrong tap or a misplaced sample)."""
    from torchaudio.functional import resample as torchaudio_resample

    wave = torch.randn(rate // 2, generator=torch.Generator().manual_seed(rate), dtype=torch.float64)
    ours, theirs = resample_direct(wave, rate, SAMPLE_RATE), torchaudio_resample(wave, rate, SAMPLE_RATE)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 2e-6


@pytest.mark.parametrize("rate", ODD_RATES)
def test_odd_rates_keep_frequency_amplitude_and_length(rate):
    assert torchaudio_kernel_taps(rate, SAMPLE_RATE) > TORCHAUDIO_MAX_KERNEL  # the direct path
    out = prepare_waveform(sine(rate, 2.0, freq=440.0, amplitude=0.5), rate)
    assert out.shape[0] == math.ceil(2.0 * rate * SAMPLE_RATE / rate)
    assert abs(peak_frequency(out, SAMPLE_RATE) - 440.0) <= 0.5  # one FFT bin is 0.5 Hz
    middle = out[1600:-1600]  # away from the zero-padded edges
    assert abs(float(middle.abs().max()) - 0.5) < 0.005
    # a tone above the new Nyquist frequency is filtered out, not folded back into the band
    alias = prepare_waveform(sine(rate, 1.0, freq=min(12000.0, rate / 2 - 100)) + sine(rate, 1.0), rate)
    if rate > 24000:
        assert float(alias[1600:-1600].abs().max()) < 0.51


_CHILD = r"""
import json, math, resource, sys, time, torch
torch.set_num_threads(1)
from keyface.audio.features import prepare_waveform

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = vm_size() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for rate in map(int, sys.argv[1:]):
    wave = torch.sin(torch.arange(2 * rate) * (2 * math.pi * 440 / rate))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        out = prepare_waveform(wave, rate)
        outcome = f"ok {out.shape[0]}"
    except BaseException as err:
        outcome = f"{type(err).__name__}: {err}"
    print(json.dumps({"rate": rate, "outcome": outcome, "seconds": time.perf_counter() - t0,
                      "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}),
          flush=True)
"""
PRIME_RATES = (44101, 96001)


@pytest.fixture(scope="module")
def prime_rate_runs():
    """Both rates in one child (importing torch costs seconds)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, PRIME_RATES)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        out, err = proc.stdout, proc.stderr[-2000:]
    except subprocess.TimeoutExpired as timeout:
        out, err = (timeout.stdout or b"").decode(), "the child did not finish within 60 s"
    return {r["rate"]: r for r in map(json.loads, out.splitlines())}, err


@pytest.mark.parametrize("rate", PRIME_RATES)
def test_prime_rate_costs_bounded_memory_and_time(prime_rate_runs, rate):
    """Before: 44101 Hz took 12 GB and 77 s for 2 s of audio; 96001 Hz was killed at 21 GB. The child
    runs under a 1 GB address-space allowance, so a regression fails here instead of swapping."""
    results, error = prime_rate_runs
    assert rate in results, error
    result = results[rate]
    assert result["outcome"] == "ok 32000", result
    assert result["seconds"] < 5, result
    assert result["rss_growth_mb"] < 100, result
