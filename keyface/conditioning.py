"""Conditioning: what the original ``GeneralConditioner`` emits for both engines (spec 2.6, 3, 4.2).

Outputs are plain dicts ``{"concat": ..., "crossattn": ..., "vector": ...}`` (``vector`` only for the
keyframe engine). Latents come in *scaled* (VAE latent x 0.18215, as samplers and the stored identity
latents are) and leave the conditioner *unscaled* (÷ 0.18215), as in the original.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .latents import LATENT_SCALE
from .ops import resolve

SCALE_FACTOR = LATENT_SCALE
EMOTION_DIM = 256


class AudioProjection(nn.Module):
    """``WhisperAudioEmbedder``: mean over the 2 sub-frames, then Linear(feature_dim -> context_dim).

    Input [B, 14, 2, F] (per video frame, two 20 ms sub-frames) -> tokens [B, 14, context_dim].
    State-dict keys: ``linear.weight``, ``linear.bias``.
    """

    def __init__(self, feature_dim: int = 1536, context_dim: int = 1024, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve(operations)
        self.feature_dim = feature_dim
        self.linear = ops.Linear(feature_dim, context_dim, bias=True, dtype=dtype, device=device)
        #: dtype the features are projected in; None -> the weights' dtype. Hosts that store weights in
        #: a dtype the device cannot compute in (ComfyUI manual cast: fp8, bf16 on a CPU) set it with
        #: :meth:`set_compute_dtype` (usually through the engine's own).
        self.compute_dtype = None

    def set_compute_dtype(self, dtype):
        """Project in ``dtype`` (None: the weights' dtype), whatever dtype the weights are stored in."""
        self.compute_dtype = dtype
        return self

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 4 or audio.shape[-1] != self.feature_dim:
            raise ValueError(
                f"audio features: expected [B, frames, 2, {self.feature_dim}], got {tuple(audio.shape)}"
            )
        return self.linear(audio.mean(dim=2))


def emotion_embedding(values: torch.Tensor, dim: int = EMOTION_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of valence or arousal values: [..] -> [n, dim], ordered [cos | sin].

    freqs_i = exp(-ln(max_period) * i / half), i = 0..half-1 (``ConcatTimestepEmbedderND``).
    """
    values = values.reshape(-1)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )
    args = values.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _unscale(latent: torch.Tensor, scale_factor: float) -> torch.Tensor:
    return latent / scale_factor


def _audio_tokens(projection: AudioProjection, audio: torch.Tensor) -> torch.Tensor:
    """Audio tokens, projected on the projection's device in its compute dtype (features go in
    unmoved when the projection is on ``meta``)."""
    p = projection.linear.weight
    if p.device.type == "meta":
        return projection(audio)
    return projection(audio.to(device=p.device, dtype=projection.compute_dtype or p.dtype))


def keyframe_unconditional(c: dict) -> dict:
    """The released unconditional branch of keyframe conditioning ``c``: concat and audio tokens
    zeroed, the emotion vector kept (``force_uc_zero_embeddings=[cond_frames, audio_emb]``)."""
    return {"concat": torch.zeros_like(c["concat"]), "vector": c["vector"], "crossattn": torch.zeros_like(c["crossattn"])}


def keyframe_conditioning(
    identity_latent_scaled: torch.Tensor,
    valence: torch.Tensor,
    arousal: torch.Tensor,
    audio: torch.Tensor,
    projection: AudioProjection,
    scale_factor: float = SCALE_FACTOR,
):
    """Keyframe engine conditioning -> ``(c, uc)``.

    identity_latent_scaled [B, 4, h, w]; valence, arousal [B, 14]; audio [B, 14, 2, F].
    c = {concat [B,4,h,w] = latent / 0.18215, vector [B*14, 512] = [valence emb | arousal emb],
    crossattn [B, 14, D] = projected audio}; uc = :func:`keyframe_unconditional` (c).
    """
    if identity_latent_scaled.dim() != 4:
        raise ValueError(f"identity latent: expected [B, 4, h, w], got {tuple(identity_latent_scaled.shape)}")
    b = identity_latent_scaled.shape[0]
    if valence.dim() == 1:
        valence = valence[None]
    if arousal.dim() == 1:
        arousal = arousal[None]
    if audio.dim() == 3:
        audio = audio[None]
    if valence.shape != arousal.shape or valence.shape[0] != b or audio.shape[:2] != valence.shape:
        raise ValueError(
            "keyframe conditioning: batch/slot shapes disagree: latent "
            f"{tuple(identity_latent_scaled.shape)}, valence {tuple(valence.shape)}, arousal "
            f"{tuple(arousal.shape)}, audio {tuple(audio.shape)}"
        )
    concat = _unscale(identity_latent_scaled, scale_factor)
    vector = torch.cat([emotion_embedding(valence), emotion_embedding(arousal)], dim=1)
    crossattn = _audio_tokens(projection, audio)
    vector = vector.to(device=crossattn.device, dtype=crossattn.dtype)
    concat = concat.to(device=crossattn.device, dtype=crossattn.dtype)
    c = {"concat": concat, "vector": vector, "crossattn": crossattn}
    return c, keyframe_unconditional(c)


def interpolation_conditioning(
    keyframe_pairs_scaled: torch.Tensor,
    audio: torch.Tensor,
    projection: AudioProjection,
    scale_factor: float = SCALE_FACTOR,
):
    """Interpolation engine conditioning -> ``c``.

    keyframe_pairs_scaled [S, 4, 2, h, w] (axis 2 = start, end); audio [S, 14, 2, F].
    c = {concat [S, 8, h, w] = [start 4 | end 4] / 0.18215, crossattn [S, 14, D]}.
    The interpolation model has no unconditional branch (autoguidance uses c for both networks).
    """
    if keyframe_pairs_scaled.dim() != 5 or keyframe_pairs_scaled.shape[2] != 2:
        raise ValueError(f"keyframe pairs: expected [S, 4, 2, h, w], got {tuple(keyframe_pairs_scaled.shape)}")
    s = keyframe_pairs_scaled.shape[0]
    if audio.shape[0] != s:
        raise ValueError(f"interpolation conditioning: {s} keyframe pairs but audio for {audio.shape[0]} segments")
    # (s, c, t, h, w) -> (s, t*c, h, w): channels [start c | end c]
    concat = keyframe_pairs_scaled.transpose(1, 2).reshape(s, -1, *keyframe_pairs_scaled.shape[-2:])
    concat = _unscale(concat, scale_factor)
    crossattn = _audio_tokens(projection, audio)
    return {"concat": concat.to(device=crossattn.device, dtype=crossattn.dtype), "crossattn": crossattn}
