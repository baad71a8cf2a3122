"""The two KeyFace networks and their loaders (spec 4.1-4.4, 5.1, 6).

* :class:`KeyframeNetwork`: ``OpenAIWrapper(VideoUNet)`` + the keyframe audio projection.
* :class:`InterpolationNetwork`: ``InterpolationWrapper(VideoUNet)`` with its ``learned_mask``, + the
  interpolation audio projection (``None`` for the autoguidance "bad" network, whose own projection
  the original ignores).

Both expose ``denoise(x, sigma, concat=..., crossattn=..., [vector=...])`` = the engine denoiser
D = c_skip x + c_out F(wrapper input, c_noise, ...) of ``VScalingWithEDMcNoise`` (spec 5.1); the
guidance schemes in :mod:`keyface.diffusion` batch the calls.

The loaders read files through :mod:`keyface.checkpoints` and account for every key with a
:class:`~keyface.checkpoints.KeyLedger`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, KeyLedger, read_state_dict
from .conditioning import AudioProjection
from .config import _INERT, _REQUIRED_VALUES, INTERPOLATION_UNET, KEYFRAME_UNET, UNetConfig
from .diffusion import _row_scalings
from .model_files import read_sidecar, sidecar_path
from .unet import VideoUNet

UNET_PREFIX = "model.diffusion_model."
MASK_KEY = "model.learned_mask"
BAD_NETWORK_PREFIX = "denoiser.bad_network."  # an autoguidance network stored inside the engine file
KEYFRAME_AUDIO_EMBEDDER = 3  # conditioner.embedders.3 = audio_emb (released keyframe.yaml)
INTERPOLATION_AUDIO_EMBEDDER = 1  # conditioner.embedders.1 = audio_emb (released interpolation.yaml)
RELEASED_AUDIO_FEATURE_DIM = 1536  # [WavLM|BEATs] or [wav2vec2|BEATs], spec 2.1 / 2.6
RELEASED_MASK_HW = (64, 64)  # 512x512 pixels / 8, spec 4.3

IGNORED_PREFIXES = (
    ("first_stage_model.decoder.", "VAE decoder, loaded by keyface.vae.load_vae"),
    ("first_stage_model.encoder.", "VAE encoder, unused at inference (identity latents come pre-encoded)"),
    ("conditioner.embedders.0.encoder.", "the conditioner's VAE encoder, unused when latents are given"),
)


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


class _EngineBase(nn.Module):
    #: dtype the UNet runs in; None -> the dtype of its weights. Hosts that keep weights in one dtype
    #: and cast them per layer (ComfyUI manual_cast) set this to the intended compute dtype.
    compute_dtype = None

    def _compute_dtype(self):
        if self.compute_dtype is not None:
            return self.compute_dtype
        for p in self.diffusion_model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _run_unet(self, x_in, c_noise, context, y, frames):
        dtype = self._compute_dtype()
        return self.diffusion_model(
            x_in.to(dtype),
            c_noise,  # float32 (see keyface.diffusion._row_scalings)
            context.to(dtype),
            y=None if y is None else y.to(dtype),
            num_video_frames=frames,
        )


class KeyframeNetwork(_EngineBase):
    """Keyframe engine: ``diffusion_model`` (VideoUNet, 8 input channels) + ``audio_projection``."""

    def __init__(self, unet_config, audio_feature_dim: int = RELEASED_AUDIO_FEATURE_DIM, dtype=None, device=None, operations=None):
        super().__init__()
        self.unet_config = unet_config
        self.diffusion_model = VideoUNet(unet_config, dtype=dtype, device=device, operations=operations)
        self.audio_projection = AudioProjection(
            audio_feature_dim, unet_config.context_dim, dtype=dtype, device=device, operations=operations
        )

    def denoise(self, x, sigma, *, concat, crossattn, vector):
        """D(x; sigma) for rows = videos x 14 frames.

        x [B*T, 4, h, w] (scaled latent space); sigma scalar or [B*T]; concat [B, 4, h, w] (already
        ÷ 0.18215, not scaled by c_in); crossattn [B, T, D]; vector [B*T, 512].
        """
        rows = x.shape[0]
        videos = concat.shape[0]
        if rows % videos:
            raise ValueError(f"keyframe denoiser: {rows} rows do not split into {videos} videos")
        frames = rows // videos
        c_skip, c_out, c_in, c_noise = _row_scalings(sigma, rows, x)
        x_in = torch.cat([x * c_in, concat.to(x).repeat_interleave(frames, dim=0)], dim=1)
        f = self._run_unet(x_in, c_noise, crossattn, vector, frames).to(x.dtype)
        return f * c_out + x * c_skip


class InterpolationNetwork(_EngineBase):
    """Interpolation engine: ``diffusion_model`` (9 input channels), ``learned_mask`` [4, h, w] and
    ``audio_projection`` (``None`` for the autoguidance bad network)."""

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

    def wrapper_input(self, x_scaled_in, concat, frames: int):
        """InterpolationWrapper input: [c_in x (4) | start, M x (T-2), end (4) | mask 1, 0 x (T-2), 1 (1)]."""
        rows, c, h, w = x_scaled_in.shape
        segments = concat.shape[0]
        if rows != segments * frames:
            raise ValueError(f"interpolation: {rows} rows for {segments} segments of {frames} frames")
        mask = self.learned_mask
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(
                f"interpolation: latent size {h}x{w} does not match the model's learned mask "
                f"{mask.shape[-2]}x{mask.shape[-1]} (the released model works at "
                f"{mask.shape[-2] * 8}x{mask.shape[-1] * 8} pixels)"
            )
        concat = concat.to(x_scaled_in)
        start, end = concat[:, :c], concat[:, c:]
        middle = mask.to(x_scaled_in)[None, None].expand(segments, frames - 2, c, h, w)
        cond_seq = torch.cat([start[:, None], middle, end[:, None]], dim=1).reshape(rows, c, h, w)
        flag = torch.zeros(segments, frames, 1, h, w, dtype=x_scaled_in.dtype, device=x_scaled_in.device)
        flag[:, 0] = 1
        flag[:, -1] = 1
        return torch.cat([x_scaled_in, cond_seq, flag.reshape(rows, 1, h, w)], dim=1)

    def denoise(self, x, sigma, *, concat, crossattn):
        """D(x; sigma) for rows = segments x 14 frames; concat [S, 8, h, w] = [start | end] ÷ 0.18215."""
        rows = x.shape[0]
        segments = concat.shape[0]
        if rows % segments:
            raise ValueError(f"interpolation denoiser: {rows} rows do not split into {segments} segments")
        frames = rows // segments
        c_skip, c_out, c_in, c_noise = _row_scalings(sigma, rows, x)
        x_in = self.wrapper_input(x * c_in, concat, frames)
        f = self._run_unet(x_in, c_noise, crossattn, None, frames).to(x.dtype)
        return f * c_out + x * c_skip


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

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
_NETWORK_PARAM_KEYS = frozenset(f.name for f in dataclasses.fields(UNetConfig)) | set(_INERT) | set(_REQUIRED_VALUES)


def _emb_models(config):
    cond = (config or {}).get("conditioner_config") or {}
    return (cond.get("params") or {}).get("emb_models") or []


def _audio_embedder_from_config(config, default_index):
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
    params.update({k: allowed[0] for k, (_, allowed, _) in _REQUIRED_VALUES.items()})
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
    idx, feat, _ = _audio_embedder_from_config(config, default_embedder)
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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _source_state_dict(source):
    if isinstance(source, dict):
        return dict(source), "<state dict>"
    path = Path(source)
    return read_state_dict(path), str(path)


def _config_or_sidecar(source, config, validate):
    """``config``, else the sidecar ``<checkpoint>.json`` beside a file ``source`` (see
    :mod:`keyface.model_files`), else None (the released architecture / the checkpoint's shapes).

    A sidecar is checked with ``validate`` here, so that an error names the file: a ``<model>.json``
    may also be another tool's metadata."""
    if config is not None or isinstance(source, dict):
        return config
    sidecar = read_sidecar(source)
    if sidecar is not None:
        try:
            validate(sidecar)
        except ValueError as e:
            raise ValueError(f"sidecar config {sidecar_path(source)}: {e} (if this .json belongs to another tool, "
                             "move it away or pass config= to the loader)") from e
    return sidecar


def _identify(sd: dict) -> str:
    """'keyframe' / 'interpolation' / 'unknown' from the keys and the input channel count."""
    if MASK_KEY in sd:
        return "interpolation"
    w = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if w is not None and w.dim() == 4:
        return {8: "keyframe", 9: "interpolation"}.get(int(w.shape[1]), "unknown")
    return "unknown"


def _check_kind(sd, name, expected: str, role: str):
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        vae_like = any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in sd)
        what = "looks like a VAE file" if vae_like else "has no model.diffusion_model.* keys"
        raise CheckpointError(f"{name}: not a KeyFace {role} file: it {what}")
    kind = _identify(sd)
    if kind != expected and kind != "unknown":
        loader = "load_keyframe_network" if kind == "keyframe" else "load_interpolation_networks"
        evidence = (
            "it has model.learned_mask" if MASK_KEY in sd else
            f"its first convolution takes {sd[UNET_PREFIX + 'input_blocks.0.0.weight'].shape[1]} input channels"
        )
        raise CheckpointError(
            f"{name} is the KeyFace {kind} model ({evidence}), but the {role} was expected here; "
            f"load it with keyface.engines.{loader} (in ComfyUI: put it in the {kind} model slot)"
        )


def _materialise(module: nn.Module, tensors: dict, name: str, dtype, device):
    """Load ``tensors`` strictly into a module built on ``meta`` (assign), then move/cast; the
    module is returned in eval mode without gradients (inference only)."""
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: the weights do not fit the network: {err}") from None
    # non-persistent buffers are not in any state dict: they must not stay on meta
    leftovers = [
        n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta and n not in tensors
    ]
    if leftovers:
        raise CheckpointError(f"{name}: no weights for {leftovers[:10]}")
    if device is not None:
        module.to(device)
    return module.eval().requires_grad_(False)


def _ignore_common(ledger: KeyLedger):
    for prefix, why in IGNORED_PREFIXES:
        ledger.ignore(prefix, why)


def _take_projection(ledger: KeyLedger, index: int, name: str):
    proj = ledger.take(f"conditioner.embedders.{index}.linear.")
    if not proj:
        raise CheckpointError(
            f"{name}: the audio projection conditioner.embedders.{index}.linear.* is missing; "
            "is this a complete KeyFace engine file?"
        )
    return {f"linear.{k}": v for k, v in proj.items()}


def load_keyframe_network(source, config=None, dtype=None, device=None, operations=None) -> KeyframeNetwork:
    """Load the keyframe engine (``.pt`` DeepSpeed / ``.ckpt`` / ``.bin`` / ``.safetensors``, or a state dict).

    The architecture is the released one, overridden by ``config``, which uses the original parameter
    names, either flat (``{"model_channels": 64, "num_head_channels": 32}``) or in the original config's
    sections (``network_config`` [``params``], ``conditioner_config``); unknown keys are refused. A
    ``network_config`` with a ``target`` (copied from an original YAML) is read as the original reads it.
    ``config=None`` with a file ``source``: the sidecar ``<checkpoint>.json`` beside it when there is one
    (:mod:`keyface.model_files`). Sizes no config sets are read from the checkpoint's shapes; the
    attention head size cannot be, so for a checkpoint of another size the released
    ``num_head_channels=64`` is assumed, with a logged warning (set ``num_head_channels`` to override).
    The returned network's ``ignored_keys`` maps each unused key of the file to the reason.
    """
    config = _config_or_sidecar(source, config, keyframe_network_config)
    sd, name = _source_state_dict(source)
    _check_kind(sd, name, "keyframe", "keyframe model")
    unet_cfg, feat, idx = keyframe_network_config(config, sd)
    ledger = KeyLedger(sd, name)
    unet = ledger.take(UNET_PREFIX)
    proj = _take_projection(ledger, idx, name)
    _ignore_common(ledger)
    ledger.finish(hint="These keys are not part of the KeyFace keyframe engine; is this the right file?")
    net = KeyframeNetwork(unet_cfg, feat, dtype=dtype, device="meta", operations=operations)
    tensors = {f"diffusion_model.{k}": v for k, v in unet.items()}
    tensors.update({f"audio_projection.{k}": v for k, v in proj.items()})
    net = _materialise(net, tensors, name, dtype, device or "cpu")
    net.ignored_keys = dict(ledger.ignored)
    return net


def _load_interp(sd, name, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad: bool, ignore=()):
    ledger = KeyLedger(sd, name)
    for prefix, why in ignore:
        ledger.ignore(prefix, why)
    unet = ledger.take(UNET_PREFIX)
    mask = ledger.take_key(MASK_KEY)
    if mask is None:
        raise CheckpointError(f"{name}: model.learned_mask is missing (needed by the interpolation wrapper)")
    if bad:
        ledger.ignore(
            f"conditioner.embedders.{idx}.linear.",
            "the bad network's own audio projection; the original ignores it (both networks use the main engine's conditioning)",
        )
        proj = {}
    else:
        proj = _take_projection(ledger, idx, name)
    _ignore_common(ledger)
    ledger.finish(hint="These keys are not part of the KeyFace interpolation engine; is this the right file?")
    net = InterpolationNetwork(
        unet_cfg, mask_hw, n_ch, None if bad else feat, dtype=dtype, device="meta", operations=operations
    )
    tensors = {f"diffusion_model.{k}": v for k, v in unet.items()}
    tensors["learned_mask"] = mask
    tensors.update({f"audio_projection.{k}": v for k, v in proj.items()})
    net = _materialise(net, tensors, name, dtype, device or "cpu")
    net.ignored_keys = dict(ledger.ignored)
    return net


def load_interpolation_networks(source, bad_source=None, config=None, dtype=None, device=None, operations=None):
    """Load the interpolation engine and its autoguidance bad network -> ``(good, bad)``.

    ``bad_source``: the ``interpolation_bad.pt`` file (only ``model.diffusion_model.*`` and
    ``model.learned_mask`` are used, as in the original). ``None``: the bad network embedded in
    ``source`` as ``denoiser.bad_network.*`` when there is one, else ``bad`` is ``None`` (autoguidance
    then cannot run). Both networks have the architecture of ``config`` (as in
    :func:`load_keyframe_network`, plus the InterpolationWrapper's ``im_size`` and ``n_channels``; the
    sidecar of ``source`` when ``config`` is None). ``ignored_keys`` on each network: as there; embedded
    ``denoiser.bad_network.*`` keys appear in the good network's, superseded when ``bad_source`` is given.
    """
    config = _config_or_sidecar(source, config, interpolation_network_config)
    sd, name = _source_state_dict(source)
    embedded_bad = {k[len(BAD_NETWORK_PREFIX):]: v for k, v in sd.items() if k.startswith(BAD_NETWORK_PREFIX)}
    _check_kind(sd, name, "interpolation", "interpolation model")
    if bad_source is not None:
        bsd, bname = _source_state_dict(bad_source)
        _check_kind(bsd, bname, "interpolation", "interpolation bad (autoguidance) model")
        embedded_why = f"an embedded autoguidance network, superseded by bad_source ({bname})"
    elif embedded_bad:
        bsd = {("model." + k): v for k, v in embedded_bad.items()}
        bname = f"{name} ({BAD_NETWORK_PREFIX}*)"
        embedded_why = "the embedded autoguidance network, loaded as the bad network"
    else:
        bsd = None
        embedded_why = None
    unet_cfg, feat, idx, mask_hw, n_ch = interpolation_network_config(config, sd)
    ignore = [(BAD_NETWORK_PREFIX, embedded_why)] if embedded_bad else []
    good = _load_interp(sd, name, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad=False, ignore=ignore)
    bad = None
    if bsd is not None:
        bad = _load_interp(bsd, bname, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad=True)
    return good, bad


def load_audio_projection(source, engine: str, config=None, dtype=None, device=None, operations=None) -> AudioProjection:
    """Only the audio projection (``conditioner.embedders.<i>.linear.*``) of an engine file."""
    default = KEYFRAME_AUDIO_EMBEDDER if engine == "keyframe" else INTERPOLATION_AUDIO_EMBEDDER
    config = _config_or_sidecar(source, config, lambda c: _audio_embedder_from_config(c, default))
    sd, name = _source_state_dict(source)
    idx, _, _ = _audio_embedder_from_config(config, default)
    ledger = KeyLedger(sd, name)
    proj = _take_projection(ledger, idx, name)
    feat, ctx = proj["linear.weight"].shape[1], proj["linear.weight"].shape[0]
    module = AudioProjection(int(feat), int(ctx), dtype=dtype, device="meta", operations=operations)
    return _materialise(module, proj, name, dtype, device or "cpu")


__all__ = [
    "InterpolationNetwork",
    "KeyframeNetwork",
    "build_interpolation_network",
    "build_keyframe_network",
    "interpolation_network_config",
    "keyframe_network_config",
    "load_audio_projection",
    "load_interpolation_networks",
    "load_keyframe_network",
]
