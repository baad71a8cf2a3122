"""Loading the engine files (and the whole set of diffusion models) through :mod:`keyface.checkpoints`.

Every key of a file is accounted for with a :class:`~keyface.checkpoints.KeyLedger`; a file of the
other engine, a VAE or an incomplete file is refused with a :class:`~keyface.checkpoints.CheckpointError`
naming it. Configs: ``config=`` or the sidecar ``<checkpoint>.json`` (:mod:`keyface.model_files`),
read by :mod:`keyface.engine_config`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import model_files
from .checkpoints import CheckpointError, KeyLedger, format_keys, load_strict, read_state_dict
from .conditioning import AudioProjection
from .engine_config import (
    BAD_NETWORK_PREFIX,
    INTERPOLATION_AUDIO_EMBEDDER,
    KEYFRAME_AUDIO_EMBEDDER,
    MASK_KEY,
    UNET_PREFIX,
    audio_embedder_from_config,
    interpolation_network_config,
    keyframe_network_config,
)
from .networks import InterpolationNetwork, KeyframeNetwork

IGNORED_PREFIXES = (
    ("first_stage_model.decoder.", "VAE decoder, loaded by keyface.vae.load_vae"),
    ("first_stage_model.encoder.", "VAE encoder, unused at inference (identity latents come pre-encoded)"),
    ("conditioner.embedders.0.encoder.", "the conditioner's VAE encoder, unused when latents are given"),
)


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
    sidecar = model_files.read_sidecar(source)
    if sidecar is not None:
        try:
            validate(sidecar)
        except ValueError as e:
            raise ValueError(f"sidecar config {model_files.sidecar_path(source)}: {e} (if this .json belongs to another tool, "
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
            f"load it with keyface.loading.{loader} (in ComfyUI: put it in the {kind} model slot)"
        )


def _materialise(module: nn.Module, tensors: dict, name: str, dtype, device):
    """Load ``tensors`` strictly into a module built on ``meta`` (assign), then move/cast; the
    module is returned in eval mode without gradients (inference only)."""
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    load_strict(module, tensors, name, f"{type(module).__name__} built from its config", assign=True)
    # non-persistent buffers are not in any state dict: they must not stay on meta
    leftovers = [
        n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta and n not in tensors
    ]
    if leftovers:
        raise CheckpointError(f"{name}: no weights for:{format_keys(leftovers)}")
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
    config = _config_or_sidecar(source, config, lambda c: audio_embedder_from_config(c, default))
    sd, name = _source_state_dict(source)
    idx, _, _ = audio_embedder_from_config(config, default)
    ledger = KeyLedger(sd, name)
    proj = _take_projection(ledger, idx, name)
    feat, ctx = proj["linear.weight"].shape[1], proj["linear.weight"].shape[0]
    module = AudioProjection(int(feat), int(ctx), dtype=dtype, device="meta", operations=operations)
    return _materialise(module, proj, name, dtype, device or "cpu")


def load_diffusion_models(found: dict, dtype=None, device=None):
    """(keyframe network, interpolation network, bad network, VAE) from
    :func:`keyface.model_files.find_models`' paths.

    The UNets load in ``dtype`` with their sidecar configs (if any; the loaders read them); the VAE
    stays float32, as released.
    """
    from .vae import load_vae

    vae = load_vae(found[model_files.VAE], device=device)
    keyframe = load_keyframe_network(found[model_files.KEYFRAME], dtype=dtype, device=device)
    good, bad = load_interpolation_networks(found[model_files.INTERPOLATION], found[model_files.INTERPOLATION_BAD],
                                            dtype=dtype, device=device)
    return keyframe, good, bad, vae
