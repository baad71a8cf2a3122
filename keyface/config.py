"""UNet configuration with the parameter names of the original YAML files (spec 4.4).

``UNetConfig.from_original(params)`` reads the ``network_config.params`` dict of a KeyFace config
(``scripts/sampling/configs/{keyframe,interpolation}.yaml`` or a parity case). Keys that do not
change the inference network are accepted; values that would build a different network than the
released ones (another merge strategy, another audio routing, ...) are rejected by name, and so are
keys this module does not know.
"""

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

from .planner import WINDOW
from . import validate

# Bounds of the UNet sizes a config may set (the released UNet: 320 channels, context 1024). Wider
# than any KeyFace-like model; they turn a typo (10**9 channels, -32) into a clear error instead of
# torch's "storage size overflowed" / "negative dimension" while the network is built.
MAX_WIDTH = 16384
_INT_RANGES = {
    "in_channels": (1, 64), "out_channels": (1, 64), "adm_in_channels": (0, MAX_WIDTH),
    "model_channels": (1, MAX_WIDTH), "num_res_blocks": (1, 16), "context_dim": (1, MAX_WIDTH),
    "audio_dim": (0, MAX_WIDTH), "num_frames": (1, 1024), "max_ddpm_temb_period": (1, 10**9),
}
_MAX_LEVELS = 8


def _int_list(name, value, low, high, max_len=_MAX_LEVELS, allow_empty=False) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of integers, got {value!r}")
    if len(value) > max_len or (not value and not allow_empty):
        raise ValueError(f"{name}: expected 1..{max_len} integers, got {len(value)}")
    return tuple(validate.integer(f"{name}[{i}]", v, low, high) for i, v in enumerate(value))


def _check_types(cfg) -> None:
    """Every field's type and range (the errors name the field), before the derived checks."""
    def fix(name, value):
        object.__setattr__(cfg, name, value)

    for name, (low, high) in _INT_RANGES.items():
        fix(name, validate.integer(name, getattr(cfg, name), low, high))
    for name, high in (("num_head_channels", MAX_WIDTH), ("num_heads", 1024)):
        value = getattr(cfg, name)
        fix(name, -1 if value == -1 and not isinstance(value, bool) else validate.integer(f"{name} (or -1)", value, 1, high))
    fix("channel_mult", _int_list("channel_mult", cfg.channel_mult, 1, 64))
    fix("attention_resolutions", _int_list("attention_resolutions", cfg.attention_resolutions, 1, 2**10,
                                           allow_empty=True))
    depth = cfg.transformer_depth
    fix("transformer_depth", _int_list("transformer_depth", depth, 1, 64) if isinstance(depth, (list, tuple))
        else validate.integer("transformer_depth", depth, 1, 64))
    if cfg.transformer_depth_middle is not None:
        fix("transformer_depth_middle", validate.integer("transformer_depth_middle", cfg.transformer_depth_middle, 1, 64))
    k = cfg.video_kernel_size
    fix("video_kernel_size", _int_list("video_kernel_size", k, 1, 31, max_len=3) if isinstance(k, (list, tuple))
        else (validate.integer("video_kernel_size", k, 1, 31),) * 3)


@dataclass(frozen=True)
class UNetConfig:
    """VideoUNet hyper-parameters (spec 4.4). ``adm_in_channels`` is the YAML value, *without*
    the audio token the network adds to it: ``label_emb`` takes ``label_emb_in`` inputs."""

    in_channels: int
    adm_in_channels: int
    model_channels: int = 320
    out_channels: int = 4
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    num_heads: int = -1
    transformer_depth: Union[int, Tuple[int, ...]] = 1
    transformer_depth_middle: Optional[int] = None
    context_dim: int = 1024
    audio_dim: int = 1024
    num_frames: int = WINDOW
    video_kernel_size: Tuple[int, int, int] = (3, 1, 1)
    max_ddpm_temb_period: int = 10000

    def __post_init__(self):
        try:
            _check_types(self)
        except ValueError as e:
            raise ValueError(f"invalid UNetConfig: {e}") from None
        problems = []
        if not self.channel_mult or min(self.channel_mult) < 1:
            problems.append(f"channel_mult must be a non-empty list of positive ints, got {list(self.channel_mult)}")
        if self.num_res_blocks < 1:
            problems.append(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        widths = {self.model_channels * m for m in self.channel_mult}
        if any(w % 32 for w in widths):
            problems.append(f"every model_channels * channel_mult must be divisible by 32 (GroupNorm), got {sorted(widths)}")
        if self.num_head_channels == -1 and self.num_heads < 1:
            problems.append("one of num_head_channels or num_heads must be set")
        if not isinstance(self.transformer_depth, int) and len(self.transformer_depth) != len(self.channel_mult):
            problems.append(f"transformer_depth needs one entry per level ({len(self.channel_mult)}), got {list(self.transformer_depth)}")
        if len(self.video_kernel_size) != 3 or any(v < 1 or v % 2 == 0 for v in self.video_kernel_size):
            problems.append(f"video_kernel_size must be 3 odd sizes, got {list(self.video_kernel_size)}")
        if self.in_channels < 1 or self.out_channels < 1 or self.context_dim < 1:
            problems.append("in_channels, out_channels and context_dim must be positive")
        if self.adm_in_channels < 0 or self.audio_dim < 0:
            problems.append("adm_in_channels and audio_dim must be >= 0")
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    # ---------------------------------------------------------------------------------- derived
    @property
    def label_emb_in(self) -> int:
        """Input width of ``label_emb``: the conditioning vector followed by one audio token."""
        return self.adm_in_channels + self.audio_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def depth_at(self, level: int) -> int:
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def depth_middle(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.depth_at(len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> Tuple[int, int]:
        """(heads, head_dim) of a transformer on ``channels`` channels, as the original derives them."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    # ------------------------------------------------------------------------------- from YAML
    @classmethod
    def from_original(cls, params: dict) -> "UNetConfig":
        """Build from an original ``network_config.params`` dict (see module docstring)."""
        if not isinstance(params, dict):
            raise ValueError(f"network_config.params must be a dict, got {type(params).__name__}")
        own = {f.name for f in fields(cls)}
        unknown = sorted(k for k in params if k not in own and k not in INERT_PARAMS and k not in REQUIRED_VALUES)
        if unknown:
            raise ValueError(f"network_config.params: unknown key(s) {unknown}; known keys are "
                             f"{sorted(own | set(INERT_PARAMS) | set(REQUIRED_VALUES))}")
        bad = []
        for key, (default, allowed, why) in REQUIRED_VALUES.items():
            value = params.get(key, default)
            if value not in allowed:
                shown = f"{key}={value!r}" + ("" if key in params else " (the original default)")
                bad.append(f"{shown}: needs {' or '.join(map(repr, allowed))}, {why}")
        if bad:
            raise ValueError("network_config.params: unsupported value(s): " + "; ".join(bad))
        missing = [k for k in _REQUIRED_KEYS if params.get(k) is None]
        if missing:
            raise ValueError(f"network_config.params: missing required key(s) {missing}")
        kwargs = dict(_ORIGINAL_DEFAULTS)
        kwargs.update({k: v for k, v in params.items() if k in own and v is not None})
        return cls(**kwargs)


# Constructor arguments without a default in the original VideoUNet (context_dim is asserted).
_REQUIRED_KEYS = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
                  "context_dim")

# The original VideoUNet's defaults where they differ from the released values (missing keys).
_ORIGINAL_DEFAULTS = {
    "channel_mult": (1, 2, 4, 8),
    "num_head_channels": -1,
    "num_heads": -1,
    "transformer_depth": 1,
    "adm_in_channels": 0,
    "audio_dim": 0,
    "video_kernel_size": 3,
    "max_ddpm_temb_period": 10000,
}

# Keys of the original VideoUNet that do not change the inference network (any value accepted).
INERT_PARAMS = {
    "use_checkpoint": "gradient checkpointing, training only",
    "dropout": "no dropout at inference",
    "unfreeze_blocks": "only changes requires_grad",
    "merge_factor": "initial value of the learned mix factors",
    "time_context_dim": "replaced by context_dim when use_spatial_context is set",
    "num_heads_upsample": "unused by VideoUNet",
    "adapter_kwargs": "only read when a fine_tuning_method builds adapters",
    "extra_ff_mix_layer": "the temporal blocks get ff_in either way (they are given an inner_dim)",
}

# Keys whose value must be the released one (other values build a different network):
# key -> (the original's default, accepted values, what the accepted value means).
REQUIRED_VALUES = {
    "num_classes": (None, ("sequential",), "label_emb is the 'sequential' MLP"),
    "spatial_transformer_attn_type": ("softmax", ("softmax-xformers", "softmax"), "exact softmax attention"),
    "use_linear_in_transformer": (False, (True,), "proj_in/proj_out are Linear layers"),
    "use_spatial_context": (False, (True,), "the temporal transformers attend to the audio context"),
    "merge_strategy": ("fixed", ("learned_with_images",), "alpha = sigmoid(mix_factor)"),
    "fine_tuning_method": (None, (None,), "no adapters"),
    "audio_cond_method": (None, ("both_keyframes",), "audio as context and through label_emb"),
    "additional_audio_frames": (0, (0,), "one audio token per frame"),
    "use_scale_shift_norm": (False, (False,), "additive time embedding"),
    "resblock_updown": (False, (False,), "conv Downsample/Upsample"),
    "conv_resample": (True, (True,), "conv Downsample/Upsample"),
    "dims": (2, (2,), "2-D UNet"),
    "time_downup": (False, (False,), "no temporal down/upsampling"),
    "disable_temporal_crossattention": (False, (False,), "temporal blocks have attn2"),
    "skip_time": (False, (False,), "temporal layers present"),
    "use_ada_aug": (False, (False,), "no map_aug"),
    "encode_landmarks": (False, (False,), "no FaceLocator"),
    "reference_to": (None, (None,), "no reference attention"),
}

KEYFRAME_UNET = UNetConfig(in_channels=8, adm_in_channels=512)
INTERPOLATION_UNET = replace(KEYFRAME_UNET, in_channels=9, adm_in_channels=0)

# Attention backend setting (RenderSettings.attention, the CLI, the sampler nodes) -> the member of
# torch.nn.attention.SDPBackend it selects ("auto": torch picks per call). Kept here, torch-free, so
# the CLI and the nodes' INPUT_TYPES list the names without importing torch.
ATTENTION_BACKENDS = {
    "auto": None,
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
