"""The two KeyFace networks (spec 4.1-4.4, 5.1).

* :class:`KeyframeNetwork`: ``OpenAIWrapper(VideoUNet)`` + the keyframe audio projection.
* :class:`InterpolationNetwork`: ``InterpolationWrapper(VideoUNet)`` with its ``learned_mask``, + the
  interpolation audio projection (``None`` for the autoguidance "bad" network, whose own projection
  the original ignores).

Both expose ``denoise(x, sigma, concat=..., crossattn=..., [vector=...])`` = the engine denoiser
D = c_skip x + c_out F(wrapper input, c_noise, ...) of ``VScalingWithEDMcNoise`` (spec 5.1), one body
for both (they differ only in the wrapper input, :meth:`unet_input`); the guidance schemes in
:mod:`keyface.diffusion` batch the calls. Sizes and configs: :mod:`keyface.engine_config`; loading
files: :mod:`keyface.loading`.
"""

from __future__ import annotations

import torch
from torch import nn

from .conditioning import AudioProjection
from .diffusion import row_scalings
from .unet import VideoUNet

RELEASED_AUDIO_FEATURE_DIM = 1536  # [WavLM|BEATs] or [wav2vec2|BEATs], spec 2.1 / 2.6
RELEASED_MASK_HW = (64, 64)  # 512x512 pixels / 8, spec 4.3


def mask_latent_hw(network) -> tuple[int, int]:
    """(h, w) of an interpolation network's ``learned_mask``: the latent size it works at."""
    mask = getattr(network, "learned_mask", None)
    if mask is None:
        raise ValueError("the interpolation network has no learned_mask")
    return int(mask.shape[-2]), int(mask.shape[-1])


def check_latent_size(network, latent_hw, what: str, fix: str = ""):
    """ValueError naming ``what`` unless latents of ``latent_hw`` fit the interpolation network's
    learned mask (the one size check every caller uses); ``fix`` says what to do instead."""
    h, w = mask_latent_hw(network)
    lh, lw = (int(s) for s in latent_hw)
    if (lh, lw) != (h, w):
        raise ValueError(f"{what} is {lh}x{lw} ({8 * lh}x{8 * lw} px) but the interpolation model's learned "
                         f"mask is {h}x{w} ({8 * h}x{8 * w} px){fix}")


class _EngineBase(nn.Module):
    """What both engines share: the compute dtype and the engine denoiser D (spec 5.1)."""

    #: dtype the UNet runs in; None -> the dtype of its weights. Hosts that keep weights in one dtype
    #: and cast them per layer (ComfyUI manual_cast) set it with :meth:`set_compute_dtype`.
    compute_dtype = None
    #: what one group of ``frames`` rows is, for error messages ("videos" / "segments")
    group_name = "groups"

    def set_compute_dtype(self, dtype):
        """Compute in ``dtype`` (None: the weights' dtype), whatever dtype the weights are stored in:
        the UNet and the audio projection (whose manual-cast Linear casts its weights to the
        features' dtype). For hosts that keep weights in a dtype the device does not compute in
        (ComfyUI's manual cast: fp8, or bf16/fp16 on a CPU)."""
        self.compute_dtype = dtype
        if getattr(self, "audio_projection", None) is not None:
            self.audio_projection.set_compute_dtype(dtype)
        return self

    def resolved_compute_dtype(self):
        if self.compute_dtype is not None:
            return self.compute_dtype
        for p in self.diffusion_model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _run_unet(self, x_in, c_noise, context, y, frames):
        dtype = self.resolved_compute_dtype()
        return self.diffusion_model(
            x_in.to(dtype),
            c_noise,  # float32 (see keyface.diffusion.row_scalings)
            context.to(dtype),
            y=None if y is None else y.to(dtype),
            num_video_frames=frames,
        )

    def unet_input(self, x_scaled_in, concat, frames: int):
        """The wrapper's UNet input for rows already scaled by c_in (each engine defines it)."""
        raise NotImplementedError

    def _denoise(self, x, sigma, concat, crossattn, vector=None):
        """D = c_skip x + c_out F(unet_input(c_in x, concat), c_noise, crossattn, vector) for rows =
        groups x frames, where groups = concat.shape[0]."""
        rows = x.shape[0]
        groups = concat.shape[0]
        if rows % groups:
            raise ValueError(f"{type(self).__name__}.denoise: {rows} rows do not split into {groups} {self.group_name}")
        frames = rows // groups
        c_skip, c_out, c_in, c_noise = row_scalings(sigma, rows, x)
        x_in = self.unet_input(x * c_in, concat, frames)
        f = self._run_unet(x_in, c_noise, crossattn, vector, frames).to(x.dtype)
        return f * c_out + x * c_skip


class KeyframeNetwork(_EngineBase):
    """Keyframe engine: ``diffusion_model`` (VideoUNet, 8 input channels) + ``audio_projection``."""

    group_name = "videos"

    def __init__(self, unet_config, audio_feature_dim: int = RELEASED_AUDIO_FEATURE_DIM, dtype=None, device=None, operations=None):
        super().__init__()
        self.unet_config = unet_config
        self.diffusion_model = VideoUNet(unet_config, dtype=dtype, device=device, operations=operations)
        self.audio_projection = AudioProjection(
            audio_feature_dim, unet_config.context_dim, dtype=dtype, device=device, operations=operations
        )

    def unet_input(self, x_scaled_in, concat, frames: int):
        """OpenAIWrapper input: [c_in x (4) | the video's identity latent, repeated per frame (4)]."""
        return torch.cat([x_scaled_in, concat.to(x_scaled_in).repeat_interleave(frames, dim=0)], dim=1)

    def denoise(self, x, sigma, *, concat, crossattn, vector):
        """D(x; sigma) for rows = videos x 14 frames.

        x [B*T, 4, h, w] (scaled latent space); sigma scalar or [B*T]; concat [B, 4, h, w] (raw latent,
        not scaled by c_in); crossattn [B, T, D]; vector [B*T, 512].
        """
        return self._denoise(x, sigma, concat, crossattn, vector)


class InterpolationNetwork(_EngineBase):
    """Interpolation engine: ``diffusion_model`` (9 input channels), ``learned_mask`` [4, h, w] and
    ``audio_projection`` (``None`` for the autoguidance bad network)."""

    group_name = "segments"

    def __init__(
        self,
        unet_config,
        mask_hw=RELEASED_MASK_HW,
        n_channels: int = 4,
        audio_feature_dim: int | None = RELEASED_AUDIO_FEATURE_DIM,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        self.unet_config = unet_config
        self.diffusion_model = VideoUNet(unet_config, dtype=dtype, device=device, operations=operations)
        self.learned_mask = nn.Parameter(torch.zeros(n_channels, *mask_hw, dtype=dtype, device=device))
        if audio_feature_dim is None:
            self.audio_projection = None
        else:
            self.audio_projection = AudioProjection(
                audio_feature_dim, unet_config.context_dim, dtype=dtype, device=device, operations=operations
            )

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the latents this network works on: its learned mask's size (64 x 64 released = 512 px)."""
        return mask_latent_hw(self)

    def check_latent_size(self, latent_hw, what: str, fix: str = ""):
        check_latent_size(self, latent_hw, what, fix)

    def unet_input(self, x_scaled_in, concat, frames: int):
        """InterpolationWrapper input: [c_in x (4) | start, M x (T-2), end (4) | mask 1, 0 x (T-2), 1 (1)]."""
        rows, c, h, w = x_scaled_in.shape
        segments = concat.shape[0]
        if rows != segments * frames:
            raise ValueError(f"interpolation: {rows} rows for {segments} segments of {frames} frames")
        self.check_latent_size((h, w), "interpolation latents")
        mask = self.learned_mask
        concat = concat.to(x_scaled_in)
        start, end = concat[:, :c], concat[:, c:]
        middle = mask.to(x_scaled_in)[None, None].expand(segments, frames - 2, c, h, w)
        cond_seq = torch.cat([start[:, None], middle, end[:, None]], dim=1).reshape(rows, c, h, w)
        flag = torch.zeros(segments, frames, 1, h, w, dtype=x_scaled_in.dtype, device=x_scaled_in.device)
        flag[:, 0] = 1
        flag[:, -1] = 1
        return torch.cat([x_scaled_in, cond_seq, flag.reshape(rows, 1, h, w)], dim=1)

    def denoise(self, x, sigma, *, concat, crossattn):
        """D(x; sigma) for rows = segments x 14 frames; concat [S, 8, h, w] = [start | end] raw latents."""
        return self._denoise(x, sigma, concat, crossattn)
