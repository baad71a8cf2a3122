"""Engine configuration: the UNet / wrapper / audio projection sizes of each engine, from a config
(original parameter names, flat or in the original YAML's sections) and the checkpoint's shapes.

No file is read here (:mod:`keyface.loading` reads them); :func:`build_keyframe_network` and
:func:`build_interpolation_network` make unloaded networks (``device='meta'`` for layouts and counts).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re

from .checkpoints import CheckpointError
from .config import INERT_PARAMS, INTERPOLATION_UNET, KEYFRAME_UNET, REQUIRED_VALUES, UNetConfig
from .networks import RELEASED_AUDIO_FEATURE_DIM, RELEASED_MASK_HW, InterpolationNetwork, KeyframeNetwork

# Checkpoint key layout of the engine files (spec 6.1).
UNET_PREFIX = "model.diffusion_model."
MASK_KEY = "model.learned_mask"
BAD_NETWORK_PREFIX = "denoiser.bad_network."  # an autoguidance network stored inside the engine file
KEYFRAME_AUDIO_EMBEDDER = 3  # conditioner.embedders.3 = audio_emb (released keyframe.yaml)
INTERPOLATION_AUDIO_EMBEDDER = 1  # conditioner.embedders.1 = audio_emb (released interpolation.yaml)

log = logging.getLogger(__name__)

# Top-level keys of an original config (``model.params`` of the reference YAML). The networks are
# built from NETWORK_SECTIONS; the other keys configure the denoiser, the sampler and the VAE. A
# config holding any of them is read in the nested form.
NETWORK_SECTIONS = ("network_config", "network_wrapper", "conditioner_config")
ORIGINAL_OTHER_KEYS = ("denoiser_config", "first_stage_config", "sampler_config", "scale_factor")
# InterpolationWrapper parameters (network_wrapper.params, or flat): the learned mask's size.
WRAPPER_KEYS = ("im_size", "n_channels")
# Our own sidecar key (output pixels, read by keyface.model_files.resolution_of); no network effect.
OWN_KEYS = ("resolution",)
_NETWORK_PARAM_KEYS = frozenset(f.name for f in dataclasses.fields(UNetConfig)) | set(INERT_PARAMS) | set(REQUIRED_VALUES)


def _emb_models(config):
    cond = (config or {}).get("conditioner_config") or {}
    return (cond.get("params") or {}).get("emb_models") or []


def audio_embedder_from_config(config, default_index):
    """(index, feature_dim, context_dim) of the audio_emb embedder in an original conditioner_config."""
    for i, emb in enumerate(_emb_models(config)):
        if emb.get("input_key") == "audio_emb":
            p = emb.get("params") or {}
            return i, p.get("audio_dim"), p.get("linear_dim")
    return default_index, None, None


def _section_params(config, key) -> dict:
    """``config[key]`` as a parameter dict: ``{"target", "params"}`` (original) or the parameters themselves."""
    section = config.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"config[{key!r}] must be a dict, got {type(section).__name__}")
    params = section.get("params", {}) if ("params" in section or "target" in section) else section
    if not isinstance(params, dict):
        raise ValueError(f"config[{key!r}]['params'] must be a dict, got {type(params).__name__}")
    return params


def _split_config(config, flat_known: frozenset):
    """Read an engine config in either form -> (network params, complete: bool, wrapper params).

    * flat: original parameter names at the top level (``{"model_channels": 64, "im_size": [256, 256]}``);
      every key must be known.
    * nested: the original config's sections (``network_config``, ``network_wrapper``,
      ``conditioner_config``, ...). Other top-level keys are the original's training/sampling
      settings and are not read, except original parameter names, which override the sections, and
      near-misspellings of a known key, which are refused.

    ``complete`` is True for a ``network_config`` with a ``target`` (copied from an original YAML):
    it is read exactly as the original reads it, with the original VideoUNet's own defaults.
    """
    if config is None:
        return {}, False, {}
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of original parameters, got {type(config).__name__}")
    sections = NETWORK_SECTIONS + ORIGINAL_OTHER_KEYS
    flat = {k: v for k, v in config.items() if k in flat_known}
    if not any(k in config for k in sections):
        unknown = sorted(k for k in config if k not in flat_known)
        if unknown:
            why = (" (im_size and n_channels size the interpolation network's learned mask; the keyframe network "
                   "has none)" if set(unknown) & set(WRAPPER_KEYS) else _did_you_mean(unknown, flat_known | set(sections)))
            raise ValueError(
                f"config: unknown key(s) {unknown}{why}; known "
                f"keys are the original sections {list(sections)} or these parameters: {sorted(flat_known)}"
            )
    else:
        near = [k for k in config if k not in flat_known and k not in sections
                and difflib.get_close_matches(k, list(flat_known) + list(sections), n=1, cutoff=0.9)]
        if near:
            raise ValueError(f"config: unknown key(s) {sorted(near)}{_did_you_mean(near, flat_known | set(sections))}")
    complete = "target" in (config.get("network_config") or {})
    params = {**_section_params(config, "network_config"), **{k: v for k, v in flat.items() if k in _NETWORK_PARAM_KEYS}}
    wrapper = {**_section_params(config, "network_wrapper"), **{k: v for k, v in flat.items() if k in WRAPPER_KEYS}}
    return params, complete, wrapper


def _did_you_mean(unknown, known) -> str:
    hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.8))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _released_params(released: UNetConfig) -> dict:
    """The released architecture as an original ``network_config.params`` dict (switches included)."""
    params = {f.name: getattr(released, f.name) for f in dataclasses.fields(UNetConfig)}
    params.update({k: allowed[0] for k, (_, allowed, _) in REQUIRED_VALUES.items()})
    return params


def _unet_config(params: dict, complete: bool, released: UNetConfig, unet_sd: dict) -> UNetConfig:
    """The UNet: a complete original network_config as is; otherwise the released architecture,
    updated with the sizes the checkpoint's shapes determine, then with ``params``."""
    if complete:
        return UNetConfig.from_original(dict(params))
    inferred = _match_released_types(released, _infer_unet_params(unet_sd)) if unet_sd else {}
    given = {k: v for k, v in params.items() if v is not None}  # None: keep the default
    if "num_heads" in given and "num_head_channels" not in given:
        given["num_head_channels"] = -1  # as in the original: a head count replaces the released head size
    cfg = UNetConfig.from_original({**_released_params(released), **inferred, **given})
    if inferred and not {"num_head_channels", "num_heads"} & given.keys():
        _check_assumed_head_size(cfg)
    return cfg


def _check_assumed_head_size(cfg: UNetConfig):
    """A checkpoint of another size whose config is unknown: the attention head size cannot be read
    from the weights, so the released one is assumed (refused where it cannot divide the widths)."""
    attn_widths = sorted({cfg.model_channels * m for lv, m in enumerate(cfg.channel_mult) if 2**lv in cfg.attention_resolutions})
    how = ("pass config={'num_head_channels': N} (or the model's original network_config) to the loader, "
           "or put it in a sidecar <checkpoint>.json")
    if cfg.num_head_channels > 0 and any(w % cfg.num_head_channels for w in attn_widths):
        raise CheckpointError(
            f"this checkpoint's UNet is not the released size (attention widths {attn_widths}), and its attention "
            f"head size cannot be read from the weights (released: num_head_channels={cfg.num_head_channels}, which "
            f"does not divide them); {how}"
        )
    log.warning(
        "this checkpoint's UNet is not the released size (model_channels=%d, channel_mult=%s); its attention head "
        "size cannot be read from the weights, so the released num_head_channels=%d was assumed. If the model was "
        "trained with another, %s.", cfg.model_channels, list(cfg.channel_mult), cfg.num_head_channels, how,
    )


def _infer_unet_params(unet_sd: dict) -> dict:
    """Sizes that the checkpoint's shapes determine unambiguously (original parameter names)."""
    out = {}
    w0 = unet_sd.get("input_blocks.0.0.weight")
    if w0 is None or w0.dim() != 4:
        return out
    out["model_channels"] = int(w0.shape[0])
    out["in_channels"] = int(w0.shape[1])
    wo = unet_sd.get("out.2.weight")
    if wo is not None:
        out["out_channels"] = int(wo.shape[0])
    ctx = [v for k, v in unet_sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    if ctx:
        out["context_dim"] = int(ctx[0].shape[1])
        out["audio_dim"] = int(ctx[0].shape[1])  # the audio tokens are the context (spec 4.4)
        lab = unet_sd.get("label_emb.0.0.weight")
        if lab is not None:
            out["adm_in_channels"] = int(lab.shape[1]) - out["audio_dim"]
    # structure: levels from the Downsample ops, res blocks per level, attention levels, depth
    blocks = {}
    for k in unet_sd:
        m = re.match(r"input_blocks\.(\d+)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add((int(m.group(2)), k[m.end():].split(".")[0]))
    if not blocks:
        return out
    level, res_in_level, mult, attn_levels, per_level = 0, 0, [], set(), []
    for i in sorted(b for b in blocks if b > 0):
        parts = blocks[i]
        if any(name == "op" for _, name in parts):
            per_level.append(res_in_level)
            level, res_in_level = level + 1, 0
            continue
        res_in_level += 1
        w = unet_sd.get(f"input_blocks.{i}.0.in_layers.2.weight")
        if res_in_level == 1 and w is not None:
            mult.append(int(w.shape[0]) // out["model_channels"])
        if any(idx == 1 for idx, _ in parts):
            attn_levels.add(level)
    per_level.append(res_in_level)
    if len(set(per_level)) == 1 and mult and len(mult) == len(per_level):
        out["num_res_blocks"] = per_level[0]
        out["channel_mult"] = mult
        out["attention_resolutions"] = sorted(2**lv for lv in attn_levels)
        depth = {int(m.group(1)) for k in unet_sd if (m := re.match(r"input_blocks\.\d+\.1\.transformer_blocks\.(\d+)\.", k))}
        if depth:
            out["transformer_depth"] = max(depth) + 1
    return out


def _engine_config(config, state_dict, released, default_embedder, flat_known):
    """(UNetConfig, audio_feature_dim, audio_embedder_index, wrapper params) of one engine."""
    state_dict = state_dict or {}
    params, complete, wrapper = _split_config(config, flat_known)
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    unet_cfg = _unet_config(params, complete, released, unet_sd)
    idx, feat, _ = audio_embedder_from_config(config, default_embedder)
    if feat is None:
        w = state_dict.get(f"conditioner.embedders.{idx}.linear.weight")
        feat = int(w.shape[1]) if w is not None else RELEASED_AUDIO_FEATURE_DIM
    return unet_cfg, int(feat), idx, wrapper


def keyframe_network_config(config=None, state_dict=None):
    """(UNetConfig, audio_feature_dim, audio_embedder_index) for the keyframe engine.

    ``config`` (see :func:`load_keyframe_network`) overrides the released architecture; sizes it does
    not set come from ``state_dict``'s shapes where they differ from the released ones.
    """
    unet_cfg, feat, idx, _ = _engine_config(config, state_dict, KEYFRAME_UNET, KEYFRAME_AUDIO_EMBEDDER,
                                            _NETWORK_PARAM_KEYS | set(OWN_KEYS))
    return unet_cfg, feat, idx


def interpolation_network_config(config=None, state_dict=None):
    """(UNetConfig, audio_feature_dim, audio_embedder_index, mask_hw, n_channels) for the interpolation engine.

    As :func:`keyframe_network_config`, plus the InterpolationWrapper's ``im_size`` (pixels; the learned
    mask is im_size / 8) and ``n_channels``, from the config, else the checkpoint's mask, else released.
    """
    unet_cfg, feat, idx, wrapper = _engine_config(config, state_dict, INTERPOLATION_UNET, INTERPOLATION_AUDIO_EMBEDDER,
                                                  _NETWORK_PARAM_KEYS | set(OWN_KEYS) | set(WRAPPER_KEYS))
    m = (state_dict or {}).get(MASK_KEY)
    n_channels = int(wrapper.get("n_channels", m.shape[0] if m is not None else 4))
    if "im_size" in wrapper:
        mask_hw = _mask_hw(wrapper["im_size"])
    else:
        mask_hw = tuple(int(s) for s in m.shape[-2:]) if m is not None else RELEASED_MASK_HW
    return unet_cfg, feat, idx, mask_hw, n_channels


def _mask_hw(im_size) -> tuple:
    """InterpolationWrapper ``im_size`` ([height, width] pixels) -> the learned mask's latent size."""
    if (not isinstance(im_size, (list, tuple)) or len(im_size) != 2
            or not all(isinstance(s, int) and s > 0 and s % 8 == 0 for s in im_size)):
        raise ValueError(f"config: im_size must be [height, width] in pixels, multiples of 8, got {im_size!r}")
    return tuple(s // 8 for s in im_size)


def _match_released_types(released, inferred: dict) -> dict:
    """Only the inferred values that differ from the released config (attention levels as a set)."""
    out = {}
    for k, v in inferred.items():
        cur = getattr(released, k, None)
        if k == "attention_resolutions" and cur is not None and set(cur) == set(v):
            continue
        if isinstance(cur, tuple) and isinstance(v, list):
            v = tuple(v)
        if v != cur:
            out[k] = v
    return out


def build_keyframe_network(config=None, audio_feature_dim=None, dtype=None, device=None, operations=None):
    """A keyframe network with the released (or ``config``'s) sizes, not loaded (``device='meta'`` for layouts)."""
    unet_cfg, feat, _ = keyframe_network_config(config)
    return KeyframeNetwork(unet_cfg, audio_feature_dim or feat, dtype=dtype, device=device, operations=operations)


def build_interpolation_network(config=None, with_audio_projection=True, dtype=None, device=None, operations=None):
    """An interpolation network with the released (or ``config``'s) sizes, not loaded."""
    unet_cfg, feat, _, mask_hw, n_ch = interpolation_network_config(config)
    return InterpolationNetwork(
        unet_cfg, mask_hw, n_ch, feat if with_audio_projection else None, dtype=dtype, device=device, operations=operations
    )
