"""The VideoUNet of Stable Video Diffusion with KeyFace's audio routing (spec 4.4, 4.5).

Module names mirror the checkpoint: ``VideoUNet(cfg).state_dict()`` has exactly the keys of
``model.diffusion_model.*`` with that prefix removed, in the original order.

Numerics follow the original (``sgm`` VideoUNet as configured by KeyFace):

* rows are ``video * num_video_frames + frame``; ``context`` holds one ``[num_video_frames, D]``
  token set per video. It is the cross-attention context of every spatial transformer (shared by
  the video's frames) and of every temporal transformer (shared by the video's pixels), and token
  ``t`` is appended to ``y`` of frame ``t`` before ``label_emb`` (spec 4.4);
* sinusoids are ``[cos | sin]`` with max period 10000, computed in float32;
* the learned blends are ``alpha * spatial + (1 - alpha) * temporal``, ``alpha = sigmoid(mix_factor)``
  (``image_only_indicator`` is always zero at inference, so it is not an input);
* GroupNorm (32 groups; eps 1e-5 in ResBlocks, 1e-6 in transformers) and LayerNorm run in float32
  and return the input dtype, as GroupNorm32 / autocast do in the original;
* attention is exact softmax attention through ``F.scaled_dot_product_attention``.

The compute dtype is the dtype of ``x``; every layer is built through the ``operations`` namespace
(see ``ops.py``) so that a host can inject its own layer classes.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .ops import resolve

__all__ = ["VideoUNet", "timestep_embedding"]


# ------------------------------------------------------------------------------------ helpers
def timestep_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """``[cos | sin]`` sinusoids of ``positions`` [N] as float32 [N, dim] (odd ``dim``: zero-padded)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = positions.reshape(-1, 1).float() * freqs.to(positions.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def norm_f32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a GroupNorm / LayerNorm layer in float32 and return ``x``'s dtype.

    The layer itself runs whenever its affine parameters are float32 on ``x``'s device (always the
    case in float32, and for hosts whose layers cast their weights). Reduced-precision or offloaded
    parameters cannot be mixed with a float32 input by torch, so those are upcast here instead.
    """
    weight, bias = norm.weight, norm.bias
    xf = x.float()
    if weight is None or (weight.dtype == torch.float32 and weight.device == x.device):
        return norm(xf).to(x.dtype)
    weight = weight.to(device=x.device, dtype=torch.float32)
    bias = None if bias is None else bias.to(device=x.device, dtype=torch.float32)
    if hasattr(norm, "num_groups"):
        out = F.group_norm(xf, norm.num_groups, weight, bias, norm.eps)
    else:
        out = F.layer_norm(xf, tuple(norm.normalized_shape), weight, bias, norm.eps)
    return out.to(x.dtype)


def norm_then(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``seq`` (a norm layer followed by others) with the norm computed in float32."""
    h = norm_f32(seq[0], x)
    for layer in seq[1:]:
        h = layer(h)
    return h


class Layers:
    """Builds layers through an operations namespace with fixed dtype / device."""

    def __init__(self, operations=None, dtype=None, device=None):
        self.ops = resolve(operations)
        self.kw = {"dtype": dtype, "device": device}

    def linear(self, i, o, bias=True):
        return self.ops.Linear(i, o, bias=bias, **self.kw)

    def conv(self, i, o, kernel, stride=1, padding=0):
        kernel = (kernel,) * 2 if isinstance(kernel, int) else tuple(kernel)
        cls = self.ops.Conv2d if len(kernel) == 2 else self.ops.Conv3d
        return cls(i, o, kernel, stride=stride, padding=padding, **self.kw)

    def group_norm(self, channels, eps):
        return self.ops.GroupNorm(32, channels, eps=eps, affine=True, **self.kw)

    def layer_norm(self, dim):
        return self.ops.LayerNorm(dim, **self.kw)

    def parameter(self, value):
        return nn.Parameter(torch.full((1,), float(value), dtype=self.kw["dtype"], device=self.kw["device"]))


class AlphaBlender(nn.Module):
    """``alpha * spatial + (1 - alpha) * temporal`` with ``alpha = sigmoid(mix_factor)``."""

    def __init__(self, mk: Layers):
        super().__init__()
        self.mix_factor = mk.parameter(0.5)

    def forward(self, spatial, temporal):
        alpha = torch.sigmoid(self.mix_factor.to(device=spatial.device, dtype=torch.float32))
        return alpha.to(spatial.dtype) * spatial + (1.0 - alpha).to(spatial.dtype) * temporal


# --------------------------------------------------------------------------------- ResBlocks
class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-conv, + skip. 2-D or 3-D by the kernel size."""

    def __init__(self, channels, emb_channels, out_channels, kernel, mk: Layers):
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.in_layers = nn.Sequential(
            mk.group_norm(channels, 1e-5), nn.SiLU(), mk.conv(channels, out_channels, kernel, padding=padding))
        self.emb_layers = nn.Sequential(nn.SiLU(), mk.linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            mk.group_norm(out_channels, 1e-5), nn.SiLU(), nn.Identity(),  # index 2: the (inactive) dropout
            mk.conv(out_channels, out_channels, kernel, padding=padding))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = mk.conv(channels, out_channels, (1,) * len(kernel))

    def forward(self, x, emb):
        """x [N, C, H, W] with emb [N, E], or x [B, C, T, H, W] with emb [B, T, E] (added per frame)."""
        h = norm_then(self.in_layers, x)
        e = self.emb_layers(emb).to(h.dtype)
        e = e[:, :, None, None] if h.dim() == 4 else e.transpose(1, 2)[..., None, None]
        return self.skip_connection(x) + norm_then(self.out_layers, h + e)


class VideoResBlock(ResBlock):
    """A 2-D ResBlock followed by a temporal 3-D ResBlock (``time_stack``), blended."""

    def __init__(self, channels, emb_channels, out_channels, video_kernel, mk: Layers):
        super().__init__(channels, emb_channels, out_channels, (3, 3), mk)
        self.time_stack = ResBlock(out_channels, emb_channels, out_channels, tuple(video_kernel), mk)
        self.time_mixer = AlphaBlender(mk)

    def forward(self, x, emb, frames):
        h = super().forward(x, emb)
        rows, c, height, width = h.shape
        spatial = h.view(rows // frames, frames, c, height, width).transpose(1, 2)  # b c t h w
        temporal = self.time_stack(spatial, emb.view(rows // frames, frames, -1))
        return self.time_mixer(spatial, temporal).transpose(1, 2).reshape(rows, c, height, width)


class Downsample(nn.Module):
    def __init__(self, channels, mk: Layers):
        super().__init__()
        self.op = mk.conv(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels, mk: Layers):
        super().__init__()
        self.conv = mk.conv(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        """Nearest ×2 (or to ``size``, the matching skip's size, for odd latent sizes), then conv."""
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


# ------------------------------------------------------------------------------- attention
class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim, heads, dim_head, mk: Layers, context_dim=None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = mk.linear(query_dim, inner, bias=False)
        self.to_k = mk.linear(context_dim or query_dim, inner, bias=False)
        self.to_v = mk.linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(mk.linear(inner, query_dim))

    def forward(self, x, context=None, repeats=1):
        """x [N, L, C]; context [N / repeats, S, D]: context row i serves x rows i*repeats ... (i+1)*repeats-1."""
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out, mk: Layers):
        super().__init__()
        self.proj = mk.linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim, mk: Layers, dim_out=None, mult=4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner, mk), nn.Identity(), mk.linear(inner, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Spatial block over the pixels of each frame: self-attn, cross-attn to the context, FF."""

    def __init__(self, dim, heads, dim_head, context_dim, mk: Layers):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, mk)
        self.ff = FeedForward(dim, mk)
        self.attn2 = CrossAttention(dim, heads, dim_head, mk, context_dim=context_dim)
        self.norm1, self.norm2, self.norm3 = (mk.layer_norm(dim) for _ in range(3))

    def forward(self, x, context, frames):
        """x [(b t), hw, C]; context [b, S, D] (one per video, shared by its ``frames`` rows)."""
        x = x + self.attn1(norm_f32(self.norm1, x))
        x = x + self.attn2(norm_f32(self.norm2, x), context, repeats=frames)
        return x + self.ff(norm_f32(self.norm3, x))


class VideoTransformerBlock(nn.Module):
    """Temporal block over the frames of each pixel: ff_in, self-attn, cross-attn, FF."""

    def __init__(self, dim, heads, dim_head, context_dim, mk: Layers):
        super().__init__()
        inner = heads * dim_head
        self.is_res = inner == dim
        self.norm_in = mk.layer_norm(dim)
        self.ff_in = FeedForward(dim, mk, dim_out=inner)
        self.attn1 = CrossAttention(inner, heads, dim_head, mk)
        self.ff = FeedForward(inner, mk, dim_out=dim)
        self.norm2 = mk.layer_norm(inner)
        self.attn2 = CrossAttention(inner, heads, dim_head, mk, context_dim=context_dim)
        self.norm1 = mk.layer_norm(inner)
        self.norm3 = mk.layer_norm(inner)

    def _residual(self, ff, norm, z):
        out = ff(norm_f32(norm, z))
        return out + z if self.is_res else out

    def forward(self, x, context, frames):
        """x [(b t), s, C] -> same; context [b, S, D] (one per video, shared by its pixels)."""
        rows, pixels, c = x.shape
        videos = rows // frames
        z = x.view(videos, frames, pixels, c).transpose(1, 2).reshape(videos * pixels, frames, c)
        z = self._residual(self.ff_in, self.norm_in, z)
        z = z + self.attn1(norm_f32(self.norm1, z))
        z = z + self.attn2(norm_f32(self.norm2, z), context, repeats=pixels)
        z = self._residual(self.ff, self.norm3, z)
        return z.view(videos, pixels, frames, -1).transpose(1, 2).reshape(rows, pixels, -1)


class SpatialVideoTransformer(nn.Module):
    """GN, proj_in, [spatial block, then temporal block on (x + frame position embedding), blended]
    × depth, proj_out, + input."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, mk: Layers, max_period=10000):
        super().__init__()
        inner = heads * dim_head
        self.max_period = max_period
        self.norm = mk.group_norm(channels, 1e-6)
        self.proj_in = mk.linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, mk) for _ in range(depth))
        self.proj_out = mk.linear(inner, channels)
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim, mk) for _ in range(depth))
        self.time_pos_embed = nn.Sequential(
            mk.linear(channels, 4 * channels), nn.SiLU(), mk.linear(4 * channels, channels))
        self.time_mixer = AlphaBlender(mk)

    def forward(self, x, context, frames):
        rows, c, height, width = x.shape
        h = self.proj_in(norm_f32(self.norm, x).flatten(2).transpose(1, 2))  # [(b t), hw, inner]
        frame_index = torch.arange(frames, device=x.device).repeat(rows // frames)
        pos = timestep_embedding(frame_index, c, self.max_period).to(h.dtype)
        pos = self.time_pos_embed(pos)[:, None, :]
        for spatial, temporal in zip(self.transformer_blocks, self.time_stack):
            h = spatial(h, context, frames)
            h = self.time_mixer(h, temporal(h + pos, context, frames))
        return self.proj_out(h).transpose(1, 2).reshape(rows, c, height, width) + x


# ------------------------------------------------------------------------------------- UNet
class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: routes (emb, context, frames) to the layers that take them."""

    def forward(self, h, emb, context, frames, upsample_size=None):
        for layer in self:
            if isinstance(layer, VideoResBlock):
                h = layer(h, emb, frames)
            elif isinstance(layer, SpatialVideoTransformer):
                h = layer(h, context, frames)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h


class VideoUNet(nn.Module):
    def __init__(self, config: UNetConfig, dtype=None, device=None, operations=None):
        super().__init__()
        self.config = cfg = config
        mk = Layers(operations, dtype, device)
        mc, emb_dim, kernel = cfg.model_channels, cfg.time_embed_dim, cfg.video_kernel_size

        def resblock(ch_in, ch_out):
            return VideoResBlock(ch_in, emb_dim, ch_out, kernel, mk)

        def transformer(ch, depth):
            heads, dim_head = cfg.heads_for(ch)
            return SpatialVideoTransformer(ch, heads, dim_head, depth, cfg.context_dim, mk, cfg.max_ddpm_temb_period)

        self.time_embed = nn.Sequential(mk.linear(mc, emb_dim), nn.SiLU(), mk.linear(emb_dim, emb_dim))
        self.label_emb = None
        if cfg.label_emb_in > 0:
            self.label_emb = nn.Sequential(
                nn.Sequential(mk.linear(cfg.label_emb_in, emb_dim), nn.SiLU(), mk.linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(mk.conv(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, mk)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), transformer(ch, cfg.depth_middle), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.depth_at(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, mk))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(mk.group_norm(ch, 1e-5), nn.SiLU(), mk.conv(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, y=None, num_video_frames=None):
        """x [B*T, in_channels, h, w] (rows = video*T + frame; its dtype is the compute dtype);
        timesteps [B*T] or a scalar (c_noise); context [B, T, context_dim] audio tokens per video;
        y [B*T, adm_in_channels] or None. Returns F [B*T, out_channels, h, w]."""
        cfg = self.config
        frames = int(num_video_frames or cfg.num_frames)
        rows, dtype = x.shape[0], x.dtype
        if rows % frames:
            raise ValueError(f"x has {rows} rows, not a multiple of num_video_frames={frames}")
        videos = rows // frames
        if context.dim() != 3 or context.shape[0] != videos or context.shape[1] != frames:
            raise ValueError(f"context must be [videos={videos}, num_video_frames={frames}, D], "
                             f"got {list(context.shape)}")
        context = context.to(dtype)

        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(rows)
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._label_input(y, context, rows))

        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, frames)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, frames, skips[-1].shape[-2:] if skips else None)
        return norm_then(self.out, h)

    def _label_input(self, y, context, rows):
        """[y | audio token of the row's frame] (or the token alone when adm_in_channels is 0)."""
        cfg = self.config
        tokens = context.reshape(rows, -1)
        if (y is None) != (cfg.adm_in_channels == 0):
            raise ValueError(f"y must be [rows, {cfg.adm_in_channels}]" if y is None else
                             "y must be None: this UNet has adm_in_channels = 0")
        vec = tokens if y is None else torch.cat([y.to(context.dtype), tokens], dim=1)
        if vec.shape != (rows, cfg.label_emb_in):
            raise ValueError(f"label_emb input must be [{rows}, {cfg.label_emb_in}] (adm_in_channels "
                             f"{cfg.adm_in_channels} + audio_dim {cfg.audio_dim}), got {list(vec.shape)}")
        return vec
