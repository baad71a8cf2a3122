"""Page helpers shared by the browser tests (tests/browser/): load a workflow into the real frontend,
find the KeyFace Emotion node and its editor, read what the frontend would send, take screenshots."""

import json
import os
import re
import wave
from pathlib import Path

import pytest

import workflow_files

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
MEDIA = ROOT / "tests" / "fixtures" / "media"
WORKFLOWS = ROOT / "workflows"
EMOTION_WORKFLOW = workflow_files.workflow_path(workflow_files.EMOTION_OVER_TIME)
TALKING_HEAD_WORKFLOW = workflow_files.workflow_path(workflow_files.TALKING_HEAD)
PHOTO_WORKFLOW = workflow_files.workflow_path(workflow_files.FULL_SIZE_PHOTO)
CHROMIUM = os.environ.get("KEYFACE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
EMOTION_CLASS = "KeyFaceEmotion"
# The newest comfyui-frontend-package on PyPI that these tests were run against; scripts/setup_env.sh
# installs exactly this one into .cache/frontend-latest (keep the two in step).
FRONTEND_LATEST_VERSION = "1.58.1"


def latest_frontend_root() -> Path:
    default = ROOT / ".cache" / "frontend-latest" / "comfyui_frontend_package" / "static"
    return Path(os.environ.get("KEYFACE_FRONTEND_LATEST", default))


def browser_required():
    return os.environ.get("KEYFACE_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "").lower() == "true"


def unavailable(why):
    """Skip on a developer machine; fail where the browser tests are required (CI)."""
    if browser_required():
        pytest.fail(f"the browser tests are required here (KEYFACE_REQUIRE_BROWSER=1 or CI=true) but cannot "
                    f"run: {why}. Install it with KEYFACE_WITH_BROWSER=1 scripts/setup_env.sh", pytrace=False)
    pytest.skip(why)


def wav_seconds(path):
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def load_workflow(path=EMOTION_WORKFLOW):
    return json.loads(Path(path).read_text())


def node_of(workflow, class_type):
    nodes = [n for n in workflow["nodes"] if n.get("type") == class_type]
    assert len(nodes) == 1, f"the workflow must hold one {class_type} node"
    return nodes[0]


# Installed as window.__kf on every page. Positions go through the editor's own layout so that the
# tests hit what the user sees, in either renderer.
JS_HELPERS = r"""
window.__kf = {
  app: () => window.comfyAPI.app.app,
  node: (type = "KeyFaceEmotion") => window.comfyAPI.app.app.graph.nodes.find(n => n.type === type),
  editor: () => window.__kf.node().keyfaceEmotionEditor,
  widget: (name) => window.__kf.node().widgets.find(w => w.name === name),
  setWidget: (name, value) => { const w = window.__kf.widget(name); w.value = value; w.callback?.(value); },
  status: () => { const s = window.__kf.editor().status; return { text: s.textContent, error: s.classList.contains("kf-error") }; },
  // screen (page) coordinates of a (t, v) position in the plot
  posXY: (t, v) => {
    const ed = window.__kf.editor();
    const L = ed.layout();
    const r = ed.canvas.getBoundingClientRect();
    const sx = r.width / ed.canvas.clientWidth, sy = r.height / ed.canvas.clientHeight;
    return { x: r.left + L.tx(t) * sx, y: r.top + L.vy(v) * sy };
  },
  pointXY: (series, index) => window.__kf.posXY(...window.__kf.editor().curve[series][index]),
  prompt: async () => {
    const p = await window.comfyAPI.app.app.graphToPrompt();
    return { output: p.output, workflow: p.workflow };
  },
  promptCurve: async () => {
    const p = await window.comfyAPI.app.app.graphToPrompt();
    const id = String(window.__kf.node().id);
    return { curve: p.output[id].inputs.curve, inputs: p.output[id].inputs, classType: p.output[id].class_type };
  },
  redraw: () => { const a = window.__kf.app(); a.canvas.setDirty(true, true); a.canvas.draw(true, true); },
  // the node of `type` at zoom 1, its top-left corner at (220, 200) of the page
  home: (type = "KeyFaceEmotion") => {
    const app = window.__kf.app(), n = window.__kf.node(type);
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [-n.pos[0] + 220, -n.pos[1] + 200];
    window.__kf.redraw();
  },
  // page rectangle of the node of `type`, title bar included (the DOM node in Nodes 2.0)
  nodeRect: (type = "KeyFaceEmotion") => {
    const app = window.__kf.app(), n = window.__kf.node(type);
    const el = document.querySelector(`[data-node-id="${n.id}"]`);
    if (el) { const r = el.getBoundingClientRect(); return { x: r.left, y: r.top, width: r.width, height: r.height }; }
    const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
    const th = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
    return { x: r.left + x, y: r.top + y, width: n.size[0] * ds.scale, height: (n.size[1] + th) * ds.scale };
  },
  canvasSize: () => {
    const c = window.__kf.editor().canvas, r = c.getBoundingClientRect();
    return { backing: [c.width, c.height], screen: [r.width, r.height], layout: [c.clientWidth, c.clientHeight] };
  },
  // is the element on screen: laid out, not display:none
  shown: (el) => !!el && el.isConnected && el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden",
  // share of the plot's pixel row at value v that is the grey of the zero line (dashed, 35% white)
  greyRow: (v) => {
    const ed = window.__kf.editor();
    ed.draw();
    const L = ed.layout(), c = ed.canvas, k = c.width / c.clientWidth;
    const y = Math.floor((Math.round(L.vy(v)) + 0.5) * k);
    const x0 = Math.ceil(L.x0 * k) + 2, x1 = Math.floor(L.x1 * k) - 2;
    const d = c.getContext("2d").getImageData(x0, y, x1 - x0, 1).data;
    let grey = 0;
    for (let i = 0; i < d.length; i += 4) {
      const hi = Math.max(d[i], d[i + 1], d[i + 2]), lo = Math.min(d[i], d[i + 1], d[i + 2]);
      if (hi - lo < 10 && lo > 80 && hi < 160) grey++;
    }
    return grey / (d.length / 4);
  },
};
"""


def _patched(route, patch):
    response = route.fetch()
    data = response.json()
    patch(data)
    route.fulfill(response=response, json=data)


class KFPage:
    """A page of a real ComfyUI, in one renderer, with window.__kf installed."""

    def __init__(self, page, server, vue, tag):
        self.page = page
        self.server = server
        self.vue = vue
        self.tag = tag  # "<frontend>-<renderer>", used in artifact names
        self.console = []

    @classmethod
    def open(cls, browser, server, vue, tag, patch_object_info=None):
        """``patch_object_info``: optional function that edits the /object_info JSON (a dict) in place
        before the frontend sees it (what a server of another version would serve)."""
        import requests

        # the renderer, and no first-run template browser over the canvas
        for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.VueNodes.Enabled", vue)):
            r = requests.post(f"{server.url}/settings/{key}", json=value, timeout=30)
            r.raise_for_status()
        page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        self = cls(page, server, vue, tag)
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        if patch_object_info is not None:
            page.route(re.compile(r"/object_info([?#].*)?$"), lambda route: _patched(route, patch_object_info))
        page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
        page.wait_for_function(
            "() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensions?.some("
            "e => e.name === 'KeyFace.EmotionCurveEditor') && !!LiteGraph.registered_node_types." + EMOTION_CLASS,
            timeout=60_000)
        page.evaluate(JS_HELPERS)
        return self

    def close(self):
        self.page.close()

    # ------------------------------------------------------------------------------------ actions
    def js(self, code, arg=None):
        return self.page.evaluate(code, arg) if arg is not None else self.page.evaluate(code)

    def settle(self, ms=0):
        if ms:
            self.page.wait_for_timeout(ms)
        self.js("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def load(self, workflow):
        """Loads a UI-format workflow through the frontend's own loader."""
        self.js("async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null, "
                "{showMissingNodesDialog: false, showMissingModelsDialog: false}); }", workflow)
        self.settle(300)

    def load_emotion_workflow(self, workflow=None):
        """The shipped emotion workflow, the editor node at zoom 1 on screen and at least 460 x 420."""
        self.load(workflow or load_workflow())
        self.page.wait_for_function("() => !!window.__kf.node()?.keyfaceEmotionEditor", timeout=20_000)
        self.js("""() => {
            const n = window.__kf.node();
            if (n.size[0] < 460 || n.size[1] < 420) n.setSize([Math.max(n.size[0], 460), Math.max(n.size[1], 420)]);
            window.__kf.app().canvas.deselectAll?.();
            window.__kf.home();
        }""")
        self.settle(400)
        editor = self.page.locator(".keyface-emotion-editor canvas").first
        editor.wait_for(state="visible", timeout=10_000)
        box = editor.bounding_box()
        assert box and box["width"] > 200 and box["height"] > 80, f"editor too small: {box}"

    def status(self):
        return self.js("window.__kf.status()")

    def curve_from_prompt(self):
        res = self.js("window.__kf.promptCurve()")
        assert res["classType"] == EMOTION_CLASS
        assert isinstance(res["curve"], str), "the curve must travel as one plain string"
        return json.loads(res["curve"]), res["inputs"]

    def type_curve(self, text):
        self.page.locator("textarea.keyface-emotion-curve-text").first.fill(text)
        self.settle()

    def click_button(self, text):
        self.page.locator(".keyface-emotion-editor button", has_text=text).first.click()
        self.settle()

    def screenshot_node(self, name, node_type=EMOTION_CLASS, pad=8):
        """Screenshot of one node (title bar included) to test-artifacts/<name>-<frontend>-<renderer>.png."""
        rect = self.js("(t) => window.__kf.nodeRect(t)", node_type)
        path = ARTIFACTS / f"{name}-{self.tag}.png"
        self.page.screenshot(path=str(path), clip={
            "x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad),
            "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad})
        return path


def open_checked_page(playwright_browser, server, *, vue: bool, tag: str):
    """A fresh page (a generator for a pytest fixture): yields it, then closes it and fails the test on
    a page error that mentions KeyFace."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = KFPage.open(playwright_browser, server, vue=vue, tag=tag)
    try:
        yield page
    finally:
        page.close()
    errors = [c for c in page.console if c.startswith("pageerror") and "keyface" in c.lower()]
    assert not errors, errors
