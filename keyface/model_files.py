"""How a KeyFace models folder is laid out, and the optional sidecar configs.

A models folder (``ComfyUI/models/keyface/``, ``$KEYFACE_MODELS/keyface/`` for scripts/run.sh, or anything given to the CLI)
holds the released files under their released names, or safetensors conversions of them (the audio
encoders may instead be in ``models/audio_encoders/`` and the VAE in ``models/vae/``: see
:func:`find_layout` and :func:`locate_models`):

====================  ==========================================================================
kind                  file names, in order of preference
====================  ==========================================================================
keyframe              keyframe.safetensors, keyframe.pt
interpolation         interpolation.safetensors, interpolation.pt
interpolation_bad     interpolation_bad.safetensors, interpolation_bad.pt
wavlm                 WavLM-Base+.safetensors, WavLM-Base+.pt
beats                 BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.safetensors, ….pt
wav2vec2              wav2vec2-base-960h/  (a Hugging Face folder: config.json + weights)
vae                   svd_vae.safetensors, svd_xt_vae.safetensors,
                      diffusion_pytorch_model.fp16.safetensors, diffusion_pytorch_model.safetensors
                      (the diffusers AutoencoderKLTemporalDecoder file, also inside a ``vae/`` folder)
====================  ==========================================================================

Sidecar config: ``<checkpoint>.json`` next to a checkpoint (``keyframe.json`` or ``keyframe.pt.json``)
holds the original-format config dict of that model (``network_config`` / ``conditioner_config`` /
``network_wrapper``, as in the reference YAML's ``model.params``). Loaders use it instead of the
released sizes, which is how the tiny smoke models load: :func:`keyface.loading.load_keyframe_network`
and :func:`~keyface.loading.load_interpolation_networks` read it themselves when they are given a file
and no ``config``. One extra key is ours: ``"resolution"`` (pixels, default 512).

Plain Python: no torch import here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import validate

KEYFRAME = "keyframe"
INTERPOLATION = "interpolation"
INTERPOLATION_BAD = "interpolation_bad"
WAVLM = "wavlm"
BEATS = "beats"
WAV2VEC2 = "wav2vec2"
VAE = "vae"

KINDS = (KEYFRAME, INTERPOLATION, INTERPOLATION_BAD, WAVLM, BEATS, WAV2VEC2, VAE)

# Released names (spec 6.1) plus safetensors conversions; first match wins.
FILE_NAMES: dict[str, tuple[str, ...]] = {
    KEYFRAME: ("keyframe.safetensors", "keyframe.pt"),
    INTERPOLATION: ("interpolation.safetensors", "interpolation.pt"),
    INTERPOLATION_BAD: ("interpolation_bad.safetensors", "interpolation_bad.pt"),
    WAVLM: ("WavLM-Base+.safetensors", "WavLM-Base+.pt"),
    BEATS: (
        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.safetensors",
        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
    ),
    WAV2VEC2: ("wav2vec2-base-960h",),
    VAE: (
        "svd_vae.safetensors",
        "svd_xt_vae.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ),
}

# The name each kind gets when written (smoke models, conversions).
DEFAULT_NAMES = {
    KEYFRAME: "keyframe.pt",
    INTERPOLATION: "interpolation.pt",
    INTERPOLATION_BAD: "interpolation_bad.pt",
    WAVLM: "WavLM-Base+.pt",
    BEATS: "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
    WAV2VEC2: "wav2vec2-base-960h",
    VAE: "svd_vae.safetensors",
}

# Where each released file comes from (README "Models" has the full download commands).
SOURCES = {
    KEYFRAME: "Hugging Face toninio19/keyface, checkpoints/keyframe.pt",
    INTERPOLATION: "Hugging Face toninio19/keyface, checkpoints/interpolation.pt",
    INTERPOLATION_BAD: "Hugging Face toninio19/keyface, checkpoints/interpolation_bad.pt",
    WAVLM: "Hugging Face toninio19/keyface, checkpoints/WavLM-Base+.pt",
    BEATS: "Hugging Face toninio19/keyface, checkpoints/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
    WAV2VEC2: "Hugging Face facebook/wav2vec2-base-960h (config.json + model.safetensors, as a folder)",
    VAE: "Hugging Face stabilityai/stable-video-diffusion-img2vid, vae/diffusion_pytorch_model.safetensors "
         "(gated: accept the licence), saved as svd_vae.safetensors",
}


def download_hint(kind: str) -> str:
    """One line saying where the released ``kind`` file comes from and under which name to keep it."""
    return f"download {DEFAULT_NAMES[kind]} from {SOURCES[kind]} (README, section Models)"


WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".sft")
DEFAULT_RESOLUTION = 512


def is_model_folder(path) -> bool:
    """A Hugging Face style model folder (config.json plus weights)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def find_models(folder) -> dict[str, Path]:
    """Map each kind found in ``folder`` to its path (released names, then safetensors conversions).

    Kinds that are missing are absent from the result; see ``missing(found)``.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for kind in KINDS:
        for name in FILE_NAMES[kind]:
            p = folder / name
            if kind == WAV2VEC2:
                if is_model_folder(p):
                    found[kind] = p
                    break
            elif p.is_file():
                found[kind] = p
                break
    return found


# ComfyUI's model folders: models/keyface/ holds every kind; some kinds may instead live in the
# native folder for their type (as the loader nodes search them).
KEYFACE_FOLDER = "keyface"
SECONDARY_FOLDERS: dict[str, tuple[str, ...]] = {
    VAE: ("vae",),
    WAVLM: ("audio_encoders",),
    BEATS: ("audio_encoders",),
    WAV2VEC2: ("audio_encoders",),
}


def find_layout(root) -> dict[str, tuple[str, Path]]:
    """{kind: (ComfyUI folder name, path)} under a ComfyUI-style models root ``root``: ``keyface/``
    first, then the kind's secondary folder. Missing kinds are absent."""
    root = Path(root)
    found: dict[str, tuple[str, Path]] = {}
    for folder in (KEYFACE_FOLDER, *dict.fromkeys(f for fs in SECONDARY_FOLDERS.values() for f in fs)):
        for kind, path in find_models(root / folder).items():
            if kind not in found and (folder == KEYFACE_FOLDER or folder in SECONDARY_FOLDERS.get(kind, ())):
                found[kind] = (folder, path)
    return found


def locate_models(folder) -> dict[str, Path]:
    """Every kind found for a folder a user names: the folder itself; for a ComfyUI
    ``models/keyface`` folder also its siblings ``../audio_encoders`` and ``../vae``; for a ComfyUI
    ``models`` root its ``keyface/``, ``audio_encoders/`` and ``vae/``."""
    folder = Path(folder)
    found = find_models(folder)
    for kind, (_, path) in find_layout(folder).items():
        found.setdefault(kind, path)
    for kind, subfolders in SECONDARY_FOLDERS.items():
        for sub in subfolders:
            path = find_models(folder.parent / sub).get(kind)
            if path is not None:
                found.setdefault(kind, path)
    return found


def missing(found: dict) -> list[str]:
    return [k for k in KINDS if k not in found]


def is_complete(folder) -> bool:
    return not missing(find_models(folder))


def guess_kind(name: str) -> str | None:
    """Which kind a file or folder name looks like (for ordering combo lists); None if unknown."""
    base = os.path.basename(str(name).rstrip("/")).lower()
    stem = base.split(".")[0]
    if "bad" in stem and "interp" in stem:
        return INTERPOLATION_BAD
    if "interp" in stem:
        return INTERPOLATION
    if "keyframe" in stem:
        return KEYFRAME
    if "wavlm" in stem:
        return WAVLM
    if "beats" in stem:
        return BEATS
    if "wav2vec" in stem:
        return WAV2VEC2
    if "diffusion_pytorch_model" in stem or "vae" in str(name).lower():  # also a file inside a vae/ folder
        return VAE
    return None


def sidecar_path(checkpoint) -> Path | None:
    """The sidecar config file of ``checkpoint`` if one exists (``<path>.json``, then ``<stem>.json``)."""
    p = Path(checkpoint)
    for cand in (p.with_name(p.name + ".json"), p.with_suffix(".json")):
        if cand != p and cand.is_file():
            return cand
    return None


# A model's JSON config (sidecar, Hugging Face config.json) is a few KB and a few levels deep; these
# bounds keep a wrong or hostile file from costing memory, or a RecursionError, before it is refused.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


def read_json_config(path, what: str = "config"):
    """The JSON value in ``path`` (a config file). Raises ValueError naming the file when it is larger
    than MAX_CONFIG_BYTES, not UTF-8 JSON, or nested deeper than MAX_CONFIG_DEPTH."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # at most this much, whatever stat says (a FIFO, a device)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{what} {path} is larger than {MAX_CONFIG_BYTES:,} bytes; a model config is a few KB, so this is "
            "not one (check which file sits beside the model)"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        data = None
        depth = MAX_CONFIG_DEPTH + 1
    else:
        depth = _json_depth(data)
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"{what} {path} nests deeper than {MAX_CONFIG_DEPTH} levels; a model config is flat")
    return data


def _json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (iterative: the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_CONFIG_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def read_sidecar(checkpoint) -> dict | None:
    """The sidecar config dict of ``checkpoint``, or None. Raises ValueError naming a broken file."""
    sp = sidecar_path(checkpoint)
    if sp is None:
        return None
    data = read_json_config(sp, "sidecar config")  # size and depth bounded
    try:
        return validate.sidecar_config(data)  # every key's type and range, before any weight is read
    except ValueError as e:
        raise ValueError(f"sidecar config {sp}: {e}") from None


def write_sidecar(checkpoint, config: dict) -> Path:
    p = Path(checkpoint)
    out = p.with_suffix(".json") if p.suffix else p.with_name(p.name + ".json")
    out.write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")
    return out


def resolution_of(config: dict | None) -> int:
    """Output resolution (pixels) recorded in a sidecar, else the released 512 (a bad value is an
    error naming it, never replaced by the default)."""
    if config and config.get("resolution") is not None:
        return validate.resolution("sidecar resolution", config["resolution"])
    return DEFAULT_RESOLUTION
