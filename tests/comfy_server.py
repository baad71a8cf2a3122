"""The ``comfy_server`` session fixture: a real ComfyUI with this pack and smoke models
(:mod:`comfyui_server`, in scripts/; import the fixture into a test module:
``from comfy_server import comfy_server``). It is stopped at the end of the session.

``CI=true`` (set by CI services and by .ci/run): a missing ComfyUI fails the tests that need it
instead of skipping them; ``skip_or_fail`` gives other test modules the same rule.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import comfyui_server
import pytest
from comfyui_server import (  # noqa: F401  (re-exported for the test modules)
    MEDIA,
    PHOTO_WIDE,
    PORTRAIT,
    ROOT,
    SPEECH,
    SPEECH_ODD,
    ComfyServer,
    comfyui_dir,
    free_port,
)
from face_fixtures import install_detector


def start_server(base=None, models_dir=None, **kw) -> ComfyServer:
    """:func:`comfyui_server.start_server` with the real MTCNN weights (from .cache/, where
    setup_env.sh put them) beside the smoke models, for the face workflow."""
    base = Path(base or tempfile.mkdtemp(prefix="keyface-e2e-"))
    models_dir = Path(models_dir or base / "models" / "keyface")
    install_detector(models_dir)
    return comfyui_server.start_server(base=base, models_dir=models_dir, **kw)


def skip_or_fail(reason: str):
    """Skip a test whose dependency is missing, except in CI (``CI=true``, exported by .ci/run), where
    every test must really run: there a missing dependency is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run must install it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    try:
        import requests  # noqa: F401
    except ImportError:
        skip_or_fail("the requests package is not installed")
    if not (comfyui_dir() / "main.py").is_file():
        skip_or_fail(f"no ComfyUI at {comfyui_dir()} (run: bash scripts/setup_env.sh)")
    base = tmp_path_factory.mktemp("comfyui")
    server = start_server(base=base)
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("KEYFACE_E2E_KEEP_LOG"):
            print(f"ComfyUI log: {server.log_path}")
