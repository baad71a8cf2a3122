"""KeyFace: audio-driven talking-face video (CVPR 2025), as a plain PyTorch library.

Nothing here imports ComfyUI. Submodules are imported on demand so that ``import keyface`` stays
cheap; see README.md for the few-line Python usage.
"""

__version__ = "0.1.0"
