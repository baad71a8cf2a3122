"""ComfyUI node adapters. Each module exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS, merged here.

Importing this package is cheap: node modules import torch and the library inside their functions.
The ``keyface`` model folder is registered (merged, never overwritten) at import.
"""

from . import audio, decode, emotion, face, loaders, long_render, sampling, video
from ._common import register_folders

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loaders, audio, sampling, decode, video, long_render, emotion, face):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

register_folders()
