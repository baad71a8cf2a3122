"""The shipped workflows in ComfyUI's template browser: the server lists exactly the workflows of
scripts/workflow_files.py under the pack, by their readable names (the frontends show the name as the
card title), and serves each one's JSON and thumbnail (``<name>.jpg``, a real JPEG) at the URLs the
frontend's template cards load, the spaces of the name percent-encoded as a browser sends them.
(tests/browser/test_template_cards.py checks the cards the frontends draw.)"""

from __future__ import annotations

import io
import re
from urllib.parse import quote

import pytest

import workflow_files
from comfy_server import comfy_server  # noqa: F401  (session fixture)

READABLE = re.compile(r"KeyFace - [A-Z][A-Za-z -]*[a-z]")  # letters, spaces, hyphens: no URL or shell trap


def test_shipped_files_are_the_named_workflows():
    """workflows/ holds one .json and one same-named .jpg per name, nothing else."""
    files = sorted(p.name for p in workflow_files.WORKFLOWS_DIR.iterdir())
    assert files == sorted(f"{n}{ext}" for n in workflow_files.ALL for ext in (".jpg", ".json")), files
    for name in workflow_files.ALL:
        assert READABLE.fullmatch(name), f"{name!r}: not a readable title of letters, spaces and hyphens"
        # about 30 characters fit on the title line of a 1.58.1 card (test_template_cards.py measures it)
        assert len(name) <= 30, f"{name!r}: too long for a template card's title line"


@pytest.mark.e2e
def test_every_template_is_listed_and_served_with_its_thumbnail(comfy_server):  # noqa: F811
    import requests
    from PIL import Image

    listing = comfy_server.get("/api/workflow_templates")
    pack = next(k for k, names in listing.items() if workflow_files.TALKING_HEAD in names)
    assert sorted(listing[pack]) == sorted(workflow_files.ALL), listing
    for name in listing[pack]:
        base = f"{comfy_server.url}/api/workflow_templates/{quote(pack)}/{quote(name)}"
        wf = requests.get(base + ".json", timeout=30)
        assert wf.status_code == 200 and wf.json()["nodes"], f"{name}.json: HTTP {wf.status_code}"
        r = requests.get(base + ".jpg", timeout=30)
        assert r.status_code == 200, f"{name}.jpg: HTTP {r.status_code} (the template card shows no thumbnail)"
        image = Image.open(io.BytesIO(r.content))
        assert image.format == "JPEG" and image.width >= 256 and image.height >= 128, (name, image.size)
