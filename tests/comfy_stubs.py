"""Minimal stand-ins for the ComfyUI modules the pack imports (only for unit tests).

They implement just enough behaviour for the node adapters to run on the CPU: a folder registry,
a ModelPatcher that keeps the model where it is, a ProgressBar that records updates, and an
interrupt flag tests can set.
"""

import sys
import types

_INSTALLED = False


def install():
    global _INSTALLED
    if _INSTALLED or "comfy" in sys.modules:
        return
    _INSTALLED = True
    # Filled in by the nodes work (see nodes/ and tests/test_nodes*.py).
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils", "comfy.ops"):
        sys.modules.setdefault(name, types.ModuleType(name))
