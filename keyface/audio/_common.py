"""Helpers shared by the audio encoder loaders (reading files, configs, weight-norm keys)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoints
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
    """:func:`keyface.checkpoints.load_strict` after renaming weight-norm keys to the module's layout,
    for a module built on the ``meta`` device (:func:`build_from_config`): the file's tensors are
    taken as they are (in the dtype the module was built with), so only the file's own tensors are
    ever allocated, never sizes read from its config."""
    own = module.state_dict()
    sd = fit_weight_norm(sd, own.keys())
    sd = {k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}  # .to: no copy when equal
    checkpoints.load_strict(module, sd, source, f"{what} built from its config", assign=True)
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if empty:  # a tensor the state dict does not hold (none in the released encoders)
        raise CheckpointError(f"{source}: the {what} has tensors the file cannot fill: {', '.join(empty[:5])}")
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


def build_from_config(build, cfg, source, what: str, config_name: str = "config.json"):
    """``build(cfg)`` (a transformers config + model constructor) on the ``meta`` device: the sizes in
    a config cost no memory (a 100-byte config.json saying ``"hidden_size": 10**6`` would otherwise
    allocate terabytes before any weight is read); :func:`load_strict` then takes the file's tensors,
    and a size that differs from the file's is a shape mismatch naming the keys. A config value of the
    wrong type (``"hidden_size": "abc"``) raises a CheckpointError naming the config instead of the
    constructor's TypeError / ValueError from deep inside transformers."""
    try:
        with torch.device("meta"):
            return build(cfg)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers / huggingface_hub raise their own validation errors
        raise CheckpointError(f"{source}: its {what} {config_name} does not describe a usable model "
                              f"({type(err).__name__}: {err})"[:600]) from None

# --------------------------------------------------------------------------------------------------
# Work units: progress and cancel checks inside one encoder call
# --------------------------------------------------------------------------------------------------

# Attention scores per block of query rows, at most (heads x rows x keys values). A block is also
# the unit between two progress/cancel checks: about 0.1 s on one CPU thread for the test encoders,
# whatever the clip length (a 10-minute clip has 30000 keys). Per-row arithmetic does not depend on
# how many rows a block has, so the result is the same for any block size (tests check equality).
ATTENTION_BLOCK_VALUES = 1 << 22


def spans(total: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive pieces of ``size`` covering ``range(total)``; a last piece shorter
    than half of ``size`` is joined to the one before it. Tiny pieces are avoided because BLAS / FFT
    libraries may switch kernels (and rounding) for them, e.g. one row of a matrix product."""
    total, size = int(total), max(1, int(size))
    starts = list(range(0, max(total, 1), size))
    if len(starts) > 1 and total - starts[-1] < max(1, size // 2):
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else max(total, 1)) for i, s in enumerate(starts)]


def attention_block_rows(chunk, heads: int, keys: int) -> int:
    """Query rows per attention block: ``chunk`` capped so a block holds ATTENTION_BLOCK_VALUES scores."""
    return max(1, min(int(chunk), ATTENTION_BLOCK_VALUES // max(1, heads * keys)))


def conv_output_length(length: int, kernels, strides) -> int:
    """Output length of stacked unpadded 1-D convolutions (the encoders' feature extractors)."""
    for k, s in zip(kernels, strides):
        length = (int(length) - int(k)) // int(s) + 1
    return max(int(length), 0)


def attention_units(layers: int, heads: int, tokens: int, chunk) -> int:
    """Units of work of ``layers`` transformer layers run with attention blocks (see
    :func:`attention_block_rows`): the blocks of each layer plus one for the rest of the layer."""
    rows = attention_block_rows(chunk, heads, tokens) if chunk else max(tokens, 1)
    return layers * (len(spans(tokens, rows)) + 1)


class WorkCounter:
    """Counts an encoder call's units of work and reports ``report(done, total)`` after each one.

    ``report`` is the caller's progress callback: an exception it raises (a cancel) stops the encoder
    between two units. ``None``: no reporting. Each encoder announces its whole ``total`` with
    :meth:`expect` before its first unit, so the reported fraction only grows."""

    def __init__(self, report=None, total: int = 0):
        self.report = report
        self.done = 0
        self.total = total

    def expect(self, more: int):
        self.total += int(more)

    def tick(self):
        self.done += 1
        if self.report is not None:
            self.report(self.done, max(self.total, self.done))


# Output positions per convolution call when a feature extractor layer runs in time chunks (a
# unit of work): a few tenths of a second on one CPU thread for the first layers of a 10-minute clip.
CONV_CHUNK_OUTPUTS = 1 << 16


def conv_chunks(length_out: int) -> list[tuple[int, int]]:
    """(start, end) output positions of each chunk of a layer with ``length_out`` outputs."""
    return spans(length_out, CONV_CHUNK_OUTPUTS)


def _normalises_over_time(layer) -> bool:
    return isinstance(getattr(layer, "layer_norm", None), torch.nn.GroupNorm)


def conv_units(length: int, conv_layers) -> int:
    """Units of work of :func:`run_conv_layers` on ``length`` input samples."""
    units = 0
    for layer in conv_layers:
        k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
        length = (int(length) - k) // s + 1
        units += len(conv_chunks(length)) * (2 if _normalises_over_time(layer) else 1)
    return units


def _in_time_chunks(fn, conv, h, counter):
    """``fn`` (local in time: a convolution, then per-time-step ops) over output chunks; each chunk
    reads exactly the input its receptive field covers, so the outputs are those of one call."""
    k, s = conv.kernel_size[0], conv.stride[0]
    length_out = (h.shape[-1] - k) // s + 1
    parts = []
    for o0, o1 in conv_chunks(length_out):
        parts.append(fn(h[..., o0 * s:(o1 - 1) * s + k]))
        if counter is not None:
            counter.tick()
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _group_norm_in_chunks(layer, h, counter: WorkCounter | None):
    """conv -> GroupNorm (statistics over the whole time axis) -> activation, in time chunks: the
    statistics are summed chunk by chunk in float64, then each chunk is normalised and activated.
    Same function as the layer; the rounding differs from torch's GroupNorm kernel by ~1e-7
    (relative), far inside the audio parity tolerance (tests/test_audio_progress.py)."""
    norm = layer.layer_norm
    k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
    length_out = (h.shape[-1] - k) // s + 1
    b, groups = h.shape[0], norm.num_groups
    total = torch.zeros(b, groups, dtype=torch.float64, device=h.device)
    squares = torch.zeros_like(total)
    parts = []
    for o0, o1 in conv_chunks(length_out):
        y = layer.conv(h[..., o0 * s:(o1 - 1) * s + k])
        g = y.reshape(b, groups, -1).double()
        total += g.sum(-1)
        squares += (g * g).sum(-1)
        parts.append(y)
        if counter is not None:
            counter.tick()
    count = (norm.num_channels // groups) * length_out
    mean = total / count
    rstd = torch.rsqrt((squares / count - mean * mean).clamp_min(0) + norm.eps)
    per_channel = norm.num_channels // groups
    mean = mean.repeat_interleave(per_channel, dim=1)[..., None].to(parts[0].dtype)
    rstd = rstd.repeat_interleave(per_channel, dim=1)[..., None].to(parts[0].dtype)
    weight = norm.weight[None, :, None] if norm.affine else 1.0
    bias = norm.bias[None, :, None] if norm.affine else 0.0
    for i, y in enumerate(parts):
        parts[i] = layer.activation((y - mean) * rstd * weight + bias)
        if counter is not None:
            counter.tick()
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def run_conv_layers(conv_layers, x, counter: WorkCounter | None):
    """``transformers``' feature encoder (``hidden = input[:, None]``, then each conv layer: conv,
    optional norm, activation), each layer in time chunks (:data:`CONV_CHUNK_OUTPUTS`, one unit of
    work each). Layers whose norm works per time step are run chunk by chunk as they are; a
    GroupNorm normalises over the whole time axis (see :func:`_group_norm_in_chunks`)."""
    h = x[:, None]
    for layer in conv_layers:
        if _normalises_over_time(layer):
            h = _group_norm_in_chunks(layer, h, counter)
        else:
            h = _in_time_chunks(layer, layer.conv, h, counter)
    return h
