"""KeyFace node pack for ComfyUI (classic V1 registration).

Importing the pack is cheap: node modules import torch-heavy code (networks, transformers) only
when a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
