"""The shipped workflows as they open, on each frontend and renderer: no two nodes overlap (Nodes 2.0
draws taller nodes than the classic canvas), no node covers the "Models" group's title, and the saved
view puts every node's left edge on the canvas, not under the side bar or the tab/menu bars, at a zoom
where the frontend draws the nodes in full (not the low-detail placeholders it draws zoomed out). Leaves a
screenshot of each: test-artifacts/workflow_<name>-<frontend>-<renderer>.png."""

import pytest

from browser_page import ARTIFACTS, EMOTION_WORKFLOW, PHOTO_WORKFLOW, TALKING_HEAD_WORKFLOW, load_workflow

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Page rectangles of every node and of each group's title band, as the user sees them.
LAYOUT = """() => {
    const app = window.__kf.app(), ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
    const nodes = app.graph.nodes.map(n => ({ id: n.id, type: n.type, ...window.__kf.nodeRect(n.type) }));
    const groups = (app.graph.groups ?? app.graph._groups ?? []).map(g => {
        const [x, y] = ds.convertOffsetToCanvas([g.pos[0], g.pos[1]]);
        const h = (g.titleHeight ?? window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30) * ds.scale;
        return { title: g.title, x: c.left + x, y: c.top + y, width: g.size[0] * ds.scale, height: h };
    });
    return { nodes, groups };
}"""

# Is the page point (x, y) showing node `id` (its DOM element in Nodes 2.0, else the graph canvas or a
# DOM widget over it), not a bar or panel of the frontend drawn over the canvas?
SHOWS_NODE = """([id, x, y]) => {
    const el = document.elementFromPoint(x, y);
    if (!el) return 'nothing';
    const vueNode = document.querySelector(`[data-node-id="${id}"]`);
    if (vueNode) return vueNode.contains(el) ? 'ok' : (el.className?.toString?.() || el.tagName);
    const app = window.__kf.app();
    return el === app.canvas.canvas || el.closest('.dom-widget') ? 'ok' : (el.className?.toString?.() || el.tagName);
}"""


def _overlap(a, b, margin=2):
    return (a["x"] + margin < b["x"] + b["width"] and b["x"] + margin < a["x"] + a["width"]
            and a["y"] + margin < b["y"] + b["height"] and b["y"] + margin < a["y"] + a["height"])


# The saved views are made for a maximised browser window on a 1920x1080 screen: at a zoom where the
# nodes are drawn in full, the graphs need about 1500 x 950 px (a smaller window shows their right and
# bottom parts after a pan).
VIEWPORT = {"width": 1920, "height": 1000}


def test_shipped_workflows_open_tidy(kf_page):
    kf_page.page.set_viewport_size(VIEWPORT)
    for path in (TALKING_HEAD_WORKFLOW, EMOTION_WORKFLOW, PHOTO_WORKFLOW):  # one page: loading one is cheap
        _check_layout(kf_page, path)


# The canvas's zoom and the frontend's level-of-detail threshold: below it, nodes are drawn as plain
# placeholders without text (LiteGraph: MinFontSizeForLOD 8 px / NODE_TEXT_SIZE 14 px = 0.57 at
# devicePixelRatio 1, on 1.32.9 and 1.58.1).
VIEW = """() => {
    const c = window.__kf.app().canvas;
    return { scale: c.ds.scale, threshold: c._lowQualityZoomThreshold, lowQuality: c.low_quality };
}"""


def _check_layout(kf, path):
    workflow = load_workflow(path)
    kf.load(workflow)
    kf.settle(800)
    kf.page.screenshot(path=str(ARTIFACTS / f"workflow_{path.stem}-{kf.tag}.png"))
    view = kf.js(VIEW)
    assert view["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"]), f"{path.name}: saved view not restored"
    assert isinstance(view["threshold"], (int, float)) and view["threshold"] > 0, view  # the frontend has one
    assert view["scale"] >= view["threshold"] and not view["lowQuality"], \
        f"{path.name}: opens below the detail threshold, nodes drawn as placeholders: {view}"
    layout = kf.js(LAYOUT)
    nodes = layout["nodes"]
    clashes = [(a["type"], b["type"]) for i, a in enumerate(nodes) for b in nodes[i + 1:] if _overlap(a, b)]
    assert not clashes, f"{path.name}: overlapping nodes: {clashes}"
    for g in layout["groups"]:
        covering = [n["type"] for n in nodes if _overlap(n, g, margin=0)]
        assert not covering, f"{path.name}: group title {g['title']!r} is under {covering}"
    hidden = []
    for n in nodes:
        for x, y in ((n["x"] + 6, n["y"] + 6), (n["x"] + 6, n["y"] + n["height"] - 6)):
            what = kf.js(SHOWS_NODE, [n["id"], x, y])
            if what != "ok":
                hidden.append((n["type"], round(x), round(y), what[:60]))
    assert not hidden, f"{path.name}: node edges hidden under the frontend's bars: {hidden}"
