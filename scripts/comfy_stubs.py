"""Minimal stand-ins for the ComfyUI modules the pack imports (only for unit tests).

They implement just enough behaviour for the node adapters to run on the CPU: a folder registry
(with ComfyUI's merge semantics), a ModelPatcher that keeps the model where it is and records
loads (and the working memory asked for), a ProgressBar that records updates, dtype policy
functions that answer float32 / no cast, ``comfy.ops`` namespaces built from torch layers
(``manual_cast`` ones cast weights to the input dtype), a ``server.PromptServer`` that records the
messages sent, and an interrupt flag tests can set.

Nothing here imports torch at install time (``comfy.ops`` builds its namespaces on first use), so
the pack-import test can check that importing the pack does not pull in heavy modules.

Tests reach the recorded state through ``comfy_stubs.STATE`` and reset it with ``reset()``.
"""

import os
import sys
import tempfile
import types

_INSTALLED = False

STATE = types.SimpleNamespace(
    progress=[],        # (node_id or None, value, total) per ProgressBar update
    loaded=[],          # list of lists of ModelPatcher passed to load_models_gpu
    load_calls=[],      # dict(models, memory_required, force_full_load) per load_models_gpu call
    messages=[],        # (event, data, sid) per PromptServer.instance.send_sync
    interrupt=False,    # set True to make throw_exception_if_processing_interrupted raise
    cancel_at_progress=None,  # int: a user clicks cancel when a progress bar first shows this value (or more)
    free_memory=64 << 30,  # what get_free_memory reports (bytes)
    free_memory_asked=[],  # devices get_free_memory was asked about
)


def reset():
    STATE.progress.clear()
    STATE.loaded.clear()
    STATE.load_calls.clear()
    STATE.messages.clear()
    STATE.interrupt = False
    STATE.cancel_at_progress = None
    STATE.free_memory = 64 << 30
    STATE.free_memory_asked.clear()


# --------------------------------------------------------------------------------- folder_paths
def _make_folder_paths():
    m = types.ModuleType("folder_paths")
    m.__stub__ = True
    base = tempfile.mkdtemp(prefix="keyface-comfy-stub-")
    m.models_dir = os.path.join(base, "models")
    m.supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    m.folder_names_and_paths = {
        "vae": ([os.path.join(m.models_dir, "vae")], m.supported_pt_extensions),
        "audio_encoders": ([os.path.join(m.models_dir, "audio_encoders")], m.supported_pt_extensions),
        "custom_nodes": ([os.path.join(base, "custom_nodes")], set()),
    }
    m.output_directory = os.path.join(base, "output")

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        if folder_name in m.folder_names_and_paths:
            paths, _ = m.folder_names_and_paths[folder_name]
            if full_folder_path in paths:
                if is_default and paths[0] != full_folder_path:
                    paths.remove(full_folder_path)
                    paths.insert(0, full_folder_path)
            elif is_default:
                paths.insert(0, full_folder_path)
            else:
                paths.append(full_folder_path)
        else:
            m.folder_names_and_paths[folder_name] = ([full_folder_path], set())

    def get_folder_paths(folder_name):
        return list(m.folder_names_and_paths[folder_name][0])

    def get_filename_list(folder_name):
        paths, exts = m.folder_names_and_paths[folder_name]
        out = set()
        for p in paths:
            if not os.path.isdir(p):
                continue
            for root, dirs, files in os.walk(p, followlinks=True):
                dirs[:] = [d for d in dirs if d != ".git"]
                for f in files:
                    rel = os.path.relpath(os.path.join(root, f), p).replace(os.sep, "/")
                    if not exts or os.path.splitext(f)[1].lower() in exts:
                        out.add(rel)
        return sorted(out)

    m.add_model_folder_path = add_model_folder_path
    m.get_folder_paths = get_folder_paths
    m.get_filename_list = get_filename_list
    m.get_output_directory = lambda: m.output_directory

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
        existing = [f for f in os.listdir(full_output_folder) if f.startswith(filename + "_")]
        for f in existing:
            try:
                counter = max(counter, int(f[len(filename) + 1:].split("_")[0].split(".")[0]) + 1)
            except ValueError:
                pass
        return full_output_folder, filename, counter, subfolder, filename_prefix

    m.get_save_image_path = get_save_image_path
    return m


# ------------------------------------------------------------------------- comfy.model_management
def _make_model_management():
    m = types.ModuleType("comfy.model_management")
    m.__stub__ = True

    def _torch():
        import torch
        return torch

    class InterruptProcessingException(Exception):
        pass

    m.InterruptProcessingException = InterruptProcessingException
    m.get_torch_device = lambda: _torch().device("cpu")
    m.unet_offload_device = lambda: _torch().device("cpu")
    m.text_encoder_device = lambda: _torch().device("cpu")
    m.text_encoder_offload_device = lambda: _torch().device("cpu")
    m.vae_device = lambda: _torch().device("cpu")
    m.vae_offload_device = lambda: _torch().device("cpu")
    m.intermediate_device = lambda: _torch().device("cpu")
    m.unet_dtype = lambda device=None, model_params=0, supported_dtypes=None, weight_dtype=None: _torch().float32
    m.unet_manual_cast = lambda weight_dtype, inference_device, supported_dtypes=None: None
    m.text_encoder_dtype = lambda device=None: _torch().float32
    m.vae_dtype = lambda device=None, allowed_dtypes=(): _torch().float32

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        STATE.loaded.append(list(models))
        STATE.load_calls.append({"models": list(models), "memory_required": memory_required,
                                 "force_full_load": force_full_load})
        for p in models:
            p.model.to(p.load_device)

    m.load_models_gpu = load_models_gpu

    def get_free_memory(dev=None, torch_free_too=False):
        STATE.free_memory_asked.append(dev)
        return (STATE.free_memory, STATE.free_memory) if torch_free_too else STATE.free_memory

    m.get_free_memory = get_free_memory

    def throw_exception_if_processing_interrupted():
        if STATE.interrupt:
            STATE.interrupt = False
            raise InterruptProcessingException()

    m.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return m


# ---------------------------------------------------------------------------- comfy.model_patcher
def _make_model_patcher():
    m = types.ModuleType("comfy.model_patcher")
    m.__stub__ = True

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device):
            self.model = model
            self.load_device = load_device
            self.offload_device = offload_device
            if getattr(model, "device", None) is None:
                try:
                    model.device = offload_device
                except Exception:
                    pass

    m.ModelPatcher = ModelPatcher
    return m


# ----------------------------------------------------------------------------------- comfy.utils
def _make_utils():
    m = types.ModuleType("comfy.utils")
    m.__stub__ = True

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            value = min(value, self.total)
            self.current = value
            STATE.progress.append((self.node_id, value, self.total))
            if STATE.cancel_at_progress is not None and value >= STATE.cancel_at_progress:
                STATE.cancel_at_progress = None
                STATE.interrupt = True  # as ComfyUI's /interrupt: the next check raises

    m.ProgressBar = ProgressBar
    return m


# ------------------------------------------------------------------------------------- comfy.ops
def _manual_cast_layers():
    """Torch layers that cast their weight and bias to the input's dtype and device in forward,
    as ComfyUI's ``manual_cast`` layers do (weights stored in one dtype, computed in another)."""
    from torch import nn
    from torch.nn import functional as F

    def cast(self, x):
        w = None if self.weight is None else self.weight.to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return w, b

    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, *cast(self, x))

    def conv(base):
        class Conv(base):
            def forward(self, x):
                return self._conv_forward(x, *cast(self, x))
        Conv.__name__ = base.__name__
        return Conv

    class GroupNorm(nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, *cast(self, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, *cast(self, x), self.eps)

    return types.SimpleNamespace(Linear=Linear, Conv1d=conv(nn.Conv1d), Conv2d=conv(nn.Conv2d),
                                 Conv3d=conv(nn.Conv3d), GroupNorm=GroupNorm, LayerNorm=LayerNorm)


def _make_ops():
    m = types.ModuleType("comfy.ops")
    m.__stub__ = True
    names = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")

    def __getattr__(attr):
        if attr == "disable_weight_init":
            from torch import nn

            # torch layers marked like ComfyUI's (the model patcher looks for comfy_cast_weights)
            ns = types.SimpleNamespace(**{n: type(n, (getattr(nn, n),), {"comfy_cast_weights": False})
                                          for n in names})
        elif attr == "manual_cast":
            ns = _manual_cast_layers()
        else:
            raise AttributeError(attr)
        setattr(m, attr, ns)
        return ns

    m.__getattr__ = __getattr__
    return m


# ---------------------------------------------------------------------------------------- server
def _make_server():
    m = types.ModuleType("server")
    m.__stub__ = True

    class PromptServer:
        instance = None

        def __init__(self):
            self.client_id = "stub-client"

        def send_sync(self, event, data, sid=None):
            STATE.messages.append((event, data, sid))

    PromptServer.instance = PromptServer()
    m.PromptServer = PromptServer
    return m


def install():
    global _INSTALLED
    if _INSTALLED or "comfy" in sys.modules:
        return
    _INSTALLED = True
    comfy = types.ModuleType("comfy")
    comfy.__path__ = []  # a package, so "import comfy.utils" works
    comfy.__stub__ = True
    mods = {
        "folder_paths": _make_folder_paths(),
        "comfy": comfy,
        "comfy.model_management": _make_model_management(),
        "comfy.model_patcher": _make_model_patcher(),
        "comfy.utils": _make_utils(),
        "comfy.ops": _make_ops(),
        "server": _make_server(),
    }
    for name, mod in mods.items():
        sys.modules.setdefault(name, mod)
    for sub in ("model_management", "model_patcher", "utils", "ops"):
        setattr(comfy, sub, sys.modules["comfy." + sub])
