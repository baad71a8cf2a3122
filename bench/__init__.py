"""KeyFace benchmark (``python -m bench`` from the repository root; see bench/README.md).

A development tool of the source checkout, not part of the library: it imports ``keyface`` as a
top-level package and, for the node rows, the ComfyUI stand-ins of ``scripts/comfy_stubs.py``.
"""
