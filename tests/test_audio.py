"""Audio encoders and the per-video-frame feature pipeline (keyface.audio).

Tiny random encoders come from the parity fixtures (wavlm.pt, beats.pt, wav2vec2/); numerics against
the original are in test_parity.py (kinds wavlm, beats, wav2vec2, audio_features). These tests cover
the loaders' other layouts, input handling and the frame count contract.
"""

import json
import math
import shutil
import wave
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from keyface.audio import (
    AudioInputError,
    compute_features,
    load_beats,
    load_wav2vec2,
    load_wavlm,
    prepare_waveform,
)
from keyface.planner import video_frame_count
from keyface.checkpoints import CheckpointError, convert_to_safetensors

PARITY = Path(__file__).parent / "fixtures" / "parity"
SPEECH = Path(__file__).parent / "fixtures" / "media" / "speech_female_arctic_a0009.wav"


@pytest.fixture(scope="module")
def encoders():
    return load_wavlm(PARITY / "wavlm.pt"), load_beats(PARITY / "beats.pt"), load_wav2vec2(PARITY / "wav2vec2")


def _speechlike(seconds, sr, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * sr))
    t = torch.arange(n) / sr
    base = 0.3 * torch.sin(2 * math.pi * 220 * t) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    return torch.stack([base + 0.05 * torch.randn(n, generator=g) for _ in range(channels)])


def _read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        raw = w.readframes(w.getnframes())
        sr, ch = w.getframerate(), w.getnchannels()
    pcm = torch.frombuffer(bytearray(raw), dtype=torch.int16)
    return pcm.reshape(-1, ch).T.contiguous(), sr  # int16 [C, S]


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------


def test_wavlm_hf_folder_matches_unilm_pickle(tmp_path, encoders):
    wavlm = encoders[0]
    x = _speechlike(0.7, 16000)
    with torch.no_grad():
        ref = wavlm(x)
    folder = tmp_path / "wavlm_hf"
    wavlm.model.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    with torch.no_grad():
        from_folder = load_wavlm(folder)(x)
        from_file = load_wavlm(folder / "model.safetensors")(x)  # single safetensors, config.json beside it
    torch.testing.assert_close(from_folder, ref, rtol=0, atol=0)
    torch.testing.assert_close(from_file, ref, rtol=0, atol=0)


def test_wavlm_hub_layout_weight_g_v_and_prefix(tmp_path, encoders):
    """Hub-style file: ``wavlm.`` prefix, a task head, weight_g / weight_v pos-conv keys."""
    wavlm = encoders[0]
    x = _speechlike(0.5, 16000, seed=1)
    with torch.no_grad():
        ref = wavlm(x)
    sd = {}
    for k, v in wavlm.model.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        sd["wavlm." + k] = v.clone()
    sd["lm_head.weight"] = torch.zeros(5, wavlm.hidden_size)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(wavlm.model.config.to_dict()))
    with torch.no_grad():
        torch.testing.assert_close(load_wavlm(folder)(x), ref, rtol=0, atol=0)


def test_wavlm_converted_safetensors_matches_pickle(tmp_path, encoders):
    wavlm = encoders[0]
    dst = convert_to_safetensors(PARITY / "wavlm.pt", tmp_path / "wavlm.safetensors")
    x = _speechlike(0.5, 16000, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(load_wavlm(dst)(x), wavlm(x), rtol=0, atol=0)


def test_beats_converted_safetensors_matches_pickle(tmp_path, encoders):
    beats = encoders[1]
    dst = convert_to_safetensors(PARITY / "beats.pt", tmp_path / "beats.safetensors")
    x = _speechlike(0.5, 16000, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_beats(dst)(x), beats(x), rtol=0, atol=0)


def test_unknown_keys_are_refused(tmp_path):
    for name, loader in (("wavlm.pt", load_wavlm), ("beats.pt", load_beats)):
        ckpt = torch.load(PARITY / name, weights_only=True)
        ckpt["model"]["some_head.weight"] = torch.zeros(3)
        path = tmp_path / name
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match="some_head.weight"):
            loader(path)


def test_wrong_encoder_file_is_named():
    with pytest.raises(CheckpointError, match="BEATs checkpoint"):
        load_wavlm(PARITY / "beats.pt")
    with pytest.raises(CheckpointError, match="not a BEATs checkpoint"):
        load_beats(PARITY / "wavlm.pt")
    with pytest.raises(CheckpointError, match="unilm"):
        load_wav2vec2(PARITY / "wavlm.pt")


def test_wav2vec2_single_file_with_config(tmp_path, encoders):
    w2v = encoders[2]
    shutil.copy(PARITY / "wav2vec2" / "model.safetensors", tmp_path / "w2v.safetensors")
    config = json.loads((PARITY / "wav2vec2" / "config.json").read_text())
    x = _speechlike(0.5, 16000, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(load_wav2vec2(tmp_path / "w2v.safetensors", config=config)(x), w2v(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="config.json"):
        load_wav2vec2(tmp_path / "w2v.safetensors")


def test_beats_attention_chunks_same_function(encoders):
    beats = encoders[1]
    x = _speechlike(2.0, 16000, seed=5)
    with torch.no_grad():
        full = beats(x)
        chunked = beats(x, attention_chunk=7)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


class _Spy(torch.nn.Module):
    """An encoder that records the attention_chunk each call receives."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, attention_chunk=None, progress=None):
        self.calls.append(attention_chunk)
        return self.inner(x, attention_chunk=attention_chunk, progress=progress)


def test_attention_chunk_is_passed_to_each_call(encoders):
    """compute_features hands the chunk size to the encoder calls instead of setting it on modules
    that other threads may be using."""
    wavlm, beats = _Spy(encoders[0]), _Spy(encoders[1])
    x = _speechlike(1.0, 16000, seed=8)
    chunked = compute_features(x, 16000, wavlm, beats, encoders[2], attention_chunk=7)
    whole = compute_features(x, 16000, wavlm, beats, encoders[2], attention_chunk=None)
    assert wavlm.calls == beats.calls == [7, None]
    assert not hasattr(encoders[0], "attention_chunk") and not hasattr(encoders[1], "attention_chunk")
    torch.testing.assert_close(chunked.keyframe, whole.keyframe, rtol=1e-5, atol=1e-5)


def test_beats_ignores_unknown_cfg_keys_with_a_warning(tmp_path, encoders, caplog):
    ckpt = torch.load(PARITY / "beats.pt", weights_only=True)
    ckpt["cfg"]["some_future_setting"] = 3  # the original BEATsConfig accepts any key
    path = tmp_path / "beats.pt"
    torch.save(ckpt, path)
    with caplog.at_level("WARNING", logger="keyface.audio.beats"):
        beats = load_beats(path)
    assert any("some_future_setting" in r.getMessage() for r in caplog.records)
    x = _speechlike(1.0, 16000, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(beats(x), encoders[1](x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------


def test_stereo_44k1_is_downmixed_and_resampled(encoders):
    seconds = 1.96
    stereo = _speechlike(seconds, 44100, channels=2)
    mono16 = prepare_waveform(stereo, 44100)
    assert mono16.dtype == torch.float32 and mono16.dim() == 1
    assert mono16.shape[0] == 31360  # 1.96 s at 16 kHz
    from torchaudio.functional import resample

    torch.testing.assert_close(mono16, resample(stereo.mean(0), 44100, 16000))
    # ComfyUI AUDIO layout [1, C, S] gives the same
    torch.testing.assert_close(prepare_waveform(stereo[None], 44100), mono16)
    feats = compute_features(stereo[None], 44100, *encoders)
    n = round(seconds * 25)
    assert feats.num_frames == n == math.ceil(mono16.shape[0] / 640)
    assert feats.keyframe.shape == (n, 2, 64) and feats.interpolation.shape == (n, 2, 64)
    assert torch.isfinite(feats.keyframe).all() and torch.isfinite(feats.interpolation).all()


def test_many_channels_are_averaged():
    x = _speechlike(0.1, 16000, channels=6)
    torch.testing.assert_close(prepare_waveform(x, 16000), x.mean(0))


def test_int16_pcm_is_scaled():
    pcm, sr = _read_wav(SPEECH)
    x = prepare_waveform(pcm, sr)
    torch.testing.assert_close(x, pcm[0].float() / 32768.0)


@pytest.mark.parametrize(
    "waveform,sample_rate,message",
    [
        (torch.zeros(0), 16000, "empty"),
        (torch.zeros(2, 0), 16000, "empty"),
        (torch.full((319,), 0.1), 16000, "rounds to 0 video frames"),  # 19.9 ms
        (torch.full((2, 870), 0.1), 44100, "too short"),  # 316 samples after resampling
        (torch.zeros(16000), 16000, "silent"),
        (torch.full((2, 16000), 1e-6), 16000, "silent"),
        (torch.tensor([0.1] * 1000 + [float("nan")]), 16000, "NaN"),
        (torch.tensor([0.1] * 1000 + [float("inf")]), 16000, "infinite"),
        (torch.zeros(1, 1, 1, 1000), 16000, "expected a waveform"),
        (torch.full((2, 2, 1000), 0.1), 16000, "batch of 2"),
        (torch.full((1000,), 0.1), 0, "sample_rate"),
        (torch.full((48000, 2), 0.1), 48000, r"expected \[channels, samples\], got \[samples, channels\]\?"),
        (torch.full((1, 16000, 1), 0.1), 16000, r"got \[samples, channels\]\?"),
    ],
)
def test_audio_input_errors(waveform, sample_rate, message):
    with pytest.raises(AudioInputError, match=message):
        prepare_waveform(waveform, sample_rate)
    assert issubclass(AudioInputError, ValueError)


@pytest.mark.parametrize("num_samples,rate", [(640, 16000), (384, 16000), (320, 16000), (1059, 44100)])
def test_one_frame_is_enough(encoders, num_samples, rate):
    """Any clip that rounds to one frame (20 ms to 60 ms; issue 9 item 8: 24 ms used to be refused as
    too short although the contract N = round(S / r x 25) says 1 frame) gives one row of features."""
    x = _speechlike(num_samples / rate, rate)
    assert video_frame_count(num_samples, rate) == 1
    feats = compute_features(x, rate, *encoders)
    assert feats.num_frames == 1 and feats.keyframe.shape[0] == 1 and feats.interpolation.shape[0] == 1
    assert torch.isfinite(feats.keyframe).all() and torch.isfinite(feats.interpolation).all()


@pytest.mark.parametrize("num_samples", [641, 1280, 1919, 3841, 5120, 8109, 9907])
def test_frame_count_contract(encoders, num_samples):
    x = _speechlike(num_samples / 16000, 16000, seed=num_samples)
    reference = compute_features(x, 16000, *encoders, trim_to_duration=False)
    f = math.ceil(num_samples / 640)  # the original's frame count
    assert reference.num_frames == f
    assert reference.keyframe.shape[0] == f and reference.interpolation.shape[0] == f
    assert reference.wavlm.shape[0] == reference.beats.shape[0] == f + (f % 2)
    assert reference.wav2vec2.shape[0] == f
    # The default is the video length closest to the audio's: round(seconds * 25), half up.
    feats = compute_features(x, 16000, *encoders)
    n = int(num_samples * 25 / 16000 + 0.5)
    assert feats.num_frames == n == video_frame_count(num_samples) and n in (f - 1, f)
    assert feats.keyframe.shape[0] == n and feats.interpolation.shape[0] == n
    torch.testing.assert_close(feats.keyframe, reference.keyframe[:n])
    torch.testing.assert_close(feats.interpolation, reference.interpolation[:n])


def test_video_frame_count_is_round_half_up():
    assert [video_frame_count(s) for s in (0, 319, 320, 639, 640, 959, 960, 49520)] == [0, 0, 1, 1, 1, 1, 2, 77]
    assert video_frame_count(44100 * 3, 44100) == 75 and video_frame_count(882, 44100) == 1


def test_max_frames_crop(encoders):
    x = _speechlike(1.0, 16000)
    feats = compute_features(x, 16000, *encoders, max_frames=10)
    assert feats.keyframe.shape[0] == 10 and feats.interpolation.shape[0] == 10 and feats.num_frames == 10
    full = compute_features(x, 16000, *encoders)
    torch.testing.assert_close(feats.keyframe, full.keyframe[:10])


def test_real_speech_file(encoders):
    pcm, sr = _read_wav(SPEECH)
    num_samples = pcm.shape[-1]
    feats = compute_features(pcm, sr, *encoders)
    n = round(num_samples / sr * 25)  # 3.095 s -> 77 frames (the original renders ceil = 78)
    assert feats.num_frames == n == 77
    assert feats.keyframe.shape == (n, 2, 64) and feats.interpolation.shape == (n, 2, 64)
    assert torch.isfinite(feats.keyframe).all() and torch.isfinite(feats.interpolation).all()
    # WavLM sub-frame 0 of frame 0 and sub-frame 1 of frame 0 both carry feature 0 (legacy nearest delay)
    torch.testing.assert_close(feats.wavlm[0, 0], feats.wavlm[0, 1])


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_wavlm_attention_chunks_same_function(tmp_path, layer_norm_first):
    ckpt = torch.load(PARITY / "wavlm.pt", weights_only=True)
    ckpt["cfg"]["layer_norm_first"] = layer_norm_first  # pre-LN (WavLM Large layout) exercises the other encoder
    path = tmp_path / "wavlm.pt"
    torch.save(ckpt, path)
    wavlm = load_wavlm(path)
    x = _speechlike(1.5, 16000, seed=6)
    with torch.no_grad():
        full = wavlm(x)
        chunked = wavlm(x, attention_chunk=9)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


def test_wavlm_without_post_extract_proj(tmp_path):
    """unilm omits post_extract_proj when conv width == model width; an identity projection is used."""
    ckpt = torch.load(PARITY / "wavlm.pt", weights_only=True)
    cfg, sd = ckpt["cfg"], ckpt["model"]
    width = cfg["encoder_embed_dim"]
    cfg["conv_feature_layers"] = f"[({width},10,5)] + [({width},3,2)] * 4 + [({width},2,2)] * 2"
    g = torch.Generator().manual_seed(0)
    for k in list(sd):
        if k.startswith("feature_extractor.conv_layers.") or k.startswith("layer_norm."):
            shape = list(sd[k].shape)
            shape = [width if s == 24 else s for s in shape]
            sd[k] = torch.randn(shape, generator=g) * 0.3
        if k.startswith("post_extract_proj."):
            del sd[k]
    path = tmp_path / "wavlm_noproj.pt"
    torch.save(ckpt, path)
    wavlm = load_wavlm(path)
    proj = wavlm.model.feature_projection.projection
    assert torch.equal(proj.weight, torch.eye(width)) and not proj.bias.any()
    with torch.no_grad():
        assert wavlm(_speechlike(0.3, 16000)).shape[-1] == width
