"""ComfyUI node adapters. Each module exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS, merged here.

Importing this package is cheap: node modules import torch and the library inside their functions.
The ``keyface`` model folder is registered (merged, never overwritten) at import.
"""

import importlib
import logging

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_MODULES = ("loaders", "sampling", "video", "emotion")

for _name in _MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _e:  # a module another engineer has not landed yet
        if _e.name and _e.name.endswith(f"nodes.{_name}"):
            logging.getLogger("keyface").warning("KeyFace: node module %s is missing; its nodes are not registered", _name)
            continue
        raise
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))

try:
    from ._common import register_folders as _register_folders

    _register_folders()
except ImportError:  # folder_paths absent: imported outside ComfyUI without the test stubs
    pass
