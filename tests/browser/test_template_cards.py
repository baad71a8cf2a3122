"""The shipped workflows in the frontend's template browser (Browse Templates → the pack's entry under
Extensions), on each frontend: one card per workflow, titled with its readable name (both frontends
show the file name as the title: scripts/workflow_files.py) and not cut short, and its thumbnail really loaded (the URL
the frontend builds from that name, spaces included). Leaves test-artifacts/template_cards-<frontend>.png.

The dialog is the same in both renderers, so this runs in the classic one only."""

import pytest

import workflow_files
from browser_page import ARTIFACTS, open_checked_page

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CARD = '[data-testid="template-workflow-{}"]'
# the card's title and its picture: the <img> appears once the frontend has fetched the thumbnail
CARD_SHOWN = """(sel) => {
    const card = document.querySelector(sel), img = card?.querySelector('img');
    return !!card && !!img && img.complete && img.naturalWidth > 0;
}"""
CARD_INFO = """(sel) => {
    const card = document.querySelector(sel), img = card.querySelector('img');
    const h3 = card.querySelector('h3');
    return { title: h3?.textContent.trim(),
             cut: !h3 || h3.scrollWidth > h3.clientWidth + 1 || h3.scrollHeight > h3.clientHeight + 1,  // "..." or clamped
             width: img.naturalWidth, height: img.naturalHeight };
}"""


@pytest.fixture
def classic_page(frontend_server, playwright_browser):
    tag = "pinned" if frontend_server.frontend_name == "pinned" else "latest"
    yield from open_checked_page(playwright_browser, frontend_server, vue=False, tag=tag)


def test_template_cards_show_readable_titles_and_thumbnails(classic_page):
    kf = classic_page
    listing = kf.server.get("/api/workflow_templates")
    pack = next(k for k, names in listing.items() if workflow_files.TALKING_HEAD in names)
    assert sorted(listing[pack]) == sorted(workflow_files.ALL), listing

    kf.js("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    kf.page.get_by_text(pack, exact=True).first.click(timeout=20_000)  # the pack's category
    for name in workflow_files.ALL:
        kf.page.wait_for_function(CARD_SHOWN, arg=CARD.format(name), timeout=20_000)
    kf.page.screenshot(path=str(ARTIFACTS / f"template_cards-{kf.tag}.png"))
    for name in workflow_files.ALL:
        info = kf.js(CARD_INFO, CARD.format(name))
        assert info["title"] == name, info
        assert "_" not in info["title"] and info["title"].startswith("KeyFace - "), info  # not a raw file name
        assert not info["cut"], f"{name!r} does not fit the card (the frontend cuts it with '...')"
        assert info["width"] >= 256 and info["height"] >= 128, (name, info)  # the real thumbnail
