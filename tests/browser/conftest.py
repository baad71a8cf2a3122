"""Fixtures of the browser tests: a real ComfyUI per frontend, one chromium, a page per renderer.

Every browser test runs on each of

* ``frontend``: ``pinned`` (the ``comfyui-frontend-package`` ComfyUI's requirements pin, installed in
  the venv: 1.32.9 for ComfyUI 0.3.75) and ``latest`` (the newest on PyPI that we tested, installed by
  scripts/setup_env.sh into ``.cache/frontend-latest`` and served with ``--front-end-root``; never
  installed over the pinned one);
* ``renderer``: ``classic`` (the LiteGraph canvas) and ``vue`` (Nodes 2.0, the setting
  ``Comfy.VueNodes.Enabled``, read by both frontends' bundles).

A server is started once per frontend (the tests are grouped by it), chromium once per session, and a
fresh page per test. Where chromium, Playwright, requests, ComfyUI or the newest frontend are missing,
the tests skip on a developer machine and fail where they are required (``CI=true`` or
``KEYFACE_REQUIRE_BROWSER=1``), so CI cannot pass without them.
"""

import importlib
import os

import pytest

import comfy_server as comfy_env
from browser_page import (CHROMIUM, CHROMIUM_ARGS, FRONTEND_LATEST_VERSION, latest_frontend_root,
                          open_checked_page, unavailable)

RENDERERS = {"classic": False, "vue": True}  # value of Comfy.VueNodes.Enabled


def _import_or_unavailable(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"cannot import {name} ({e})")


@pytest.fixture(scope="session")
def playwright_browser():
    sync_api = _import_or_unavailable("playwright.sync_api")
    _import_or_unavailable("requests")
    if not os.path.exists(CHROMIUM):
        unavailable(f"{CHROMIUM} not found")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session", params=["pinned", "latest"])
def frontend(request):
    """(name, --front-end-root or None). The pinned one is the venv's package (ComfyUI's default)."""
    if request.param == "pinned":
        return "pinned", None
    root = latest_frontend_root()
    if not (root / "index.html").is_file():
        unavailable(f"comfyui-frontend-package=={FRONTEND_LATEST_VERSION} is not installed at {root} "
                    "(scripts/setup_env.sh installs it)")
    return f"latest ({FRONTEND_LATEST_VERSION})", root


@pytest.fixture(scope="session")
def frontend_server(frontend, playwright_browser, tmp_path_factory):
    """A real ComfyUI with the pack, the smoke models and the fixtures' media, serving ``frontend``."""
    if not (comfy_env.comfyui_dir() / "main.py").is_file():
        unavailable(f"no ComfyUI at {comfy_env.comfyui_dir()}")
    name, root = frontend
    extra = ["--front-end-root", str(root)] if root else []
    server = comfy_env.start_server(base=tmp_path_factory.mktemp("comfyui"), extra_args=extra)
    server.frontend_name = name
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=list(RENDERERS))
def renderer(request):
    return request.param


@pytest.fixture
def kf_page(frontend_server, playwright_browser, renderer, request):
    """A fresh page of ``frontend_server`` in ``renderer``, the page helpers installed (no workflow yet).
    Fails the test on a page error that mentions KeyFace."""
    tag = f"{'pinned' if frontend_server.frontend_name == 'pinned' else 'latest'}-{renderer}"
    yield from open_checked_page(playwright_browser, frontend_server, vue=RENDERERS[renderer], tag=tag)
