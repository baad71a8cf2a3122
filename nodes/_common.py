"""Shared plumbing of the node adapters: model folders, ComfyUI memory management, progress/cancel,
the first image / audio clip of an input batch.

Imports of ``comfy.*`` and of the torch-based library happen inside functions: importing this module
costs nothing but ``folder_paths`` (which ComfyUI has already loaded), the standard library and
``keyface.model_files`` (plain Python, file names only).
"""

from __future__ import annotations

import logging
import os

from ..keyface import model_files, planner

log = logging.getLogger("keyface")

CATEGORY = "KeyFace"
FOLDER = "keyface"  # models/keyface/ (and any "keyface:" entry of extra_model_paths.yaml)
FPS = float(planner.FPS)  # the node outputs' frame rate (a FLOAT output of Encode Audio)

# Secondary ComfyUI folders searched after models/keyface/ for some kinds.
SECONDARY = model_files.SECONDARY_FOLDERS


# ---------------------------------------------------------------------------------- model folders
def register_folders():
    """Make ``models/keyface`` known to ComfyUI by *merging* into ``folder_names_and_paths``.

    Paths the user added (``extra_model_paths.yaml`` is read before custom nodes load) survive; a
    folder created by ``add_model_folder_path`` has an empty extension set (lists every file), so
    the set is replaced with the weight extensions while the path list is kept as it is.
    """
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    wanted = set(getattr(folder_paths, "supported_pt_extensions", set())) | set(model_files.WEIGHT_EXTENSIONS)
    if set(exts or ()) != wanted:
        folder_paths.folder_names_and_paths[FOLDER] = (paths, wanted)
        cache = getattr(folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.pop(FOLDER, None)


def _folders(kind: str) -> list[tuple[str, str]]:
    """[(comfy_folder_name, directory)] searched for ``kind``, models/keyface first."""
    import folder_paths

    out = []
    for name in (FOLDER,) + SECONDARY.get(kind, ()):
        if name in folder_paths.folder_names_and_paths:
            for d in folder_paths.get_folder_paths(name):
                out.append((name, d))
    return out


def _model_dirs(directory: str) -> list[str]:
    """Hugging Face style model folders (containing config.json) up to two levels below ``directory``."""
    found = []
    if not os.path.isdir(directory):
        return found
    for root, dirs, _files in os.walk(directory, followlinks=True):
        rel = os.path.relpath(root, directory)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        if depth >= 1 and model_files.is_model_folder(root):
            found.append(rel.replace(os.sep, "/"))
            dirs[:] = []
            continue
        if depth >= 2:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return found


def choices(kind: str) -> list[str]:
    """Combo entries for a loader input: files (and, for wav2vec2, model folders) in the folders of
    ``kind``; names that look like ``kind`` (released names first) come first. Never empty."""
    import folder_paths

    names: list[str] = []
    folders = _folders(kind)
    hf = sorted({d for _, directory in folders for d in _model_dirs(directory)})
    if kind == "wav2vec2":
        names += hf
    for comfy_name in dict.fromkeys(name for name, _ in folders):
        try:
            files = folder_paths.get_filename_list(comfy_name)
        except Exception:  # a folder ComfyUI does not know (old builds)
            files = []
        for f in files:
            if os.path.splitext(f)[1].lower() not in model_files.WEIGHT_EXTENSIONS:
                continue
            if any(f.startswith(d + "/") for d in hf):
                continue  # weights inside a HF folder: the folder is the model
            names.append(f)
    uniq = list(dict.fromkeys(names))
    released = model_files.FILE_NAMES.get(kind, ())

    def rank(n):
        if n in released:
            return (0, released.index(n), n)
        if model_files.guess_kind(n) == kind:
            return (1, 0, n)
        return (2, 0, n)

    uniq.sort(key=rank)
    if not uniq:
        # ComfyUI rejects a prompt whose combo value is not in the list, so show what is expected.
        uniq = [model_files.DEFAULT_NAMES[kind]]
    return uniq


def find_model(kind: str, name) -> str | None:
    """Full path of combo value ``name`` (file or model folder) in the folders searched for ``kind``, or None."""
    if not isinstance(name, str) or not name:
        return None
    rel = os.path.normpath(os.path.join("/", name)).lstrip("/\\")
    for _comfy_name, directory in _folders(kind):
        full = os.path.join(directory, rel)
        if os.path.isfile(full) or model_files.is_model_folder(full):
            return full
    return None


def missing_model_message(kind: str, name, input_name: str) -> str:
    """What to tell the user about a model file that is not there: the input, the folders searched
    and where to download the file."""
    if not isinstance(name, str) or not name:
        return f"{input_name}: no model file chosen"
    searched = ", ".join(directory for _, directory in _folders(kind)) or "any model folder"
    return (f"{input_name}: model '{name}' was not found in {searched} (put the KeyFace files in "
            f"ComfyUI/models/{FOLDER}/ or add a '{FOLDER}:' entry to extra_model_paths.yaml; "
            f"{model_files.download_hint(kind)})")


def resolve(kind: str, name: str, input_name: str) -> str:
    """Full path of combo value ``name`` (file or model folder); ValueError naming the input."""
    path = find_model(kind, name)
    if path is None:
        raise ValueError(missing_model_message(kind, name, input_name))
    return path


def validate_models(**inputs) -> bool | str:
    """A loader node's VALIDATE_INPUTS: ``inputs`` = {input_name: (kind, combo value)}. ComfyUI runs it
    for every node when a prompt is queued, before anything executes, so every missing file of the
    workflow is reported at once (each on its node) instead of one loader at a time at run time."""
    problems = [missing_model_message(kind, name, input_name)
                for input_name, (kind, name) in inputs.items() if find_model(kind, name) is None]
    return "; ".join(problems) if problems else True


# ------------------------------------------------------------------------------ memory management
def mm():
    import comfy.model_management

    return comfy.model_management


def unet_policy(num_params: int):
    """(load_device, offload_device, weight_dtype, compute_dtype, operations) for a KeyFace UNet.

    Weight dtype from ``unet_dtype`` (honours --fp16-unet etc.), compute dtype from
    ``unet_manual_cast``; ``comfy.ops.manual_cast`` layers when the two differ, else
    ``disable_weight_init`` (same layers, no init cost, per-op cancel on new builds).
    """
    import torch
    import comfy.ops

    m = mm()
    load_device = m.get_torch_device()
    offload_device = m.unet_offload_device()
    supported = [torch.float16, torch.bfloat16, torch.float32]
    weight_dtype = m.unet_dtype(device=load_device, model_params=num_params, supported_dtypes=supported)
    manual = m.unet_manual_cast(weight_dtype, load_device, supported)
    ops = comfy.ops.manual_cast if manual is not None else comfy.ops.disable_weight_init
    return load_device, offload_device, weight_dtype, (manual or weight_dtype), ops


def use_compute_dtype(network, weight_dtype, compute_dtype):
    """Make a KeyFace network compute in ``compute_dtype`` when ComfyUI's manual cast applies
    (weights stored in a dtype the device does not compute in: fp8, or bf16/fp16 on a CPU).

    The engine would otherwise cast its inputs to the weight dtype (``--fp8_e4m3fn-unet`` fails,
    ``--bf16-unet`` on a CPU computes in bf16 where ComfyUI picks fp32); the library's
    ``set_compute_dtype`` covers the UNet and the audio projection.
    """
    if compute_dtype != weight_dtype:
        network.set_compute_dtype(compute_dtype)
    return network


def audio_encoder_policy():
    """(load_device, offload_device, dtype) for the audio encoders: ComfyUI's text-encoder devices,
    weights always float32.

    float32 rather than ComfyUI's text-encoder dtype (fp16 on most GPUs): the three encoders are
    ~95M parameters each (~1.1 GB together), the original computed its features in fp32, and the
    CLI loads them in fp32, so the node and the CLI give the same features for the same clip.
    """
    import torch

    m = mm()
    return m.text_encoder_device(), m.text_encoder_offload_device(), torch.float32


def vae_policy():
    import torch

    m = mm()
    load_device = m.vae_device()
    offload_device = m.vae_offload_device()
    try:
        dtype = m.vae_dtype(device=load_device, allowed_dtypes=[torch.bfloat16, torch.float32])
    except TypeError:  # 2024 builds: vae_dtype() takes no arguments
        dtype = m.vae_dtype()
    if dtype not in (torch.float32, torch.bfloat16):
        dtype = torch.float32  # the SVD temporal decoder is run in fp32 (spec 7) or bf16, never fp16
    return load_device, offload_device, dtype


def patcher(model, load_device, offload_device):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load(patchers, memory_required=0, force_full_load=False):
    """Ask ComfyUI to put these models on their load device, evicting others (or loading these
    partially) so that ``memory_required`` bytes of working memory stay free for the stage.
    ``force_full_load``: never leave layers behind (for modules without comfy.ops layers)."""
    mm().load_models_gpu(list(patchers), memory_required=int(memory_required), force_full_load=force_full_load)


def decode_memory(vae, rows, latent_hw) -> int:
    """Estimated working memory (bytes) of one decoder call of ``vae`` (a KEYFACE_VAE) on ``rows``
    latents of ``latent_hw``: the library's estimate (keyface.vae.decode_memory), handed to
    load_models_gpu."""
    from ..keyface.vae import decode_memory as estimate

    return estimate(vae.vae.decoder.config, rows, latent_hw, vae.compute_dtype)


def free_memory(device) -> int:
    """What ComfyUI's memory manager reports free on ``device`` (VRAM plus torch's unused cache; RAM
    on the CPU): the decoders size their chunks to it."""
    return int(mm().get_free_memory(device))


def image_batch(num_frames: int, height: int, width: int, device, node: str, instead: str):
    """An empty IMAGE batch [N, H, W, 3] (float32, as ComfyUI passes images) for a node to fill chunk by
    chunk: one copy of the frames, where a list of chunks + ``torch.cat`` held two. Refused before it is
    allocated where it does not fit in what the memory manager reports free on ``device``: a long clip at
    a large size would otherwise swap or get the server killed. ``instead``: what to use for such clips."""
    import torch

    need = int(num_frames) * int(height) * int(width) * 3 * 4
    free = free_memory(device)
    if need > free:
        raise MemoryError(f"{node}: {num_frames} frames of {width}x{height} are {need / 1e9:.1f} GB as an IMAGE "
                          f"batch, more than the {free / 1e9:.1f} GB free ({torch.device(device).type}). {instead}")
    return torch.empty((int(num_frames), int(height), int(width), 3), dtype=torch.float32, device=device)


def render_defaults():
    """``keyface.settings.DEFAULTS`` (torch-free): the node inputs' defaults are the library's."""
    from ..keyface.settings import DEFAULTS

    return DEFAULTS


def attention_input():
    from ..keyface.config import ATTENTION_BACKENDS  # torch-free

    return (list(ATTENTION_BACKENDS), {
        "default": "auto",
        "tooltip": "Attention kernel (torch scaled_dot_product_attention backend) for this stage's network calls. "
                   "auto: torch picks per call. A backend this device cannot run is reported as an error. "
                   "Changes speed, not the result beyond float rounding.",
    })


def check_interrupt():
    mm().throw_exception_if_processing_interrupted()


def file_params(path: str, bytes_per_param: int = 4) -> int:
    """Rough parameter count of a checkpoint from its size (for dtype/memory heuristics)."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) // bytes_per_param
        return os.path.getsize(path) // bytes_per_param
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------- progress
class Mp4OutputNode:
    """What the nodes that write an mp4 into the output folder share (Save Video, Long Render)."""

    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("path", "frame_count")
    OUTPUT_TOOLTIPS = ("Full path of the written mp4.", "Frames written (= the clip's frame_count).")


class Progress:
    """Pipeline callback: checks ComfyUI's interrupt flag on every event and drives one
    ``comfy.utils.ProgressBar`` per stage (denoising steps, segment groups, decode chunks)."""

    def __init__(self):
        self.bar = None
        self.key = None

    def __call__(self, event):
        """``event``: a ``keyface.pipeline.ProgressEvent`` (stage, step, total, ...)."""
        import comfy.utils

        check_interrupt()
        if self.key != (event.stage, event.total):  # a new stage: a new bar
            self.key = (event.stage, event.total)
            self.bar = comfy.utils.ProgressBar(max(int(event.total), 1))
        self.bar.update_absolute(min(int(event.step), int(event.total)), int(event.total))


# ------------------------------------------------------------------------------------- notices
NOTICE_EVENT = "keyface.notice"  # shown as a toast by js/keyface_notices.js


def notify(message, severity="warn"):
    """Log ``message`` and show it in the ComfyUI frontend of the client that queued the prompt
    (a websocket event). Nothing is sent when no server runs (scripts, unit tests) or the prompt came
    without a client id (API use): a socket id of None would broadcast it to every open browser."""
    log.warning("KeyFace: %s", message)
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    client_id = getattr(server, "client_id", None)
    if client_id is not None:
        server.send_sync(NOTICE_EVENT, {"severity": severity, "summary": "KeyFace", "detail": message}, client_id)


# ------------------------------------------------------------------------- identity image, audio
def first_image(image, input_name="image"):
    """The first portrait of an IMAGE batch (warns when the batch has more than one)."""
    if image is None or getattr(image, "ndim", 0) != 4 or image.shape[-1] not in (3, 4):
        raise ValueError(f"{input_name}: expected an IMAGE [batch, height, width, 3], got "
                         f"{tuple(getattr(image, 'shape', ())) or type(image).__name__}")
    if image.shape[0] > 1:
        notify(f"{input_name} holds {image.shape[0]} images; using the first one as the identity portrait")
    return image[:1, :, :, :3]


def first_clip(audio, input_name="audio"):
    """(waveform [C, S] float32 in -1..1, sample_rate) of the first clip of an AUDIO batch (warns when it
    holds more). Integer PCM (int16, ...) is scaled, not just cast: a cast int16 clip would be a
    clipped square wave in the mp4; the sample rate must be a positive integer."""
    from ..keyface import validate

    try:
        wf, sr = audio["waveform"], audio["sample_rate"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{input_name}: expected a ComfyUI AUDIO dict with 'waveform' and 'sample_rate'") from e
    sr = validate.sample_rate(f"{input_name}: sample_rate", sr)
    if not hasattr(wf, "ndim"):
        raise ValueError(f"{input_name}: expected the waveform as a tensor [batch, channels, samples], got "
                         f"{type(wf).__name__}")
    shape = tuple(wf.shape)
    if wf.ndim == 3:
        if wf.shape[0] > 1:
            notify(f"{input_name} holds a batch of {wf.shape[0]} clips; using the first")
        wf = wf[0]
    elif wf.ndim == 1:
        wf = wf[None]
    if wf.ndim != 2 or wf.shape[-1] == 0:
        raise ValueError(f"{input_name}: expected a non-empty waveform [batch, channels, samples], got shape {shape}")
    try:
        return validate.pcm_to_float(wf), sr
    except ValueError as e:
        raise ValueError(f"{input_name}: {e}") from None


# --------------------------------------------------------------------------------- widget values
def check_widgets(node_cls, **values):
    """Check widget values against the node's own declaration (INPUT_TYPES: type, min, max, choices).

    ComfyUI checks min/max with comparisons, which NaN passes (JSON ``NaN`` in an API prompt), and
    a node that lists an input in VALIDATE_INPUTS skips ComfyUI's checks for it; a NaN guidance scale
    would then sample NaN latents and save a black video. The error names the input and the range.
    """
    from ..keyface import validate

    spec = node_cls.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        kind, opts = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        low, high = opts.get("min"), opts.get("max")
        if kind == "FLOAT":
            validate.number(name, value, low, high)
        elif kind == "INT":
            validate.integer(name, value, low, high)
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        elif kind == "STRING":
            validate.text(name, value)
        elif isinstance(kind, list) and (not isinstance(value, str) or value not in kind):
            raise ValueError(f"{name}: expected one of {', '.join(map(str, kind))}; got {value!r}"[:400])
