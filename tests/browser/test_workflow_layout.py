"""The shipped workflows as they open, on each frontend and renderer: no two nodes overlap (Nodes 2.0
draws taller nodes than the classic canvas), no node covers the "Models" group's title, and the saved
view puts every node's left edge on the canvas, not under the side bar or the tab/menu bars. Leaves a
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


def test_shipped_workflows_open_tidy(kf_page):
    for path in (TALKING_HEAD_WORKFLOW, EMOTION_WORKFLOW, PHOTO_WORKFLOW):  # one page: loading one is cheap
        _check_layout(kf_page, path)


def _check_layout(kf, path):
    kf.load(load_workflow(path))
    kf.settle(800)
    kf.page.screenshot(path=str(ARTIFACTS / f"workflow_{path.stem}-{kf.tag}.png"))
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
