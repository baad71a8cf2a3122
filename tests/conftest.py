"""Test set-up shared by every test.

* ``tests/``, ``scripts/`` and the repository root are importable (``import keyface``, ``import parity_kinds``,
  ``import comfy_stubs``)
  through ``pythonpath`` in pyproject.toml.
* Stub modules for ComfyUI's ``folder_paths`` / ``comfy.*`` are installed (see scripts/comfy_stubs.py) so that
  importing the pack's root ``__init__.py`` and ``nodes/`` works under pytest without ComfyUI. The
  end-to-end tests run the real ComfyUI in a subprocess and never see these stubs.
"""

import comfy_stubs
import pytest

comfy_stubs.install()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run torch on one thread: the test models are tiny, and on the 2-core CI machine two threads
    competing with the ComfyUI / browser processes were measured 5-20x slower than one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
