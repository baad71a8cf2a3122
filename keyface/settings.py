"""Render settings and their defaults, defined once (plain Python: no torch import here).

:class:`RenderSettings` holds the released inference settings (spec 7) and the speed knobs. The
pipeline, the CLI and the node inputs all read their defaults from it (``RenderSettings()``), so a
default changes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ATTENTION_BACKENDS
from .validate import integer, number

DEFAULT_SEED = 23  # the reference's torch.manual_seed(23) (spec 1.2)
DEFAULT_CHUNK_FRAMES = 16  # frames per VAE decode call, at most (fewer when the free memory says so)
DEFAULT_CRF = 18  # H.264 quality of the written mp4 (lower = better, bigger)


def check_attention(name) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    return name


@dataclass
class RenderSettings:
    """Sampling settings of a render (defaults = the released inference settings, spec 7).

    Speed settings that do not change the result beyond float rounding: ``segments_per_call``,
    ``branches_per_call`` (both halved automatically on out-of-memory), ``chunk_frames``,
    ``attention`` (SDPA backend, see :data:`ATTENTION_BACKENDS`) and ``compile`` (opt-in
    ``torch.compile`` of the UNets). Their measured cost and effect: bench/README.md.
    """

    seed: int = DEFAULT_SEED
    keyframe_steps: int = 10
    interpolation_steps: int = 10
    ref_ratio: float = 2.0
    audio_ratio: float = 5.0
    scale: float = 2.0
    autoguidance: bool = True
    segments_per_call: int = 2
    branches_per_call: int = 3
    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    # > 0: skip both stages' guidance at sigmas at or below it (the last AYS step is at 0.002). Saves 31.1
    # of 660.65 UNet frame-evaluations per output second (26.9 interpolation + 4.1 keyframe); an
    # approximation (bench/README.md), off by default.
    guidance_min_sigma: float = 0.0
    attention: str = "auto"
    compile: bool = False

    def __post_init__(self):
        # checked here so that a bad value fails before any sampling, not after the keyframes
        check_attention(self.attention)
        for name in ("ref_ratio", "audio_ratio", "scale"):
            number(name, getattr(self, name))  # NaN / inf guidance would sample NaN latents: a black video
        number("guidance_min_sigma", self.guidance_min_sigma, low=0.0)
        integer("seed", self.seed, low=0)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        for name, low, high in (("segments_per_call", 1, None), ("branches_per_call", 1, 3), ("chunk_frames", 1, None),
                                ("keyframe_steps", 10, None), ("interpolation_steps", 10, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low or (high is not None and value > high):
                span = f"{low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be an integer {span}, got {value!r}")


DEFAULTS = RenderSettings()
