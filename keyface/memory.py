"""Working-memory estimates of one network call (plain Python: no torch import here).

Hosts that manage device memory (ComfyUI's ``load_models_gpu(memory_required=...)``) ask for this
much free memory before a stage. These are estimates, not measurements: they take ComfyUI's own
estimates for the same networks, so KeyFace stages make a memory manager free about as much as a
native SVD workflow would. ``dtype`` is anything with an ``itemsize`` (a torch dtype) or a size in bytes.
"""

from __future__ import annotations

# UNet: ComfyUI's BaseModel.memory_required (comfy/model_base.py), fused-attention case (our UNet
# attends through scaled_dot_product_attention), with SVD_img2vid's memory_usage_factor 2.0:
# 0.01 MiB x factor x dtype size per latent pixel of every row (batch item) of one call.
UNET_BYTES_PER_LATENT_PIXEL = round(0.01 * 2.0 * 2**20)  # x dtype size
# SVD VAE decoder: ComfyUI's estimate for its KL decoder (comfy/sd.py VAE memory_used_decode):
# ~2178 x dtype size bytes per output pixel of every decoded frame.
DECODE_BYTES_PER_PIXEL = 2178  # x dtype size
LATENT_DOWNSCALE = 8  # pixels per latent pixel (SVD VAE)


def _itemsize(dtype) -> int:
    return int(getattr(dtype, "itemsize", dtype))


def unet_call_bytes(rows, latent_hw, dtype) -> int:
    """Estimated working memory (bytes) of one UNet call on ``rows`` latents of ``latent_hw``."""
    h, w = latent_hw
    return int(rows) * h * w * _itemsize(dtype) * UNET_BYTES_PER_LATENT_PIXEL


def decode_call_bytes(rows, latent_hw, dtype, width_ratio: float = 1.0, upscale: int = LATENT_DOWNSCALE) -> int:
    """Estimated working memory (bytes) of one VAE decoder call on ``rows`` latents of ``latent_hw``.
    ``width_ratio``: the decoder's full-resolution channel count over the released one's (the largest
    activations scale with it); ``upscale``: its pixels per latent (keyface.vae.decode_memory sets both
    from a decoder config)."""
    h, w = (int(v) for v in latent_hw)
    per_pixel = DECODE_BYTES_PER_PIXEL * _itemsize(dtype) * float(width_ratio)
    return int(int(rows) * (upscale * h) * (upscale * w) * per_pixel)


def keyframe_call_bytes(latent_hw, dtype) -> int:
    """One keyframe UNet call: the 3 guidance branches x one 14-frame window."""
    from .planner import WINDOW

    return unet_call_bytes(3 * WINDOW, latent_hw, dtype)


def interpolation_call_bytes(segments_per_call, latent_hw, dtype) -> int:
    """One interpolation UNet call: ``segments_per_call`` 14-frame segments (good and bad networks
    run one after the other)."""
    from .planner import WINDOW

    return unet_call_bytes(int(segments_per_call) * WINDOW, latent_hw, dtype)


def segment_decode_rows(chunk_frames) -> int:
    """Latents per decoder call when decoding ``chunk_frames`` output frames of merged segments: the
    frames plus a second copy of each shared keyframe among them."""
    from .planner import STEP

    return int(chunk_frames) + int(chunk_frames) // STEP + 1
