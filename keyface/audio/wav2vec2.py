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
from torch.nn import functional as F

from ..checkpoints import CheckpointError
from ._common import (
    WorkCounter,
    as_batch,
    build_from_config,
    conv_output_length,
    conv_units,
    hf_encoder_keys,
    load_strict,
    module_device_dtype,
    read_encoder_file,
    run_conv_layers,
)


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

    def forward(self, waveform: torch.Tensor, progress=None) -> torch.Tensor:
        """``progress(done, total)`` after each unit of work (a conv layer, a block of attention query
        rows, the rest of a layer); an exception it raises stops the call there (cancel). With the
        default "sdpa" attention the layers are run step by step (with or without ``progress``): the
        calls ``Wav2Vec2Model.forward`` makes (no mask, eval), the feature extractor in time chunks
        (``keyface.audio._common.run_conv_layers``) and each attention in blocks of
        :data:`SDPA_BLOCK_ROWS` query rows (the same numbers as one call)."""
        device, dtype = module_device_dtype(self)
        x = as_batch(waveform).to(device=device, dtype=dtype)
        if self.model.config.add_adapter or self.model.config._attn_implementation != "sdpa":
            return self.model(x).last_hidden_state
        return self._forward_in_blocks(x, WorkCounter(progress))

    def _forward_in_blocks(self, x, counter: WorkCounter):
        m = self.model
        enc = m.encoder
        tokens = conv_output_length(x.shape[-1], m.config.conv_kernel, m.config.conv_stride)
        counter.expect(conv_units(x.shape[-1], m.feature_extractor.conv_layers) + len(enc.layers) * (len(sdpa_blocks(tokens)) + 1))
        h, _ = m.feature_projection(run_conv_layers(m.feature_extractor.conv_layers, x, counter).transpose(1, 2))
        h = h + enc.pos_conv_embed(h)
        stable = bool(m.config.do_stable_layer_norm)
        if not stable:
            h = enc.layer_norm(h)
        for layer in enc.layers:
            if stable:  # Wav2Vec2EncoderLayerStableLayerNorm
                h = h + _attention_in_blocks(layer.attention, layer.layer_norm(h), counter)
                h = h + layer.feed_forward(layer.final_layer_norm(h))
            else:  # Wav2Vec2EncoderLayer
                h = layer.layer_norm(h + _attention_in_blocks(layer.attention, h, counter))
                h = layer.final_layer_norm(h + layer.feed_forward(h))
            counter.tick()
        return enc.layer_norm(h) if stable else h


# Query rows per SDPA call when wav2vec2's attention is split for progress/cancel checks. torch's CPU
# flash kernel tiles the queries by 256 rows once a call has 768 or more, so blocks of at least 768
# rows (the last one 768..1535) keep every row's arithmetic as in one call over the whole clip.
SDPA_BLOCK_ROWS = 768


def sdpa_blocks(tokens: int) -> list[tuple[int, int]]:
    """(start, end) query rows of each SDPA call: SDPA_BLOCK_ROWS each, the remainder joined to the last."""
    starts = list(range(0, max(int(tokens), 1), SDPA_BLOCK_ROWS))
    if len(starts) > 1 and tokens - starts[-1] < SDPA_BLOCK_ROWS:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else max(int(tokens), 1)) for i, s in enumerate(starts)]


def _attention_in_blocks(attn, h, counter: WorkCounter):
    """``Wav2Vec2Attention`` with "sdpa" (no mask, eval), one SDPA call per block of query rows."""
    b, t, _ = h.shape
    q = attn.q_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)
    outs = []
    for q0, q1 in sdpa_blocks(t):
        outs.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k, v, dropout_p=0.0, scale=attn.scaling))
        counter.tick()
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return attn.out_proj(o.transpose(1, 2).reshape(b, t, -1))


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
