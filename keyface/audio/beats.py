"""BEATs (``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt`` in the release), in plain PyTorch.

There is no transformers class for BEATs; this is an implementation written from the description in
spec 2.4. Module names follow the unilm checkpoint keys, so the original ``{"cfg", "model"}`` file
loads key for key. Forward, as used by KeyFace (``extract_features``, no predictor):

1. Kaldi fbank of ``waveform * 2**15`` (128 mel bins, 25 ms / 10 ms, torchaudio defaults), normalised
   ``(fb - 15.41663) / (2 * 6.55582)``;
2. Conv2d patch embedding (16 x 16, no bias) -> tokens flattened **time-major** (token = t * 8 + f);
3. LayerNorm -> Linear -> + GELU(SamePad(weight-normed grouped Conv1d)) -> LayerNorm;
4. post-LN DeepNorm layers (residual x * (2 L)^(1/4)) whose attention adds a relative-position
   bias: one bucket table (owned by layer 0, shared by all layers) gated per layer and head by
   ``sigmoid`` of ``grep_linear`` on the **projected** query (with its bias).

Keys without a use here (documented): ``predictor.*`` (the AudioSet classifier of the fine-tuned
model; KeyFace uses the embeddings) and ``encoder.layers.{i>0}.self_attn.relative_attention_bias``
(the same tensor as layer 0's in the original module, where it is shared; reading it in layer order
as ``load_state_dict`` does, the last copy wins, which is what is kept here).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import CheckpointError, KeyLedger
from ..ops import resolve
from ._common import (
    WorkCounter,
    as_batch,
    attention_block_rows,
    attention_units,
    build_from_config,
    spans,
    load_strict,
    module_device_dtype,
    read_encoder_file,
    torchaudio_part,
)

log = logging.getLogger(__name__)

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
FBANK_BINS = 128
FBANK_WINDOW = 400  # samples: 25 ms at 16 kHz
FBANK_SHIFT = 160  # samples: 10 ms
FBANK_CHUNK_FRAMES = 1 << 13  # frames per fbank call (82 s of audio; a unit of work)


@dataclass
class BEATsConfig:
    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True
    predictor_class: int = 527

    # training-only settings of the unilm cfg, accepted and unused at inference
    _INERT = ("layer_wise_gradient_decay_ratio", "dropout", "attention_dropout", "activation_dropout",
              "encoder_layerdrop", "dropout_input", "predictor_dropout")

    @classmethod
    def from_cfg(cls, cfg: dict) -> "BEATsConfig":
        """Read a unilm ``cfg``. Like the original ``BEATsConfig``, which takes any key, settings this
        implementation does not know are ignored (with a logged warning naming them): the modules
        KeyFace builds read only the fields above, so they cannot change the architecture."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in cfg if k not in known and k not in cls._INERT)
        if unknown:
            log.warning("BEATs cfg: ignoring setting(s) %s, which the BEATs encoder does not use", unknown)
        c = cls(**{k: v for k, v in cfg.items() if k in known})
        if c.layer_norm_first:
            raise CheckpointError("BEATs cfg: layer_norm_first=True (pre-LN) is not supported; released BEATs is post-LN")
        if c.activation_fn != "gelu":
            raise CheckpointError(f"BEATs cfg: activation_fn {c.activation_fn!r} is not supported (gelu only)")
        if c.encoder_embed_dim % c.encoder_attention_heads:
            raise CheckpointError("BEATs cfg: encoder_embed_dim must be divisible by encoder_attention_heads")
        return c


def kaldi_fbank(waveform: torch.Tensor, counter: WorkCounter | None = None) -> torch.Tensor:
    """Normalised BEATs input features: ``[B, S]`` float waveform in [-1, 1] -> ``[B, Tf, 128]`` float32.

    Computed :data:`FBANK_CHUNK_FRAMES` frames at a time (one unit of work of ``counter`` each): every
    Kaldi fbank step (DC offset, pre-emphasis, window, FFT, mel) works on one 25 ms frame, so each
    chunk, read with the samples its frames cover, gives the frames of one call over the clip."""
    kaldi = torchaudio_part("compliance.kaldi")  # imported here so `import keyface` stays light

    out = []
    for w in as_batch(waveform).to(torch.float32):
        scaled = w[None] * 2 ** 15
        parts = []
        for f0, f1 in fbank_chunks(w.shape[-1]):
            parts.append(kaldi.fbank(scaled[:, f0 * FBANK_SHIFT:(f1 - 1) * FBANK_SHIFT + FBANK_WINDOW],
                                     num_mel_bins=FBANK_BINS, sample_frequency=16000, frame_length=25, frame_shift=10))
            if counter is not None:
                counter.tick()
        out.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
    return (torch.stack(out) - FBANK_MEAN) / (2 * FBANK_STD)


def fbank_chunks(num_samples: int) -> list[tuple[int, int]]:
    """(first, end) fbank frames of each chunk of a clip of ``num_samples`` (edges snipped, as Kaldi)."""
    return spans(max(1, (int(num_samples) - FBANK_WINDOW) // FBANK_SHIFT + 1), FBANK_CHUNK_FRAMES)


def _relative_buckets(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style bucket of ``rel = key_pos - query_pos``."""
    half = num_buckets // 2
    buckets = (rel > 0).to(torch.long) * half
    dist = rel.abs()
    max_exact = half // 2
    # log-spaced buckets beyond max_exact (dist < max_exact uses the exact distance; the log of 0 there is discarded)
    large = max_exact + (torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight norm over all axes but the kernel axis (``dim=2``); keys weight_g / weight_v / bias."""

    def __init__(self, channels, kernel, groups, dtype=None, device=None):
        super().__init__()
        self.padding = kernel // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel, dtype=dtype, device=device))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(channels, dtype=dtype, device=device))

    def forward(self, x):
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        return F.conv1d(x, weight.to(x.dtype), self.bias.to(x.dtype), padding=self.padding, groups=self.groups)


class _PosConv(nn.Module):
    def __init__(self, cfg: BEATsConfig, dtype=None, device=None):
        super().__init__()
        # registered under "0" so the keys read encoder.pos_conv.0.* as in the checkpoint
        self.add_module("0", _WeightNormConv1d(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups, dtype, device))
        self.trim = 1 if cfg.conv_pos % 2 == 0 else 0  # SamePad

    def forward(self, x):  # x [B, C, T]
        y = getattr(self, "0")(x)
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_bias_table: bool, ops, dtype=None, device=None):
        super().__init__()
        d, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = h
        self.head_dim = d // h
        self.scaling = self.head_dim ** -0.5
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.gru_rel_pos = cfg.gru_rel_pos
        kw = dict(dtype=dtype, device=device)
        self.q_proj = ops.Linear(d, d, bias=True, **kw)
        self.k_proj = ops.Linear(d, d, bias=True, **kw)
        self.v_proj = ops.Linear(d, d, bias=True, **kw)
        self.out_proj = ops.Linear(d, d, bias=True, **kw)
        if cfg.gru_rel_pos:
            self.grep_linear = ops.Linear(self.head_dim, 8, bias=True, **kw)
            self.grep_a = nn.Parameter(torch.empty(1, h, 1, 1, **kw))
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, h, **kw)

    def bias_rows(self, table: nn.Embedding, q0: int, q1: int, length: int, device) -> torch.Tensor:
        """Relative-position bias for query rows q0:q1 -> [H, q1-q0, length]."""
        qpos = torch.arange(q0, q1, device=device)[:, None]
        kpos = torch.arange(length, device=device)[None, :]
        idx = _relative_buckets(kpos - qpos, self.num_buckets, self.max_distance).to(table.weight.device)
        return table(idx).permute(2, 0, 1)

    def forward(self, x, table, chunk=None, counter: WorkCounter | None = None):
        """x [B, T, C]; ``table`` the shared bias embedding (or None); ``chunk`` query rows per block
        (one unit of work of ``counter`` each)."""
        b, t, c = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, hd).transpose(1, 2)  # [B, H, T, hd], projected incl. bias
        k = self.k_proj(x).view(b, t, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, hd).transpose(1, 2)
        gate = None
        if table is not None and self.gru_rel_pos:
            g = self.grep_linear(q).view(b, h, t, 2, 4).sum(-1)
            ga, gb = torch.sigmoid(g).chunk(2, dim=-1)  # [B, H, T, 1] each
            gate = ga * (gb * self.grep_a - 1.0) + 2.0
        # the reference scales q by 1/(sqrt(d) * 32), subtracts the row max and multiplies by 32
        # before adding the bias: softmax-equivalent; the same arithmetic is kept here
        alpha = 32.0
        qs = q * (self.scaling / alpha)
        outs = []
        for q0, q1 in spans(t, chunk or t):
            s = torch.matmul(qs[:, :, q0:q1], k.transpose(-1, -2))
            s = (s - s.amax(dim=-1, keepdim=True)) * alpha
            if table is not None:
                bias = self.bias_rows(table, q0, q1, t, x.device).to(s.dtype)[None]
                if gate is not None:
                    bias = gate[:, :, q0:q1] * bias
                s = s + bias
            p = torch.softmax(s.float(), dim=-1).to(v.dtype)
            outs.append(torch.matmul(p, v))
            if counter is not None:
                counter.tick()
        o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.out_proj(o.transpose(1, 2).reshape(b, t, c))


class _Layer(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_bias_table: bool, ops, dtype=None, device=None):
        super().__init__()
        d = cfg.encoder_embed_dim
        kw = dict(dtype=dtype, device=device)
        self.self_attn = _SelfAttention(cfg, has_bias_table, ops, **kw)
        self.self_attn_layer_norm = ops.LayerNorm(d, **kw)
        self.fc1 = ops.Linear(d, cfg.encoder_ffn_embed_dim, bias=True, **kw)
        self.fc2 = ops.Linear(cfg.encoder_ffn_embed_dim, d, bias=True, **kw)
        self.final_layer_norm = ops.LayerNorm(d, **kw)
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, x, table, chunk=None, counter: WorkCounter | None = None):
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, table, chunk, counter))
        y = self.fc2(F.gelu(self.fc1(x).float()).to(x.dtype))
        return self.final_layer_norm(x * self.alpha + y)


class _Encoder(nn.Module):
    def __init__(self, cfg: BEATsConfig, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.pos_conv = _PosConv(cfg, **kw)
        self.layer_norm = ops.LayerNorm(cfg.encoder_embed_dim, **kw)
        self.layers = nn.ModuleList(
            [_Layer(cfg, cfg.relative_position_embedding and i == 0, ops, **kw) for i in range(cfg.encoder_layers)]
        )

    def forward(self, x, chunk=None, counter: WorkCounter | None = None):
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)
        table = getattr(self.layers[0].self_attn, "relative_attention_bias", None) if len(self.layers) else None
        if chunk and len(self.layers):
            chunk = attention_block_rows(chunk, self.layers[0].self_attn.num_heads, x.shape[1])
        for layer in self.layers:
            x = layer(x, table, chunk, counter)
            if counter is not None:
                counter.tick()
        return x


class BEATs(nn.Module):
    """BEATs encoder. ``forward(waveform [S] or [B, S], 16 kHz in [-1, 1], attention_chunk=None)
    -> tokens [B, 8 * floor(Tf / 16), C]``.

    ``attention_chunk``: None computes each attention as one block (as the original); an int
    computes it in blocks of that many query rows, which caps the attention memory at
    ``heads * chunk * tokens`` values per layer for long clips (same function, tiny rounding
    differences). It is an argument of each call, not module state, so threads may share a module.
    """

    def __init__(self, cfg: BEATsConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve(operations)
        kw = dict(dtype=dtype, device=device)
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = ops.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias, **kw)
        self.layer_norm = ops.LayerNorm(cfg.embed_dim, **kw)
        self.post_extract_proj = (
            ops.Linear(cfg.embed_dim, cfg.encoder_embed_dim, bias=True, **kw)
            if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = _Encoder(cfg, ops, **kw)

    @property
    def hidden_size(self) -> int:
        return self.cfg.encoder_embed_dim

    def num_tokens(self, num_samples: int) -> int:
        """Tokens of a clip of ``num_samples`` (16 kHz): fbank frames (25 ms / 10 ms, edges snipped)
        cut to whole patches, times the patches across the 128 mel bins."""
        frames = max(0, (int(num_samples) - FBANK_WINDOW) // FBANK_SHIFT + 1)
        p = self.cfg.input_patch_size
        return (frames // p) * (FBANK_BINS // p)

    def fbank(self, waveform: torch.Tensor, counter: WorkCounter | None = None) -> torch.Tensor:
        return kaldi_fbank(waveform, counter)

    def forward_fbank(self, fbank: torch.Tensor, attention_chunk: int | None = None,
                      counter: WorkCounter | None = None) -> torch.Tensor:
        """Normalised fbank [B, Tf, 128] -> tokens [B, T' * F', C] (time-major)."""
        device, dtype = module_device_dtype(self)
        x = self.patch_embedding(fbank.to(device=device, dtype=dtype)[:, None])  # [B, E, T', F']
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # token = t * F' + f
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x, attention_chunk, counter)

    def forward(self, waveform: torch.Tensor, attention_chunk: int | None = None, progress=None) -> torch.Tensor:
        """``progress(done, total)`` after each unit of work (the fbank, an attention block, a layer);
        an exception it raises stops the call there (cancel)."""
        device, _ = module_device_dtype(self)
        wave = as_batch(waveform).to(device)
        counter = WorkCounter(progress)
        counter.expect(len(fbank_chunks(wave.shape[-1])) * wave.shape[0]
                       + attention_units(len(self.encoder.layers), self.cfg.encoder_attention_heads,
                                         self.num_tokens(wave.shape[-1]), attention_chunk))
        fbank = self.fbank(wave, counter)
        return self.forward_fbank(fbank, attention_chunk, counter)


def convert_state_dict(sd: dict, cfg: BEATsConfig, source="BEATs checkpoint") -> dict:
    """Account for every key of a unilm BEATs state dict; return the keys of :class:`BEATs`."""
    ledger = KeyLedger(sd, source)
    out = {}
    table_key = "self_attn.relative_attention_bias.weight"
    for i in range(cfg.encoder_layers):
        t = ledger.take_key(f"encoder.layers.{i}.{table_key}")
        if t is not None:
            # shared module in the original: load_state_dict copies each layer's entry into the same
            # tensor in layer order, so the last one present is the value that is used
            out[f"encoder.layers.0.{table_key}"] = t
    ledger.ignore("predictor.", "AudioSet classification head of the fine-tuned model; KeyFace uses the embeddings")
    out.update(ledger.take(""))  # everything else maps 1:1 (names mirror the checkpoint); checked strictly by the caller
    ledger.finish()
    return out


def load_beats(path, dtype=None, device=None, operations=None) -> BEATs:
    """Load BEATs from the unilm pickle ``{"cfg", "model"}`` (or its KeyFace safetensors conversion)."""
    f = read_encoder_file(path, what="BEATs")
    if f["kind"] != "unilm":
        raise CheckpointError(f"{path}: expected the unilm BEATs checkpoint ({{'cfg', 'model'}}), not a Hugging Face layout")
    if "conv_feature_layers" in f["cfg"] or "patch_embedding.weight" not in f["model"]:
        raise CheckpointError(f"{path}: this is not a BEATs checkpoint (no patch_embedding; a WavLM file?); use load_wavlm for WavLM")
    cfg = BEATsConfig.from_cfg(f["cfg"])
    model = build_from_config(lambda c: BEATs(c, dtype=torch.float32, operations=operations), cfg, f["source"], "BEATs",
                              config_name="checkpoint's cfg")
    load_strict(model, convert_state_dict(f["model"], cfg, f["source"]), f["source"], "BEATs")
    model = model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
