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
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, KeyLedger, read_state_dict
from .conditioning import AudioProjection
from .config import INTERPOLATION_UNET, KEYFRAME_UNET, UNetConfig
from .diffusion import _row_scalings
from .unet import VideoUNet

UNET_PREFIX = "model.diffusion_model."
MASK_KEY = "model.learned_mask"
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


def _unet_config_from(config, released, inferred: dict):
    if config is not None and "network_config" in config:
        params = (config["network_config"] or {}).get("params", config["network_config"])
        return UNetConfig.from_original(dict(params))
    if not inferred:
        return released
    cfg = dataclasses.replace(released, **inferred)
    if cfg.num_head_channels > 0:
        attn_widths = {
            cfg.model_channels * m for lv, m in enumerate(cfg.channel_mult) if 2**lv in cfg.attention_resolutions
        }
        if any(w % cfg.num_head_channels for w in attn_widths):
            raise CheckpointError(
                f"this checkpoint's UNet is not the released size (widths {sorted(attn_widths)}), and its attention "
                f"head size cannot be read from the weights (released: {cfg.num_head_channels}); pass its original "
                "config (network_config.params) to the loader"
            )
    return cfg


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


def _engine_config(config, state_dict, released, default_embedder):
    """(UNetConfig, audio_feature_dim, audio_embedder_index): ``config``'s, else read from the
    checkpoint's shapes where they differ from ``released``, else the released ones."""
    state_dict = state_dict or {}
    if config is None:
        unet_sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
        inferred = _infer_unet_params(unet_sd)
    else:
        inferred = {}
    unet_cfg = _unet_config_from(config, released, _match_released_types(released, inferred))
    idx, feat, _ = _audio_embedder_from_config(config, default_embedder)
    if feat is None:
        w = state_dict.get(f"conditioner.embedders.{idx}.linear.weight")
        feat = int(w.shape[1]) if w is not None else RELEASED_AUDIO_FEATURE_DIM
    return unet_cfg, int(feat), idx


def keyframe_network_config(config=None, state_dict=None):
    """(UNetConfig, audio_feature_dim, audio_embedder_index) for the keyframe engine."""
    return _engine_config(config, state_dict, KEYFRAME_UNET, KEYFRAME_AUDIO_EMBEDDER)


def interpolation_network_config(config=None, state_dict=None):
    """(UNetConfig, audio_feature_dim, audio_embedder_index, mask_hw, n_channels) for the interpolation engine."""
    unet_cfg, feat, idx = _engine_config(config, state_dict, INTERPOLATION_UNET, INTERPOLATION_AUDIO_EMBEDDER)
    wrapper = ((config or {}).get("network_wrapper") or {}).get("params") or {}
    n_channels = int(wrapper.get("n_channels", 4))
    if "im_size" in wrapper:
        mask_hw = tuple(int(s) // 8 for s in wrapper["im_size"])
    else:
        m = (state_dict or {}).get(MASK_KEY)
        mask_hw = tuple(int(s) for s in m.shape[-2:]) if m is not None else RELEASED_MASK_HW
        if m is not None:
            n_channels = int(m.shape[0])
    return unet_cfg, feat, idx, mask_hw, n_channels


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

    ``config``: optional dict in the original YAML format (``network_config``, ``conditioner_config``)
    overriding the released sizes; without it, sizes are inferred from the checkpoint's shapes.
    """
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
    return _materialise(net, tensors, name, dtype, device or "cpu")


def _load_interp(sd, name, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad: bool):
    ledger = KeyLedger(sd, name)
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
    return _materialise(net, tensors, name, dtype, device or "cpu")


def load_interpolation_networks(source, bad_source=None, config=None, dtype=None, device=None, operations=None):
    """Load the interpolation engine and its autoguidance bad network -> ``(good, bad)``.

    ``bad_source``: the ``interpolation_bad.pt`` file (only ``model.diffusion_model.*`` and
    ``model.learned_mask`` are used, as in the original). ``None``: the bad network embedded in
    ``source`` as ``denoiser.bad_network.*`` when there is one, else ``bad`` is ``None`` (autoguidance
    then cannot run).
    """
    sd, name = _source_state_dict(source)
    embedded_bad = {k[len("denoiser.bad_network."):]: v for k, v in sd.items() if k.startswith("denoiser.bad_network.")}
    if embedded_bad:
        sd = {k: v for k, v in sd.items() if not k.startswith("denoiser.bad_network.")}
    _check_kind(sd, name, "interpolation", "interpolation model")
    if bad_source is not None:
        bsd, bname = _source_state_dict(bad_source)
        _check_kind(bsd, bname, "interpolation", "interpolation bad (autoguidance) model")
    elif embedded_bad:
        bsd = {("model." + k): v for k, v in embedded_bad.items()}
        bname = f"{name} (denoiser.bad_network.*)"
    else:
        bsd = None
    unet_cfg, feat, idx, mask_hw, n_ch = interpolation_network_config(config, sd)
    good = _load_interp(sd, name, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad=False)
    bad = None
    if bsd is not None:
        bad = _load_interp(bsd, bname, unet_cfg, feat, idx, mask_hw, n_ch, dtype, device, operations, bad=True)
    return good, bad


def load_audio_projection(source, engine: str, config=None, dtype=None, device=None, operations=None) -> AudioProjection:
    """Only the audio projection (``conditioner.embedders.<i>.linear.*``) of an engine file."""
    sd, name = _source_state_dict(source)
    default = KEYFRAME_AUDIO_EMBEDDER if engine == "keyframe" else INTERPOLATION_AUDIO_EMBEDDER
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
