"""Audio encoders (WavLM Base+, BEATs, wav2vec2) and the per-video-frame feature pipeline.

Public names (ARCHITECTURE.md): ``load_wavlm``, ``load_beats``, ``load_wav2vec2``,
``compute_features`` -> ``AudioFeatures``, ``prepare_waveform``, ``AudioInputError``. Submodules
import torch / transformers; they are imported on first use of a name here, so importing this
package stays cheap.
"""

_NAMES = {
    "load_wavlm": "wavlm",
    "WavLMEncoder": "wavlm",
    "load_beats": "beats",
    "BEATs": "beats",
    "BEATsConfig": "beats",
    "load_wav2vec2": "wav2vec2",
    "Wav2Vec2Encoder": "wav2vec2",
    "normalize_waveform": "wav2vec2",
    "AudioFeatures": "features",
    "AudioInputError": "features",
    "compute_features": "features",
    "prepare_waveform": "features",
    "wavlm_frames": "features",
    "beats_frames": "features",
    "wav2vec2_frames": "features",
    "SAMPLES_PER_FRAME": "features",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        import importlib

        module = importlib.import_module(f".{_NAMES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
