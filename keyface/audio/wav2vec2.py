"""wav2vec2 (``facebook/wav2vec2-base-960h`` in the release) through ``transformers.Wav2Vec2Model``.

The original loads ``Wav2Vec2ForCTC`` and runs its base model ``.wav2vec2`` on the whole clip,
normalised by hand: ``(w - mean) / sqrt(var_unbiased + 1e-7)`` (spec 2.2 / 2.5). The feature is
``last_hidden_state``; no attention mask is passed.

Loading: a Hugging Face folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) or a
single weights file with its config. Keys under ``wav2vec2.`` are the encoder; everything beside them
(``lm_head.*`` of the CTC model, or other task heads) is ignored, because the features are taken
before any head. The positional convolution's weight norm is accepted in both layouts (``weight_g`` /
``weight_v`` as on the hub, or ``parametrizations.weight.original0/1``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import CheckpointError
from ._common import as_batch, build_from_config, hf_encoder_keys, load_strict, module_device_dtype, read_encoder_file


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Whole-clip normalisation of ``get_audio_embeddings.py``: ``(w - mean) / sqrt(var_unbiased + 1e-7)``.

    Computed in float32 over the last axis (the whole clip); ``[S]`` or ``[B, S]``.
    """
    w = waveform.to(torch.float32)
    return (w - w.mean(dim=-1, keepdim=True)) / torch.sqrt(w.var(dim=-1, keepdim=True, unbiased=True) + 1e-7)


class Wav2Vec2Encoder(nn.Module):
    """``forward(normalised waveform [S] or [B, S]) -> last_hidden_state [B, L, hidden]``.

    The caller normalises (:func:`normalize_waveform`) before any zero padding, as the original does.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        device, dtype = module_device_dtype(self)
        x = as_batch(waveform).to(device=device, dtype=dtype)
        return self.model(x).last_hidden_state


def load_wav2vec2(path, config=None, dtype=None, device=None, attn_implementation="sdpa") -> Wav2Vec2Encoder:
    """Load the wav2vec2 encoder from a Hugging Face folder or a weights file (+ config).

    ``attn_implementation``: "sdpa" (default; exact attention without storing the L x L matrix on
    backends with a fused kernel) or "eager" (the original's attention arithmetic).
    """
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    f = read_encoder_file(path, config=config, what="wav2vec2")
    if f["kind"] != "hf":
        raise CheckpointError(f"{path}: expected a Hugging Face wav2vec2 folder or weights file, found a unilm checkpoint")
    cfg = dict(f["cfg"])
    if cfg.get("model_type", "wav2vec2") != "wav2vec2":
        raise CheckpointError(f"{path}: config.json describes a {cfg.get('model_type')!r} model, not wav2vec2")
    def build(cfg):
        hf_config = Wav2Vec2Config.from_dict(cfg)
        for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "layerdrop",
                     "final_dropout"):
            setattr(hf_config, name, 0.0)
        hf_config._attn_implementation = attn_implementation
        return Wav2Vec2Model(hf_config)

    model = build_from_config(build, cfg, f["source"], "wav2vec2")
    sd = hf_encoder_keys(f["model"], f["source"], model.state_dict().keys(), prefix="wav2vec2.", what="wav2vec2")
    load_strict(model, sd, f["source"], "wav2vec2")
    enc = Wav2Vec2Encoder(model).eval().requires_grad_(False)
    return enc.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else enc
