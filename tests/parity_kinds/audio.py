"""Parity runners for the audio kinds: ``wavlm``, ``beats``, ``wav2vec2``, ``audio_features``.

Everything comes from the case: the model files through the library loaders (which read each
file's own cfg / config.json; the case's ``config`` holds copies of those), the inputs from the
case's inputs file. Sizes are never assumed.
"""

from keyface.audio.beats import load_beats
from keyface.audio.features import beats_frames, compute_features, prepare_waveform, wav2vec2_frames, wavlm_frames
from keyface.audio.wav2vec2 import load_wav2vec2, normalize_waveform
from keyface.audio.wavlm import load_wavlm

from . import case_file, case_inputs, register


def _waveform(case, folder):
    return case_inputs(case, folder)["waveform"]


@register("wavlm")
def run_wavlm(case, folder):
    model = load_wavlm(case_file(case, folder, "checkpoint"))
    return {"features": model(_waveform(case, folder)[None])}


@register("beats")
def run_beats(case, folder):
    model = load_beats(case_file(case, folder, "checkpoint"))
    wave = _waveform(case, folder)[None]
    fbank = model.fbank(wave)
    return {"fbank": fbank[0], "features": model.forward_fbank(fbank)}


@register("wav2vec2")
def run_wav2vec2(case, folder):
    model = load_wav2vec2(case_file(case, folder, "checkpoint"))
    normalized = normalize_waveform(_waveform(case, folder)[None])
    return {"normalized": normalized, "last_hidden_state": model(normalized)}


@register("audio_features")
def run_audio_features(case, folder):
    cfg = case["config"]
    wavlm = load_wavlm(case_file(case, folder, "wavlm"))
    beats = load_beats(case_file(case, folder, "beats"))
    w2v = load_wav2vec2(case_file(case, folder, "wav2vec2"))
    wave = _waveform(case, folder)
    assert cfg.get("samples_per_frame", 640) == 640 and cfg.get("fps", 25) == 25
    feats = compute_features(wave, cfg.get("sample_rate", 16000), wavlm, beats, w2v, max_frames=cfg.get("max_frames"),
                             trim_to_duration=False)
    assert feats.num_frames == cfg.get("num_frames", feats.num_frames)
    prepared = prepare_waveform(wave, cfg.get("sample_rate", 16000))
    return {
        "keyframe_audio": feats.keyframe,
        "interpolation_audio": feats.interpolation,
        "wavlm_emb": wavlm_frames(prepared, wavlm),
        "beats_emb": beats_frames(prepared, beats),
        "wav2vec2_emb": wav2vec2_frames(prepared, w2v),
    }
