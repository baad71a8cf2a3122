"""Progress reports and cancel inside the audio encoders (issue 9.4): the encoders work in small units
(feature-extractor convolutions in time chunks, fbank chunks, attention in blocks of query rows) and
report after each one; a cancel raised by the report stops them there. The pieces must not change
the features: equal at the default sizes, within the parity tolerance at any size."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from keyface import model_files, smoke
from keyface.audio import _common, beats as beats_mod, compute_features, load_beats, load_wav2vec2, load_wavlm
from keyface.audio import features as F

AUDIO_TOLERANCE = {"rtol": 5e-5, "atol": 1e-4}  # the audio_features parity cases' tolerance


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke")
    smoke.write_smoke_models(folder)
    found = model_files.find_models(folder)
    return load_wavlm(found["wavlm"]), load_beats(found["beats"]), load_wav2vec2(found["wav2vec2"])


def _noise(seconds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(16000 * seconds), generator=g) * 0.1


def test_progress_is_reported_inside_each_encoder_and_does_not_change_the_features(encoders):
    wavlm, beats, wav2vec2 = encoders
    wave = _noise(50.0)  # 2500 tokens: several attention blocks and SDPA calls per layer
    reports = []
    with_progress = compute_features(wave, 16000, wavlm, beats, wav2vec2, progress=lambda d, t: reports.append((d, t)))
    plain = compute_features(wave, 16000, wavlm, beats, wav2vec2)
    assert torch.equal(with_progress.keyframe, plain.keyframe)
    assert torch.equal(with_progress.interpolation, plain.interpolation)
    done = [d for d, _ in reports]
    assert {t for _, t in reports} == {300} and done == sorted(done) and done[-1] == 300
    per_encoder = [sum(1 for d in done[:-1] if d // 100 == k) for k in range(3)]
    assert min(per_encoder) >= 5, per_encoder  # reports from inside every encoder, not one per encoder


def test_small_pieces_stay_within_the_parity_tolerance(encoders, monkeypatch):
    """Pieces far smaller than the defaults (single attention rows, 57-frame fbank calls, 333-sample
    convolutions) change only the float rounding: within the audio parity tolerance and < 1e-5."""
    wavlm, beats, wav2vec2 = encoders
    wave = _noise(9.97, seed=1)
    whole = [F.wavlm_frames(wave, wavlm, 1 << 20), F.beats_frames(wave, beats, 1 << 20), F.wav2vec2_frames(wave, wav2vec2)]
    monkeypatch.setattr(_common, "CONV_CHUNK_OUTPUTS", 333)
    monkeypatch.setattr(beats_mod, "FBANK_CHUNK_FRAMES", 57)
    monkeypatch.setattr(_common, "ATTENTION_BLOCK_VALUES", 2 * 500)
    counted = []
    pieces = [F.wavlm_frames(wave, wavlm, 1024, lambda d, t: counted.append(t)),
              F.beats_frames(wave, beats, 1024, lambda d, t: counted.append(t)),
              F.wav2vec2_frames(wave, wav2vec2, lambda d, t: counted.append(t))]
    assert max(counted) > 500  # the small pieces were really used
    for name, a, b in zip(("wavlm", "beats", "wav2vec2"), whole, pieces):
        torch.testing.assert_close(b, a, **AUDIO_TOLERANCE, msg=lambda m: f"{name}: {m}")
        assert float((a - b).abs().max()) < 1e-5, name


class Cancelled(Exception):
    pass


@pytest.mark.parametrize("encoder", ["wavlm", "beats", "wav2vec2"])
def test_each_encoder_stops_within_a_second_of_a_cancel_on_a_10_minute_clip(encoders, encoder):
    """Cancel pressed 0.3 s and 1.5 s into each encoder's work on a 10-minute clip: the next report
    raises, and the encoder has stopped less than a second after the press (it needs minutes for the
    whole clip)."""
    wavlm, beats, wav2vec2 = encoders
    wave = _noise(600.0)
    run = {"wavlm": lambda p: F.wavlm_frames(wave, wavlm, F.DEFAULT_ATTENTION_CHUNK, p),
           "beats": lambda p: F.beats_frames(wave, beats, F.DEFAULT_ATTENTION_CHUNK, p),
           "wav2vec2": lambda p: F.wav2vec2_frames(wave, wav2vec2, p)}[encoder]
    for delay in (0.3, 1.5):
        pressed = threading.Event()
        outcome = {}

        def progress(done, total):
            if pressed.is_set():
                raise Cancelled

        def work():
            try:
                run(progress)
            except Cancelled:
                outcome["stopped"] = time.perf_counter()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        time.sleep(delay)
        t_press = time.perf_counter()
        pressed.set()
        thread.join(timeout=10)
        assert not thread.is_alive() and "stopped" in outcome, f"{encoder}: did not stop after a cancel at {delay} s"
        latency = outcome["stopped"] - t_press
        assert latency < 1.0, f"{encoder}: cancel at {delay} s took {latency:.2f} s to land"
