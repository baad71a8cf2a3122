"""The SVD first stage: SD encoder + temporal ``VideoDecoder`` (spec 4.6), as plain PyTorch.

Numerically this is ``sgm.models.autoencoder.AutoencodingEngine`` with
``sgm.modules.diffusionmodules.model.Encoder`` and ``sgm.modules.autoencoding.temporal_ae.VideoDecoder``
(``time_mode="conv-only"``, ``merge_strategy="learned"``) of the KeyFace reference (= Stable Video
Diffusion). Module names mirror the checkpoint keys: ``VAE.encoder.*`` / ``VAE.decoder.*`` are the
``first_stage_model.encoder.*`` / ``first_stage_model.decoder.*`` keys of the original files.

Points that differ from a plain SD VAE (and from the UNet):

* every decoder ResnetBlock is a ``VideoResBlock``: the spatial SD block, then a 3-D ``time_stack``
  ResBlock ((3,1,1) convs padded in time, no time embedding, GroupNorm eps 1e-5 computed in float32 as
  the original ``GroupNorm32``), blended as ``alpha * temporal + (1 - alpha) * spatial`` with
  ``alpha = sigmoid(mix_factor)`` -- the REVERSE of the UNet's convention;
* ``conv_out`` (Conv2d) is followed by ``conv_out.time_mix_conv``, a Conv3d(out_ch, out_ch, (3,1,1));
* the SD parts use GroupNorm(32, eps 1e-6); the middle attention is the single-head ``AttnBlock`` with
  1x1 q/k/v/proj convs, computed with SDPA (as the original);
* the encoder's Downsample pads (0, 1, 0, 1) -- right and bottom only -- before its stride-2 conv;
* there is no quant_conv / post_quant_conv in the SVD layout. The diffusers
  ``AutoencoderKLTemporalDecoder`` always carries a ``quant_conv`` applied after the encoder; when a
  diffusers file is loaded it is kept and applied, so ``encode`` equals diffusers' ``latent_dist``.

Decoding with ``frames_per_video=1`` (the released ``decoding_t=1``) makes every temporal conv see only
its centre tap (zero padding in time); the alpha blend still applies. It is computed batched: the
frames are simply ``T`` videos of one frame each.

Files: :func:`load_vae` reads the SVD first-stage layout (``encoder.*`` / ``decoder.*``), a full SVD or
KeyFace checkpoint (``first_stage_model.*``, the rest ignored), and the diffusers
``AutoencoderKLTemporalDecoder`` layout (converted key by key, :func:`convert_diffusers_vae`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, KeyLedger, format_keys, load_strict, read_state_dict
from .latents import LATENT_SCALE
from .ops import resolve
from .unet import norm_then

__all__ = [
    "SCALE_FACTOR",
    "EncoderConfig",
    "DecoderConfig",
    "SVD_ENCODER",
    "SVD_DECODER",
    "Encoder",
    "VideoDecoder",
    "VAE",
    "configs_from_first_stage",
    "convert_diffusers_vae",
    "decode_memory",
    "load_vae",
]

SCALE_FACTOR = LATENT_SCALE  # the name this module has always exported

# Keys of the original ddconfig that do not change the inference computation (or that we only accept at
# the value the released model uses, checked in _check_inert).
_INERT_KEYS = {
    "attn_type": ("vanilla", "vanilla-xformers"),  # same AttnBlock maths, same keys (SDPA / xformers)
    "dropout": None,  # inference: no effect
    "resamp_with_conv": (True,),
    "use_linear_attn": (False,),
    "give_pre_end": (False,),
    "tanh_out": (False,),
    "time_mode": ("conv-only",),
    "merge_strategy": ("learned",),
    "alpha": None,  # initial value of the learned mix_factor; the weights replace it
    "use_checkpoint": None,
    "embed_dim": None,
}


def _check_inert(cls_name, params):
    for k, allowed in _INERT_KEYS.items():
        if k in params and allowed is not None and params[k] not in allowed:
            raise ValueError(f"{cls_name}: {k}={params[k]!r} is not supported (only {list(allowed)})")


@dataclass
class _DDConfig:
    """The ``ddconfig`` fields of the original encoder and decoder configs (original names).

    Both YAML nodes carry the whole ddconfig, so each side keeps (and ignores) the entries only the
    other one uses.
    """

    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = ()
    z_channels: int = 4
    double_z: bool = True  # encoder only
    in_channels: int = 3  # encoder only
    out_ch: int = 3  # decoder only
    resolution: int = 256

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    @classmethod
    def from_original(cls, params: dict):
        """From an ``encoder_config.params`` / ``decoder_config.params`` / ``ddconfig`` dict; unknown keys
        raise ValueError."""
        params = dict(params or {})
        _check_inert(cls.__name__, params)
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in params if k not in names and k not in _INERT_KEYS)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_original: unknown parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class EncoderConfig(_DDConfig):
    """``sgm.modules.diffusionmodules.model.Encoder`` parameters. Defaults = SVD."""


@dataclass
class DecoderConfig(_DDConfig):
    """``VideoDecoder`` parameters. Defaults = SVD / KeyFace (spec 4.6)."""

    video_kernel_size: tuple = (3, 1, 1)

    def __post_init__(self):
        super().__post_init__()
        k = self.video_kernel_size
        self.video_kernel_size = (int(k),) * 3 if isinstance(k, int) else tuple(int(v) for v in k)
        if len(self.video_kernel_size) != 3:
            raise ValueError(f"DecoderConfig: video_kernel_size must have 3 entries, got {k!r}")


SVD_ENCODER = EncoderConfig()
SVD_DECODER = DecoderConfig()


def configs_from_first_stage(first_stage_config: dict):
    """``first_stage_config`` of the original YAML -> (EncoderConfig | None, DecoderConfig | None).

    Accepts the whole ``{"target", "params"}`` node or its ``params``.
    """
    params = first_stage_config.get("params", first_stage_config)

    def sub(name):
        node = params.get(name)
        if node is None:
            return None
        return node.get("params", node)

    enc, dec = sub("encoder_config"), sub("decoder_config")
    return (
        EncoderConfig.from_original(enc) if enc is not None else None,
        DecoderConfig.from_original(dec) if dec is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _swish(x):
    return x * torch.sigmoid(x)  # sgm's nonlinearity


def _normalize(ops, channels, dtype, device):
    return ops.GroupNorm(32, channels, eps=1e-6, affine=True, dtype=dtype, device=device)


class ResnetBlock(nn.Module):
    """SD ResnetBlock without time embedding (temb_channels = 0)."""

    def __init__(self, in_channels, out_channels, ops, dtype=None, device=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _normalize(ops, in_channels, dtype, device)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, dtype=dtype, device=device)
        self.norm2 = _normalize(ops, out_channels, dtype, device)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, dtype=dtype, device=device)
        if in_channels != out_channels:
            self.nin_shortcut = ops.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, dtype=dtype, device=device)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # dropout: identity at inference
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class TemporalResBlock(nn.Module):
    """``openaimodel.ResBlock(dims=3, kernel_size=video_kernel_size, skip_t_emb=True)``: the time_stack.

    Keys: ``in_layers.0`` (GroupNorm32, eps 1e-5), ``in_layers.2`` (Conv3d), ``out_layers.0``,
    ``out_layers.3``; identity skip (channels unchanged). The zero "time embedding" adds nothing.
    The norms run in float32 and return the input dtype, as the original ``GroupNorm32``.
    """

    def __init__(self, channels, kernel_size, ops, dtype=None, device=None):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(
            ops.GroupNorm(32, channels, dtype=dtype, device=device),
            nn.SiLU(),
            ops.Conv3d(channels, channels, kernel_size, padding=padding, dtype=dtype, device=device),
        )
        self.out_layers = nn.Sequential(
            ops.GroupNorm(32, channels, dtype=dtype, device=device),
            nn.SiLU(),
            nn.Identity(),  # Dropout in the original
            ops.Conv3d(channels, channels, kernel_size, padding=padding, dtype=dtype, device=device),
        )

    def forward(self, x):  # x [B, C, T, H, W]
        return x + norm_then(self.out_layers, norm_then(self.in_layers, x))


def _to_video(x, timesteps):
    """(b t) c h w -> b c t h w"""
    bt, c, h, w = x.shape
    return x.reshape(bt // timesteps, timesteps, c, h, w).permute(0, 2, 1, 3, 4)


def _from_video(x):
    """b c t h w -> (b t) c h w"""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


class VideoResBlock(ResnetBlock):
    """SD ResnetBlock + temporal ``time_stack``, blended ``alpha*temporal + (1-alpha)*spatial``."""

    def __init__(self, in_channels, out_channels, video_kernel_size, ops, dtype=None, device=None):
        super().__init__(in_channels, out_channels, ops, dtype=dtype, device=device)
        self.time_stack = TemporalResBlock(out_channels, video_kernel_size, ops, dtype=dtype, device=device)
        self.mix_factor = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def forward(self, x, timesteps):
        spatial = _to_video(super().forward(x), timesteps)
        temporal = self.time_stack(spatial)
        alpha = torch.sigmoid(self.mix_factor.to(dtype=temporal.dtype, device=temporal.device))
        return _from_video(alpha * temporal + (1.0 - alpha) * spatial)  # REVERSE of the UNet's AlphaBlender (spec 4.6)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 conv projections (sgm ``AttnBlock``)."""

    def __init__(self, channels, ops, dtype=None, device=None):
        super().__init__()
        self.norm = _normalize(ops, channels, dtype, device)
        for name in ("q", "k", "v", "proj_out"):
            setattr(self, name, ops.Conv2d(channels, channels, 1, stride=1, padding=0, dtype=dtype, device=device))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for t in (q, k, v))
        h_ = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        h_ = h_.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Downsample(nn.Module):
    def __init__(self, channels, ops, dtype=None, device=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels, ops, dtype=None, device=None):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, stride=1, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Holds ``block`` / ``attn`` lists and the optional down/upsample (keys ``down.i.*`` / ``up.i.*``)."""


# --------------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """SD encoder (``sgm.modules.diffusionmodules.model.Encoder``). Output: moments [B, 2z, H/f, W/f]."""

    def __init__(self, config: EncoderConfig = SVD_ENCODER, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve(operations)
        self.config = config
        cfg = config
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = ops.Conv2d(cfg.in_channels, cfg.ch, 3, stride=1, padding=1, dtype=dtype, device=device)
        curr_res = cfg.resolution
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, ops, dtype, device))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, ops, dtype, device))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, ops, dtype, device)
                curr_res = curr_res // 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, ops, dtype, device)
        self.mid.attn_1 = AttnBlock(block_in, ops, dtype, device)
        self.mid.block_2 = ResnetBlock(block_in, block_in, ops, dtype, device)
        self.norm_out = _normalize(ops, block_in, dtype, device)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = ops.Conv2d(block_in, z_out, 3, stride=1, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class VideoDecoder(nn.Module):
    """SVD temporal decoder (``VideoDecoder``, time_mode conv-only).

    ``forward(z [B*T, z, h, w] unscaled, timesteps=T)`` -> pixels [B*T, out_ch, h*f, w*f]; the rows of
    one video are consecutive.
    """

    def __init__(self, config: DecoderConfig = SVD_DECODER, dtype=None, device=None, operations=None):
        super().__init__()
        ops = resolve(operations)
        self.config = config
        cfg = config
        k = cfg.video_kernel_size
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = ops.Conv2d(cfg.z_channels, block_in, 3, stride=1, padding=1, dtype=dtype, device=device)
        self.mid = nn.Module()
        self.mid.block_1 = VideoResBlock(block_in, block_in, k, ops, dtype, device)
        self.mid.attn_1 = AttnBlock(block_in, ops, dtype, device)
        self.mid.block_2 = VideoResBlock(block_in, block_in, k, ops, dtype, device)
        up = [None] * self.num_resolutions
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(VideoResBlock(block_in, block_out, k, ops, dtype, device))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, ops, dtype, device))
            if i_level != 0:
                level.upsample = Upsample(block_in, ops, dtype, device)
                curr_res = curr_res * 2
            up[i_level] = level
        self.up = nn.ModuleList(up)
        self.norm_out = _normalize(ops, block_in, dtype, device)
        # AE3DConv: a Conv2d whose output goes through its own ``time_mix_conv`` (keys conv_out.*)
        self.conv_out = ops.Conv2d(block_in, cfg.out_ch, 3, stride=1, padding=1, dtype=dtype, device=device)
        self.conv_out.time_mix_conv = ops.Conv3d(
            cfg.out_ch, cfg.out_ch, k, padding=tuple(v // 2 for v in k), dtype=dtype, device=device
        )

    def forward(self, z, timesteps: int = 1):
        if z.shape[0] % timesteps:
            raise ValueError(f"VideoDecoder: batch {z.shape[0]} is not a multiple of timesteps={timesteps}")
        h = self.conv_in(z)
        h = self.mid.block_1(h, timesteps)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, timesteps)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, timesteps)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        h = self.conv_out(_swish(self.norm_out(h)))
        return _from_video(self.conv_out.time_mix_conv(_to_video(h, timesteps)))


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------


# keyface.memory.DECODE_BYTES_PER_PIXEL: peak working memory of one decoder call, per output pixel of
# every decoded frame and per byte of the compute dtype, for the released decoder (ch x ch_mult[0] = 128 channels at full resolution).
# ComfyUI's estimate for this decoder (comfy/sd.py, VAE memory_used_decode); measured here on the CPU
# in float32 (random weights, one thread): 7.13 KB per pixel at 256 px (1 frame), 7.46 KB at 128 px
# (4 frames), i.e. 1780-1870 per dtype byte, below this estimate. At 512 px the estimate gives 2.28 GB
# per frame in float32 and 1.14 GB in float16 (computed, not measured at that size).
_RELEASED_FULL_RES_CHANNELS = SVD_DECODER.ch * SVD_DECODER.ch_mult[0]


def decode_memory(config: DecoderConfig, rows: int, latent_hw, dtype) -> int:
    """Estimated peak working memory (bytes) of one decoder call on ``rows`` latents of ``latent_hw``
    (h, w) computing in ``dtype``: the released decoder's per-pixel figure, scaled by this decoder's
    channel count at full resolution (where the largest activations are) and its upsampling factor."""
    from .memory import decode_call_bytes

    return decode_call_bytes(rows, latent_hw, torch.empty((), dtype=dtype).element_size(),
                             width_ratio=config.ch * config.ch_mult[0] / _RELEASED_FULL_RES_CHANNELS,
                             upscale=2 ** (len(config.ch_mult) - 1))


class VAE(nn.Module):
    """SVD first stage: optional ``encoder``, ``decoder``; latents are scaled by ``scale_factor``.

    ``quant_conv`` is None for the SVD layout (which has none) and a 1x1 Conv2d when the weights came
    from a diffusers ``AutoencoderKLTemporalDecoder`` file (diffusers applies it after the encoder).
    ``compute_dtype`` (None = the dtype of the weights) is the dtype inputs are cast to; inputs are
    not moved between devices.
    """

    scale_factor = SCALE_FACTOR

    def __init__(
        self,
        decoder_config: DecoderConfig = SVD_DECODER,
        encoder_config: EncoderConfig | None = None,
        quant_conv: bool = False,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        ops = resolve(operations)
        self.decoder = VideoDecoder(decoder_config, dtype=dtype, device=device, operations=ops)
        self.encoder = None
        self.quant_conv = None
        if encoder_config is not None:
            if not encoder_config.double_z:
                raise ValueError("VAE: the encoder must have double_z=True (the posterior needs mean and logvar)")
            self.encoder = Encoder(encoder_config, dtype=dtype, device=device, operations=ops)
            if quant_conv:
                z2 = 2 * encoder_config.z_channels
                self.quant_conv = ops.Conv2d(z2, z2, 1, dtype=dtype, device=device)
        elif quant_conv:
            raise ValueError("VAE: quant_conv needs an encoder")
        self.compute_dtype = None

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def downscale(self) -> int:
        return 2 ** (len(self.decoder.config.ch_mult) - 1)

    def _prepare(self, x, module):
        """Cast the input to ``compute_dtype`` (default: the weights' dtype). The device is the
        caller's business (ComfyUI may keep offloaded weights elsewhere than the compute device)."""
        p = module.conv_in.weight
        dtype = self.compute_dtype or (p.dtype if p.is_floating_point() else torch.float32)
        return x.to(dtype=dtype)

    def _require_encoder(self):
        if self.encoder is None:
            raise ValueError(
                "this VAE has no encoder: it was loaded from a file that carries only the decoder (a KeyFace "
                "engine file holds only first_stage_model.decoder.*). Load a VAE file with an encoder instead: "
                "the SVD VAE (svd_vae.safetensors with encoder.*/decoder.* keys) or the diffusers file "
                "stable-video-diffusion-img2vid/vae/diffusion_pytorch_model(.fp16).safetensors"
            )

    # -- encode -----------------------------------------------------------------------------------
    def encode_moments(self, pixels):
        """pixels [B,3,H,W] in [-1,1] -> raw posterior moments [B, 2z, H/f, W/f] = [mean | logvar]."""
        self._require_encoder()
        if pixels.ndim != 4:
            raise ValueError(f"VAE.encode: expected pixels [B, C, H, W], got shape {tuple(pixels.shape)}")
        moments = self.encoder(self._prepare(pixels, self.encoder))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def encode(self, pixels, sample: bool = False, generator: torch.Generator | None = None):
        """pixels [B,3,H,W] in [-1,1] -> scaled latent [B, z, H/f, W/f] (x ``scale_factor``).

        Default: the posterior MEAN x 0.18215, deterministic. The original ``video_to_latent.py``
        instead draws ``latent_dist.sample()`` with an unseeded generator (spec 1.1 / B10), so its
        identity latent changes on every run; ``sample=True`` reproduces that behaviour, and with a
        ``generator`` deterministically: ``z = mean + exp(0.5 * clamp(logvar, -30, 20)) * eps``,
        ``eps ~ N(0, 1)`` drawn on the generator's device in the latent's dtype.
        """
        moments = self.encode_moments(pixels)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        if sample:
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
            gen_device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
            z = mean + std * eps.to(mean.device)
        else:
            z = mean
        return z * self.scale_factor

    # -- decode -----------------------------------------------------------------------------------
    def decode(self, latents, frames_per_video: int = 1):
        """scaled latents [T, z, h, w] -> pixels [T, 3, h*f, w*f] in ~[-1, 1] (no clamp).

        ``frames_per_video=1`` is the released ``decoding_t=1``: every frame is its own video (all
        temporal convs see only their centre tap); all T frames still run in one batched call.
        ``frames_per_video=n`` decodes T/n videos of n consecutive frames (n must divide T).
        """
        if latents.ndim != 4:
            raise ValueError(f"VAE.decode: expected latents [T, C, h, w], got shape {tuple(latents.shape)}")
        n = int(frames_per_video)
        if n < 1 or latents.shape[0] % n:
            raise ValueError(
                f"VAE.decode: frames_per_video={frames_per_video} must be >= 1 and divide the number of "
                f"frames {latents.shape[0]}"
            )
        z = (1.0 / self.scale_factor) * self._prepare(latents, self.decoder)  # as decode_first_stage
        return self.decoder(z, timesteps=n)


# --------------------------------------------------------------------------------------------------
# Loading: layouts
# --------------------------------------------------------------------------------------------------

_FIRST_STAGE_PREFIX = "first_stage_model."


def _index_set(keys, pattern):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def _channel_split(channels):
    """Per-level channel counts -> (ch, ch_mult): any factorisation builds the same modules."""
    ch = 0
    for c in channels:
        ch = math.gcd(ch, int(c))
    return ch, tuple(int(c) // ch for c in channels)


def _attn_config(levels_with_attn, n_levels):
    """Choose (resolution, attn_resolutions) so exactly ``levels_with_attn`` get attention."""
    resolution = max(256, 2 ** (n_levels - 1))
    res = [resolution // 2**i for i in range(n_levels)]  # level i (0 = full resolution)
    return resolution, tuple(res[i] for i in levels_with_attn)


def _infer_decoder_config(sd) -> DecoderConfig:
    keys = list(sd)
    try:
        levels = _index_set(keys, r"up\.(\d+)\.")
        blocks = _index_set(keys, r"up\.0\.block\.(\d+)\.")
        if not levels or not blocks:
            raise KeyError("up.*")
        channels = [sd[f"up.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        ch, ch_mult = _channel_split(channels)
        attn_levels = [i for i in levels if any(k.startswith(f"up.{i}.attn.") for k in keys)]
        resolution, attn_res = _attn_config(attn_levels, len(levels))
        return DecoderConfig(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=len(blocks) - 1,
            attn_resolutions=attn_res,
            z_channels=sd["conv_in.weight"].shape[1],
            out_ch=sd["conv_out.weight"].shape[0],
            resolution=resolution,
            video_kernel_size=tuple(sd["conv_out.time_mix_conv.weight"].shape[2:]),
        )
    except KeyError as err:
        raise CheckpointError(f"not a VideoDecoder state dict: missing {err}") from None


def _infer_encoder_config(sd, z_channels=None) -> EncoderConfig:
    keys = list(sd)
    try:
        levels = _index_set(keys, r"down\.(\d+)\.")
        blocks = _index_set(keys, r"down\.0\.block\.(\d+)\.")
        if not levels or not blocks:
            raise KeyError("down.*")
        ch = sd["conv_in.weight"].shape[0]
        channels = [sd[f"down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        if any(c % ch for c in channels):
            raise CheckpointError(f"encoder level widths {channels} are not multiples of ch={ch}")
        attn_levels = [i for i in levels if any(k.startswith(f"down.{i}.attn.") for k in keys)]
        resolution, attn_res = _attn_config(attn_levels, len(levels))
        z_out = sd["conv_out.weight"].shape[0]
        if z_channels is None:
            z_channels = z_out // 2
        if z_out != 2 * z_channels:
            raise CheckpointError(
                f"encoder conv_out has {z_out} channels; expected 2 x z_channels = {2 * z_channels} (double_z)"
            )
        return EncoderConfig(
            ch=ch,
            ch_mult=tuple(c // ch for c in channels),
            num_res_blocks=len(blocks),
            attn_resolutions=attn_res,
            z_channels=z_channels,
            double_z=True,
            in_channels=sd["conv_in.weight"].shape[1],
            resolution=resolution,
        )
    except KeyError as err:
        raise CheckpointError(f"not an SD encoder state dict: missing {err}") from None


# diffusers AutoencoderKLTemporalDecoder -> SVD layout --------------------------------------------

_DIFFUSERS_RESNET = {  # diffusers ResnetBlock2D / TemporalResnetBlock names -> sgm
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_DIFFUSERS_TEMPORAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("decoder.up_blocks.", "decoder.mid_block.", "encoder.down_blocks.")) for k in keys)


def convert_diffusers_vae(sd: dict, source_name: str = "state dict") -> dict:
    """Map every key of a diffusers ``AutoencoderKLTemporalDecoder`` state dict to the SVD layout.

    Returns ``{svd_key: tensor}`` (``encoder.*``, ``decoder.*``, ``quant_conv.*``); attention Linear
    weights [C, C] become 1x1 conv weights [C, C, 1, 1]. Any key it does not know raises
    :class:`CheckpointError` naming it.

    diffusers' ``MidBlockTemporalDecoder`` builds ``layers_per_block`` resnets but only runs the first
    two (around its single attention); the SVD decoder is exactly that with ``layers_per_block=2``.
    Files with another mid-block depth are refused rather than silently mis-loaded.
    """
    n_up = len(_index_set(sd, r"decoder\.up_blocks\.(\d+)\."))
    out, unknown = {}, []
    attn_rx = "|".join(re.escape(k) for k in _DIFFUSERS_ATTN)
    rules = [
        (r"(encoder|decoder)\.conv_in\.(weight|bias)$", lambda m: f"{m[1]}.conv_in.{m[2]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(weight|bias)$", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(weight|bias)$", lambda m: f"{m[1]}.conv_out.{m[2]}"),
        (r"decoder\.time_conv_out\.(weight|bias)$", lambda m: f"decoder.conv_out.time_mix_conv.{m[1]}"),
        (r"quant_conv\.(weight|bias)$", lambda m: f"quant_conv.{m[1]}"),
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)$",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_DIFFUSERS_RESNET[m[3]]}.{m[4]}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            r"encoder\.mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)$",
            lambda m: f"encoder.mid.block_{int(m[1]) + 1}.{_DIFFUSERS_RESNET[m[2]]}.{m[3]}",
        ),
        (
            rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attn_rx})\.(weight|bias)$",
            lambda m: f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTN[m[2]]}.{m[3]}",
        ),
        (
            r"decoder\.mid_block\.resnets\.([01])\.spatial_res_block\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)$",
            lambda m: f"decoder.mid.block_{int(m[1]) + 1}.{_DIFFUSERS_RESNET[m[2]]}.{m[3]}",
        ),
        (
            r"decoder\.mid_block\.resnets\.([01])\.temporal_res_block\.(norm1|conv1|norm2|conv2)\.(weight|bias)$",
            lambda m: f"decoder.mid.block_{int(m[1]) + 1}.time_stack.{_DIFFUSERS_TEMPORAL[m[2]]}.{m[3]}",
        ),
        (
            r"decoder\.mid_block\.resnets\.([01])\.time_mixer\.mix_factor$",
            lambda m: f"decoder.mid.block_{int(m[1]) + 1}.mix_factor",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.spatial_res_block\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(weight|bias)$",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_DIFFUSERS_RESNET[m[3]]}.{m[4]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.temporal_res_block\.(norm1|conv1|norm2|conv2)\.(weight|bias)$",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.time_stack.{_DIFFUSERS_TEMPORAL[m[3]]}.{m[4]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.time_mixer\.mix_factor$",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.mix_factor",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$",
            lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
    ]
    compiled = [(re.compile(p), f) for p, f in rules]
    for key, value in sd.items():
        for rx, fn in compiled:
            m = rx.match(key)
            if m:
                new = fn(m)
                if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
                    value = value.reshape(*value.shape, 1, 1)  # Linear [C, C] -> 1x1 conv
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        extra_mid = [k for k in unknown if re.match(r"(encoder|decoder)\.mid_block\.resnets\.[2-9]", k)]
        hint = (
            "\nThe mid block has more than 2 resnets (layers_per_block != 2): diffusers runs only the first two, "
            "this is not the SVD architecture."
            if extra_mid
            else ""
        )
        raise CheckpointError(
            f"{source_name}: {len(unknown)} key(s) of this diffusers AutoencoderKLTemporalDecoder file have no "
            f"counterpart in the SVD first stage:{format_keys(unknown)}{hint}"
        )
    return out


# --------------------------------------------------------------------------------------------------
# load_vae
# --------------------------------------------------------------------------------------------------


def load_vae(
    source,
    dtype=None,
    device=None,
    operations=None,
    *,
    decoder_config: DecoderConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    scale_factor: float | None = None,
) -> VAE:
    """Load the SVD first stage from a file path or a state dict.

    Accepted layouts (detected from the keys):

    * SVD first stage: ``encoder.*`` (optional) / ``decoder.*``, optionally ``quant_conv.*``;
    * a full SVD checkpoint or a KeyFace engine file: the ``first_stage_model.*`` keys are used and
      every other key (UNet ``model.*``, ``conditioner.*``, ``denoiser.*``, ...) is ignored, because it
      belongs to the diffusion model, not to the first stage. KeyFace engine files carry only
      ``first_stage_model.decoder.*``: the VAE then has no encoder and ``encode`` raises ValueError;
    * diffusers ``AutoencoderKLTemporalDecoder`` (``decoder.up_blocks.*``, ``encoder.down_blocks.*``,
      ``quant_conv.*``), converted by :func:`convert_diffusers_vae`.

    The architecture is inferred from the tensor shapes unless ``decoder_config`` / ``encoder_config``
    are given (an encoder is built only when the file has encoder keys). Every key is consumed or
    ignored with a reason; anything else raises :class:`~keyface.checkpoints.CheckpointError` (a
    ValueError) naming the keys. ``dtype`` None -> float32.
    """
    if isinstance(source, (str, Path)):
        name = str(source)
        sd = read_state_dict(source)
    elif isinstance(source, dict):
        name = "VAE state dict"
        sd = dict(source)
    else:
        raise TypeError(f"load_vae: expected a path or a state dict, got {type(source).__name__}")

    ledger = KeyLedger(sd, name)
    if ledger.has_prefix(_FIRST_STAGE_PREFIX):
        fs = ledger.take(_FIRST_STAGE_PREFIX)
        ledger.ignore(
            "",
            "not part of the first stage: the diffusion model (model.*), conditioner, denoiser or other "
            "parts of the checkpoint the VAE is taken from",
        )
    else:
        fs = ledger.take("")
    ledger.finish()

    if is_diffusers_layout(fs):
        fs = convert_diffusers_vae(fs, name)

    dec_sd = {k[len("decoder."):]: v for k, v in fs.items() if k.startswith("decoder.")}
    enc_sd = {k[len("encoder."):]: v for k, v in fs.items() if k.startswith("encoder.")}
    has_quant_conv = any(k.startswith("quant_conv.") for k in fs)
    if not dec_sd:
        raise CheckpointError(
            f"{name}: no VAE decoder weights found (expected decoder.*, first_stage_model.decoder.* or the "
            f"diffusers AutoencoderKLTemporalDecoder layout); the file starts with:{format_keys(list(fs))}"
        )

    dec_cfg = decoder_config or _infer_decoder_config(dec_sd)
    enc_cfg = None
    if enc_sd:
        enc_cfg = encoder_config or _infer_encoder_config(enc_sd, z_channels=dec_cfg.z_channels)
    vae = VAE(
        dec_cfg,
        enc_cfg,
        quant_conv=has_quant_conv and enc_cfg is not None,
        dtype=dtype or torch.float32,
        device=device,
        operations=operations,
    )
    load_strict(vae, fs, name, "first-stage architecture (SVD VAE)", hint=(
        "A VAE file holds encoder.* / decoder.* (SVD layout), first_stage_model.* (full SVD checkpoint or "
        "KeyFace engine file) or the diffusers AutoencoderKLTemporalDecoder keys."))
    if scale_factor is not None:
        vae.scale_factor = float(scale_factor)
    vae.eval()
    return vae


