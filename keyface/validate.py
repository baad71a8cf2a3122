"""Checks of what a user hands to KeyFace, and of what each stage hands to the next.

Two rules (issue 9):

* **At the boundary** (library entry points, the CLI, the nodes) every number, image and waveform is
  checked for type, range and finiteness, and the error names the input and the value expected. A NaN
  guidance scale, a NaN pixel or a waveform of huge amplitude must not become a black video.
* **After each stage** (audio features, keyframes, interpolation, decode) one ``isfinite().all()`` on
  the stage's output: a non-finite value there is reported as an error naming the stage and its likely
  causes, never passed on. One reduction per stage output, no copies.

Integer PCM (``int8/uint8/int16/int32``) is scaled to -1..1 here (:func:`pcm_to_float`), the one
definition every user of audio (features, the mp4 track) goes through.

Plain Python at import time (torch is imported inside the tensor checks only), so torch-free
modules (``keyface.config``, ``keyface.model_files``) can use it.
"""

from __future__ import annotations

import json
import math
import numbers


class NonFiniteError(ValueError):
    """NaN or infinite values in an input, or in what a stage produced from valid inputs."""


# ------------------------------------------------------------------------------------------ numbers
def _describe_range(low, high) -> str:
    if low is not None and high is not None:
        return f"in {low:g}..{high:g}"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def number(name: str, value, low=None, high=None) -> float:
    """``value`` as a finite float in [low, high] (either bound optional); ValueError naming ``name``."""
    expected = " ".join(filter(None, ("a finite number", _describe_range(low, high))))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise NonFiniteError(f"{name}: expected {expected}, got {x!r}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ValueError(f"{name}: expected {expected}, got {x:g}")
    return x


def integer(name: str, value, low=None, high=None) -> int:
    """``value`` as an int in [low, high] (an integral float such as 64.0 is accepted; bools are not)."""
    expected = " ".join(filter(None, ("an integer", _describe_range(low, high))))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__})")
    if isinstance(value, numbers.Integral):
        n = int(value)
    else:
        x = float(value)
        if not math.isfinite(x) or x != int(x):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
        n = int(x)
    if (low is not None and n < low) or (high is not None and n > high):
        raise ValueError(f"{name}: expected {expected}, got {n}")
    return n


def sample_rate(name: str, value) -> int:
    """A sample rate in Hz: a positive integer (``"16k"``, 0 or 44100.5 are refused by name)."""
    if isinstance(value, str):
        raise ValueError(f"{name}: expected the sample rate as a positive integer in Hz (e.g. 16000), got the "
                         f"string {value!r}")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a 0-d tensor / numpy scalar from another node
        value = value.item()
    return integer(name, value, low=1)


def text(name: str, value, allow_empty: bool = True) -> str:
    """A string without NUL characters (they cannot be in a file name)."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected text, got {type(value).__name__} {value!r}"[:300])
    if "\x00" in value:
        raise ValueError(f"{name}: contains a NUL character (\\x00) at position {value.index(chr(0))}; file names and "
                         "text inputs cannot hold one")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name}: is empty")
    return value


# ------------------------------------------------------------------------------------------- tensors
def finite(name: str, tensor, hint: str = ""):
    """``tensor`` unchanged if every value is finite (one reduction, no copy); else NonFiniteError naming
    ``name`` with the count of bad values and ``hint`` (what the user can do)."""
    import torch

    t = torch.as_tensor(tensor)
    if not t.is_floating_point() and not t.is_complex():
        return tensor
    if bool(torch.isfinite(t).all()):
        return tensor
    bad = int((~torch.isfinite(t)).sum())  # only on the error path
    nan = int(torch.isnan(t).sum())
    raise NonFiniteError(f"{name}: {bad} of {t.numel()} values are not finite ({nan} NaN, {bad - nan} infinite)"
                         + (f"; {hint}" if hint else ""))


def stage_output(stage: str, tensor, causes: str):
    """After a stage: ``tensor`` must be finite; otherwise an error naming the stage and ``causes``
    (its likely reasons), instead of a black (NaN) video reported as a success."""
    return finite(f"{stage}: the stage produced non-finite values", tensor,
                  f"nothing was written. Likely cause: {causes}")


# ----------------------------------------------------------------------------------------------- audio
def pcm_to_float(waveform):
    """A waveform (torch tensor or numpy array) as float32 in -1..1 when it is integer PCM.

    ``int16`` / ``int32`` / ``int8`` are divided by 2**15 / 2**31 / 2**7; ``uint8`` (8-bit WAV) is
    centred on 128 first; floats (float64 included) become float32 as they are. Anything else
    (bool, complex) is refused with a ValueError.
    """
    if hasattr(waveform, "detach"):  # torch
        import torch

        x = waveform.detach()
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"audio: expected real sample values, got dtype {x.dtype}")
        if x.is_floating_point():
            return x.to(torch.float32)
        if x.dtype == torch.uint8:
            return (x.to(torch.float32) - 128.0) / 128.0
        return x.to(torch.float32) / (float(torch.iinfo(x.dtype).max) + 1.0)
    import numpy as np

    a = np.asarray(waveform)
    if a.dtype == np.bool_ or np.iscomplexobj(a) or not (np.issubdtype(a.dtype, np.number)):
        raise ValueError(f"audio: expected real sample values, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    if a.dtype == np.uint8:
        return (a.astype(np.float32) - 128.0) / 128.0
    return a.astype(np.float32) / (float(np.iinfo(a.dtype).max) + 1.0)


# --------------------------------------------------------------------------------------------- files
def read_text_file(name: str, path) -> str:
    """The UTF-8 text of ``path``; ValueError naming ``name`` (an option, an input) for a missing file,
    a folder, an unreadable or non-UTF-8 file."""
    import os

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path} is a folder; expected a UTF-8 text file")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read {path}: {e.strerror or e}") from None


def parse_json(name: str, text_value):
    """``json.loads`` with errors that name ``name``: invalid JSON, and nesting too deep to parse
    (a RecursionError otherwise)."""
    try:
        return json.loads(text_value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError(f"{name}: the JSON is nested too deeply to read") from None


# ------------------------------------------------------------------------------------ sidecar configs
MAX_RESOLUTION = 8192  # pixels; the released model renders 512
LATENT_FACTOR = 8  # pixels per latent (the SVD VAE)
MAX_CHANNELS = 16384  # the widest layer size a sidecar may set (keyface.config.MAX_WIDTH)


def _params(config: dict, key: str) -> dict:
    """``config[key]``'s parameters (the section itself, or its ``params``), checked to be dicts."""
    section = config.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"{key}: expected a JSON object, got {type(section).__name__}")
    if "params" not in section and "target" not in section:
        return section
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{key}.params: expected a JSON object, got {type(params).__name__}")
    return params


def resolution(name: str, value) -> int:
    """Output pixels: an integer multiple of 8 (the VAE's factor) in 8..8192."""
    if isinstance(value, str):
        raise ValueError(f"{name}: expected an integer number of pixels, got the string {value!r} (write it without "
                         "quotes)")
    px = integer(name, value, LATENT_FACTOR, MAX_RESOLUTION)
    if px % LATENT_FACTOR:
        raise ValueError(f"{name}: expected a multiple of {LATENT_FACTOR} pixels (the VAE works on 8x8 blocks), got {px}")
    return px


def sidecar_config(config: dict) -> dict:
    """Check the keys a sidecar config may hold besides the UNet's parameters (those are checked by
    ``keyface.config.UNetConfig``): the sections are objects, the audio embedder list holds objects with
    positive integer sizes, the wrapper's ``im_size`` / ``n_channels`` and our ``resolution`` are
    integers in range. Returns ``config``; ValueError naming the key otherwise."""
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object, got {type(config).__name__}")
    for key in ("network_config", "denoiser_config", "first_stage_config", "sampler_config"):
        _params(config, key)
    emb_models = _params(config, "conditioner_config").get("emb_models", [])
    if not isinstance(emb_models, list):
        raise ValueError(f"conditioner_config.params.emb_models: expected a list, got {type(emb_models).__name__}")
    for i, emb in enumerate(emb_models):
        where = f"conditioner_config.params.emb_models[{i}]"
        if not isinstance(emb, dict):
            raise ValueError(f"{where}: expected a JSON object, got {emb!r}"[:300])
        p = emb.get("params") or {}
        if not isinstance(p, dict):
            raise ValueError(f"{where}.params: expected a JSON object, got {type(p).__name__}")
        for size in ("audio_dim", "linear_dim"):
            if p.get(size) is not None:
                integer(f"{where}.params.{size}", p[size], 1, MAX_CHANNELS)
    wrapper = {**_params(config, "network_wrapper"), **{k: config[k] for k in ("im_size", "n_channels") if k in config}}
    if "im_size" in wrapper:
        im = wrapper["im_size"]
        if not isinstance(im, list) or len(im) != 2:
            raise ValueError(f"im_size: expected [height, width] in pixels, got {im!r}"[:300])
        for i, v in enumerate(im):
            resolution(f"im_size[{i}]", v)
    if "n_channels" in wrapper:
        integer("n_channels", wrapper["n_channels"], 1, 64)
    if "resolution" in config:
        resolution("resolution", config["resolution"])
    return config
