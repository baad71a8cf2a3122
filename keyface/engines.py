"""The engines' public names in one place (the stable import path for scripts and the nodes).

The code lives in :mod:`keyface.networks` (the two networks and their denoiser),
:mod:`keyface.engine_config` (sizes from configs and checkpoint shapes) and :mod:`keyface.loading`
(reading engine files); this module only re-exports their public names.
"""

from __future__ import annotations

from .engine_config import (
    BAD_NETWORK_PREFIX,
    INTERPOLATION_AUDIO_EMBEDDER,
    KEYFRAME_AUDIO_EMBEDDER,
    MASK_KEY,
    UNET_PREFIX,
    build_interpolation_network,
    build_keyframe_network,
    interpolation_network_config,
    keyframe_network_config,
)
from .loading import load_audio_projection, load_diffusion_models, load_interpolation_networks, load_keyframe_network
from .networks import RELEASED_AUDIO_FEATURE_DIM, RELEASED_MASK_HW, InterpolationNetwork, KeyframeNetwork

__all__ = [
    "BAD_NETWORK_PREFIX",
    "INTERPOLATION_AUDIO_EMBEDDER",
    "KEYFRAME_AUDIO_EMBEDDER",
    "MASK_KEY",
    "RELEASED_AUDIO_FEATURE_DIM",
    "RELEASED_MASK_HW",
    "UNET_PREFIX",
    "InterpolationNetwork",
    "KeyframeNetwork",
    "build_interpolation_network",
    "build_keyframe_network",
    "interpolation_network_config",
    "keyframe_network_config",
    "load_audio_projection",
    "load_diffusion_models",
    "load_interpolation_networks",
    "load_keyframe_network",
]
