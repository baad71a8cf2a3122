"""Test set-up shared by every test.

* ``tests/`` and the repository root are importable (``import keyface``, ``import parity_kinds``).
* Stub modules for ComfyUI's ``folder_paths`` / ``comfy.*`` are installed (see comfy_stubs.py) so that
  importing the pack's root ``__init__.py`` and ``nodes/`` works under pytest without ComfyUI. The
  end-to-end tests run the real ComfyUI in a subprocess and never see these stubs.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (str(TESTS), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import comfy_stubs  # noqa: E402

comfy_stubs.install()
