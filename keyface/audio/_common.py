"""Helpers shared by the audio encoder loaders (reading files, configs, weight-norm keys)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints import CheckpointError, KeyLedger, read_audio_checkpoint, read_state_dict
from ..model_files import read_json_config

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def torchaudio_part(name: str):
    """Import ``torchaudio.<name>`` (pure-Python parts only: ``compliance.kaldi``, ``functional``).

    torchaudio is not a dependency of the pack's requirements.txt (it must match the user's torch
    build); newer ComfyUI installs may lack it, so say exactly what to install.
    """
    import importlib

    try:
        return importlib.import_module(f"torchaudio.{name}")
    except ImportError as err:
        raise ImportError(
            f"KeyFace needs torchaudio (only its pure-Python {name}) for the audio features, and it could not be "
            f"imported ({err}). Install the torchaudio release that matches your torch {torch.__version__.split('+')[0]}, "
            "e.g. `pip install torchaudio==<same version as torch> --no-deps`."
        ) from err


def read_encoder_file(path, config=None, what="audio encoder") -> dict:
    """Read an encoder from ``path`` without running code from it.

    Returns ``{"kind": "unilm" | "hf", "cfg": dict | None, "model": state_dict, "source": str}``:

    * ``"unilm"``: an original unilm ``{"cfg", "model"}`` pickle or its KeyFace safetensors
      conversion (cfg in the metadata);
    * ``"hf"``: a Hugging Face folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``)
      or a single weights file whose config comes from ``config`` (a dict, or a path to a
      ``config.json``) or from a ``config.json`` beside the file.
    """
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: a Hugging Face {what} folder needs a config.json")
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
                raise CheckpointError(f"{path}: sharded weight files are not supported for the {what}; "
                                      "save it as one model.safetensors")
            raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in the {what} folder")
        cfg = _read_json(cfg_file) if config is None else _config_dict(config)
        return {"kind": "hf", "cfg": cfg, "model": read_state_dict(weights), "source": str(weights)}
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix != ".bin":  # .bin is the Hugging Face pickle name; never a unilm file
        try:
            ckpt = read_audio_checkpoint(path)
        except CheckpointError as err:
            if suffix != ".safetensors" and "expected a unilm checkpoint" not in str(err):
                raise
        else:
            return {"kind": "unilm", "cfg": ckpt["cfg"], "model": ckpt["model"], "source": str(path)}
    sd = read_state_dict(path)
    if config is None:
        sibling = path.parent / "config.json"
        if not sibling.is_file():
            raise CheckpointError(
                f"{path}: a Hugging Face-layout {what} weights file needs its config.json "
                f"(put it beside the file, or pass config=)"
            )
        cfg = _read_json(sibling)
    else:
        cfg = _config_dict(config)
    return {"kind": "hf", "cfg": cfg, "model": sd, "source": str(path)}


def _read_json(path) -> dict:
    try:
        data = read_json_config(path, "JSON config")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config values (as a Hugging Face config.json "
                              f"holds), got a {type(data).__name__}")
    return data


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return _read_json(config)


def fit_weight_norm(sd: dict, model_keys) -> dict:
    """Rename weight-norm keys between the two layouts to what the built module expects.

    Old: ``<conv>.weight_g`` / ``<conv>.weight_v``; new (``torch.nn.utils.parametrizations``):
    ``<conv>.parametrizations.weight.original0`` / ``original1``.
    """
    model_keys = set(model_keys)
    out = {}
    for k, v in sd.items():
        if k not in model_keys:
            if k.endswith(".weight_g") or k.endswith(".weight_v"):
                base = k[: -len(".weight_g")]
                alt = f"{base}.parametrizations.weight.original{0 if k.endswith('_g') else 1}"
                if alt in model_keys:
                    k = alt
            elif ".parametrizations.weight.original" in k:
                base, idx = k.split(".parametrizations.weight.original")
                alt = f"{base}.weight_{'g' if idx == '0' else 'v'}"
                if alt in model_keys:
                    k = alt
        out[k] = v
    return out


def load_strict(module: torch.nn.Module, sd: dict, source: str, what: str):
    """``load_state_dict(strict=True)`` with a :class:`CheckpointError` naming the file on mismatch."""
    expected = module.state_dict()
    sd = fit_weight_norm(sd, expected.keys())
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: " + ", ".join(missing[:8]))
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected[:8]))
        if wrong:
            lines.append("shape mismatch: " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{source}: does not match the {what} built from its config ({' | '.join(lines)})")
    module.load_state_dict(sd, strict=True)
    return module


def module_device_dtype(module: torch.nn.Module):
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def as_batch(wave: torch.Tensor) -> torch.Tensor:
    """[S] or [1, S] -> [1, S]."""
    if wave.dim() == 1:
        return wave[None]
    if wave.dim() == 2:
        return wave
    raise ValueError(f"expected a waveform [S] or [B, S], got shape {tuple(wave.shape)}")


def hf_encoder_keys(sd: dict, source: str, model_keys, prefix: str, what: str) -> dict:
    """The encoder's keys of a Hugging Face file, for a model whose state-dict keys are ``model_keys``.

    Strips the task-model prefix (``wavlm.``, ``wav2vec2.``) and accounts for the task-head keys beside
    it; drops ``masked_spec_embed`` (the training-time mask vector, unused at inference) when the
    built model has none (its config turns masking off).
    """
    if any(k.startswith(prefix) for k in sd):
        ledger = KeyLedger(sd, source)
        base = ledger.take(prefix)
        ledger.ignore("", f"task head beside the {what} encoder (for example lm_head of a CTC model); not part of the features")
    else:
        base = dict(sd)
    if "masked_spec_embed" not in model_keys:
        base.pop("masked_spec_embed", None)
    return base


def build_from_config(build, cfg, source, what: str):
    """``build(cfg)`` (a transformers config + model constructor); a config value of the wrong type or
    size (``"hidden_size": "abc"``) raises a CheckpointError naming the config instead of the
    constructor's TypeError / ValueError from deep inside transformers."""
    try:
        return build(cfg)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers / huggingface_hub raise their own validation errors
        raise CheckpointError(f"{source}: its {what} config.json does not describe a usable model "
                              f"({type(err).__name__}: {err})"[:600]) from None

