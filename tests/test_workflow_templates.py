"""The shipped workflows in ComfyUI's template browser: every template the server lists has its
thumbnail beside it (``<name>.jpg``, the URL the frontend's template cards load), a real JPEG."""

from __future__ import annotations

import io

import pytest

from comfy_server import comfy_server  # noqa: F401  (session fixture)

pytestmark = pytest.mark.e2e


def test_every_template_has_a_thumbnail(comfy_server):
    import requests
    from PIL import Image

    listing = comfy_server.get("/api/workflow_templates")
    pack = next(k for k, names in listing.items() if "keyface_talking_head" in names)
    assert sorted(listing[pack]) == ["keyface_emotion_over_time", "keyface_photo_full_resolution", "keyface_talking_head"], listing
    for name in listing[pack]:
        r = requests.get(f"{comfy_server.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30)
        assert r.status_code == 200, f"{name}.jpg: HTTP {r.status_code} (the template card shows no thumbnail)"
        image = Image.open(io.BytesIO(r.content))
        assert image.format == "JPEG" and image.width >= 256 and image.height >= 128, (name, image.size)
