"""The emotion curve editor in a real browser, against a real ComfyUI and its real frontend.

Debian chromium (``/usr/bin/chromium``, headless) driven by Playwright for Python loads the ComfyUI
page, loads the emotion workflow with ``app.loadGraphData``, drags a control point of the editor's
valence curve with real mouse events, and checks that ``app.graphToPrompt()`` carries the new curve
as one plain JSON string. It also checks Delete / Ctrl+Z, the textarea toggle and that text typed
into the textarea re-renders the editor, then queues the prompt through the frontend
(``app.queuePrompt`` with the emotion node as the target) and checks that ``/history`` reports
success with that curve. A screenshot of the node goes to ``test-artifacts/emotion_editor.png``.

Server: the shared session fixture ``comfy_server`` from ``tests/comfy_server.py`` when it exists;
otherwise a minimal launcher here (ComfyUI 0.3.75 from ``.comfyui``, this pack's emotion node only,
docs/comfyui.md section 6).
"""

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("KEYFACE_CHROMIUM", "/usr/bin/chromium")
COMFY = Path(os.environ.get("KEYFACE_COMFYUI", ROOT / ".comfyui"))
VENV_PY = Path(os.environ.get("KEYFACE_VENV", ROOT / ".venv")) / "bin" / "python"
WORKFLOW = ROOT / "workflows" / "keyface_emotion_over_time.json"
SPEECH = ROOT / "tests" / "fixtures" / "media" / "speech_female_arctic_a0009.wav"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
EMOTION_CLASS = "KeyFaceEmotion"

INITIAL_CURVE = {"version": 1,
                 "valence": [[0, 0], [1, 0.85], [2.5, -0.85], [4, 0]],
                 "arousal": [[0, 0], [1, 0.75], [2.5, -0.35], [4, 0]],
                 "interpolation": "monotone"}

# ----------------------------------------------------------------------------------------- server
try:  # the shared fixture (real ComfyUI with the whole pack and smoke models), when it exists
    from comfy_server import comfy_server  # noqa: F401
    _SHARED_SERVER = True
except ImportError:
    _SHARED_SERVER = False


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, url, base):
        self.url = url
        self.base = Path(base)
        self.output_dir = self.base / "output"
        self.input_dir = self.base / "input"
        self.models_dir = self.base / "models"


if not _SHARED_SERVER:
    @pytest.fixture(scope="session")
    def comfy_server():
        """Minimal launcher: ComfyUI 0.3.75 with this pack (the repository, symlinked into a temporary
        custom_nodes folder, the only custom node loaded) and the real frontend package."""
        requests = pytest.importorskip("requests")
        if not (COMFY / "main.py").is_file():
            pytest.skip(f"no ComfyUI at {COMFY}: run scripts/setup_env.sh")
        base = Path(tempfile.mkdtemp(prefix="keyface-browser-"))
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "keyface").symlink_to(ROOT, target_is_directory=True)
        for d in ("input", "output", "temp", "user", "models"):
            (base / d).mkdir(exist_ok=True)
        port = _free_port()
        log = open(base / "comfyui.log", "w")
        py = str(VENV_PY if VENV_PY.exists() else sys.executable)
        proc = subprocess.Popen(
            [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
             "--disable-all-custom-nodes", "--whitelist-custom-nodes", "keyface",
             "--disable-auto-launch"],
            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n{(base / 'comfyui.log').read_text()[-4000:]}")
                try:
                    if requests.get(url + "/object_info/" + EMOTION_CLASS, timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{(base / 'comfyui.log').read_text()[-4000:]}")
                time.sleep(0.5)
            yield _Server(url, base)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------- workflow
def _own_workflow():
    """UI-format workflow: LoadAudio → KeyFace Emotion (custom curve)."""
    return {
        "last_node_id": 2, "last_link_id": 1,
        "nodes": [
            {"id": 1, "type": "LoadAudio", "pos": [40, 120], "size": [300, 140], "flags": {}, "order": 0,
             "mode": 0, "inputs": [], "outputs": [{"name": "AUDIO", "type": "AUDIO", "links": [1]}],
             "properties": {"Node name for S&R": "LoadAudio"}, "widgets_values": ["keyface_speech.wav"]},
            {"id": 2, "type": EMOTION_CLASS, "pos": [400, 80], "size": [460, 420], "flags": {}, "order": 1,
             "mode": 0,
             "inputs": [{"name": "audio", "type": "AUDIO", "link": 1}],
             "outputs": [{"name": "emotion", "type": "KEYFACE_EMOTION", "links": []}],
             "properties": {"Node name for S&R": EMOTION_CLASS},
             "widgets_values": ["custom curve", json.dumps(INITIAL_CURVE), 1.0, "", 0.0]},
        ],
        "links": [[1, 1, 0, 2, 0, "AUDIO"]],
        "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }


def _load_workflow():
    if WORKFLOW.is_file():
        wf = json.loads(WORKFLOW.read_text())
        if any(n.get("type") == EMOTION_CLASS for n in wf.get("nodes", [])):
            return wf, "repo"
    return _own_workflow(), "own"


# ------------------------------------------------------------------------------------- page helpers
JS_HELPERS = r"""
window.__kf = {
  app: () => window.comfyAPI.app.app,
  node: () => window.comfyAPI.app.app.graph.nodes.find(n => n.type === "KeyFaceEmotion"),
  editor: () => window.__kf.node().keyfaceEmotionEditor,
  // screen (page) coordinates of a curve point
  pointXY: (series, index) => {
    const ed = window.__kf.editor();
    const L = ed.layout();
    const [t, v] = ed.curve[series][index];
    const r = ed.canvas.getBoundingClientRect();
    const sx = r.width / ed.canvas.clientWidth, sy = r.height / ed.canvas.clientHeight;
    return { x: r.left + L.tx(t) * sx, y: r.top + L.vy(v) * sy };
  },
  // screen coordinates of a (t, v) position in the plot
  posXY: (t, v) => {
    const ed = window.__kf.editor();
    const L = ed.layout();
    const r = ed.canvas.getBoundingClientRect();
    const sx = r.width / ed.canvas.clientWidth, sy = r.height / ed.canvas.clientHeight;
    return { x: r.left + L.tx(t) * sx, y: r.top + L.vy(v) * sy };
  },
  promptCurve: async () => {
    const p = await window.comfyAPI.app.app.graphToPrompt();
    const id = String(window.__kf.node().id);
    return { curve: p.output[id].inputs.curve, inputs: p.output[id].inputs, classType: p.output[id].class_type };
  },
  nodeRect: () => {
    const app = window.comfyAPI.app.app, n = window.__kf.node();
    const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
    const th = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
    return { x: r.left + x, y: r.top + y, width: n.size[0] * ds.scale, height: (n.size[1] + th) * ds.scale };
  },
};
"""


def _curve_from_prompt(page):
    res = page.evaluate("window.__kf.promptCurve()")
    assert res["classType"] == EMOTION_CLASS
    assert isinstance(res["curve"], str), "the curve must travel as one plain string"
    return json.loads(res["curve"]), res["inputs"]


def _wait_settled(page):
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def test_emotion_curve_editor_in_real_frontend(comfy_server):
    requests = pytest.importorskip("requests")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: run KEYFACE_WITH_BROWSER=1 scripts/setup_env.sh")

    info = requests.get(f"{comfy_server.url}/object_info/{EMOTION_CLASS}", timeout=30).json()
    assert EMOTION_CLASS in info, (
        f"{EMOTION_CLASS} is not registered on the server: nodes/__init__.py must merge "
        "nodes.emotion.NODE_CLASS_MAPPINGS")
    workflow, origin = _load_workflow()
    # the audio files the workflow's LoadAudio nodes name must exist in the server's input folder
    input_dir = Path(comfy_server.input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    for n in workflow["nodes"]:
        if n.get("type") == "LoadAudio" and n.get("widgets_values"):
            name = n["widgets_values"][0]
            if isinstance(name, str) and not (input_dir / name).exists():
                (input_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(SPEECH, input_dir / name)

    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            # no first-run template browser over the canvas
            requests.post(f"{comfy_server.url}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
            page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function(
                "() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensions?.some("
                "e => e.name === 'KeyFace.EmotionCurveEditor') && !!LiteGraph.registered_node_types."
                + EMOTION_CLASS, timeout=60_000)
            page.evaluate(JS_HELPERS)

            # ---- load the workflow through the real loader
            page.evaluate(
                "async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null, "
                "{showMissingNodesDialog: false, showMissingModelsDialog: false}); }", workflow)
            page.wait_for_function("() => !!window.__kf.node()?.keyfaceEmotionEditor", timeout=20_000)
            node_id = page.evaluate("String(window.__kf.node().id)")
            loaded = json.loads(page.evaluate("window.__kf.node().widgets.find(w => w.name === 'curve').value"))
            if origin == "own":
                assert loaded == INITIAL_CURVE
            # make sure the node is in custom-curve mode and shown at zoom 1, fully on screen
            page.evaluate("""() => {
                const app = window.__kf.app(), n = window.__kf.node();
                const em = n.widgets.find(w => w.name === 'emotion');
                if (em.value !== 'custom curve') em.value = 'custom curve';
                if (n.size[0] < 460 || n.size[1] < 420) n.setSize([Math.max(n.size[0], 460), Math.max(n.size[1], 420)]);
                app.canvas.deselectAll?.();
                app.canvas.ds.scale = 1;
                app.canvas.ds.offset = [-n.pos[0] + 220, -n.pos[1] + 200];
                app.canvas.setDirty(true, true);
                app.canvas.draw(true, true);
            }""")
            page.wait_for_timeout(300)
            _wait_settled(page)
            editor = page.locator(".keyface-emotion-editor canvas").first
            editor.wait_for(state="visible", timeout=10_000)
            box = editor.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 80, f"editor too small: {box}"

            if origin == "own":  # the duration of the LoadAudio file is read before anything runs
                page.wait_for_function("() => window.__kf.editor().audioDuration > 0", timeout=20_000)
                assert abs(page.evaluate("window.__kf.editor().audioDuration") - 3.095) < 0.02
                assert re.search(r"audio 3\.\d\d s", page.locator(".keyface-emotion-editor .kf-status").first.inner_text())
            before, _ = _curve_from_prompt(page)
            assert before["version"] == 1
            if len(before["valence"]) < 3:  # the shipped workflow's curve is too simple to drag a middle point
                page.locator("textarea.keyface-emotion-curve-text").first.fill(json.dumps(INITIAL_CURVE))
                _wait_settled(page)
                before, _ = _curve_from_prompt(page)
                assert before == INITIAL_CURVE

            # ---- drag the second valence point with real mouse events
            idx = 1
            t0, v0 = before["valence"][idx]
            t_prev = before["valence"][idx - 1][0]
            t_next = before["valence"][idx + 1][0] if len(before["valence"]) > idx + 1 else t0 + 2
            t_target = round(t0 + 0.3 * (t_next - t0), 3)
            v_target = -0.4 if v0 > 0 else 0.4
            start = page.evaluate("([s, i]) => window.__kf.pointXY(s, i)", ["valence", idx])
            end = page.evaluate("([t, v]) => window.__kf.posXY(t, v)", [t_target, v_target])
            page.mouse.move(start["x"], start["y"])
            page.mouse.down()
            page.mouse.move((start["x"] + end["x"]) / 2, (start["y"] + end["y"]) / 2, steps=5)
            page.mouse.move(end["x"], end["y"], steps=8)
            page.mouse.up()
            _wait_settled(page)

            after, inputs = _curve_from_prompt(page)
            assert after["version"] == 1
            assert len(after["valence"]) == len(before["valence"])
            t1, v1 = after["valence"][idx]
            assert abs(t1 - t_target) < 0.06, (after, t_target)
            assert abs(v1 - v_target) < 0.03, (after, v_target)
            assert after["valence"][:idx] == before["valence"][:idx]
            assert after["valence"][idx + 1:] == before["valence"][idx + 1:]
            assert after["arousal"] == before["arousal"]
            assert inputs["emotion"] == "custom curve"
            assert "keyface_emotion_editor" not in inputs, "the editor widget must not be serialized"
            wf_after = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).workflow")
            wnode = next(n for n in wf_after["nodes"] if str(n["id"]) == node_id)
            assert json.loads(wnode["widgets_values"][1]) == after  # workflow JSON carries the same string

            # ---- keyboard: Delete removes the selected (dragged) point, the node stays; Ctrl+Z restores
            page.keyboard.press("Delete")
            _wait_settled(page)
            deleted, _ = _curve_from_prompt(page)
            assert len(deleted["valence"]) == len(after["valence"]) - 1
            assert page.evaluate("!!window.__kf.node()"), "Delete in the editor must not delete the node"
            page.keyboard.press("Control+z")
            _wait_settled(page)
            undone, _ = _curve_from_prompt(page)
            assert undone == after

            # ---- preset at the playhead (click in the time ruler first), then the undo button
            ruler = page.evaluate("() => { const L = window.__kf.editor().layout(); return window.__kf.posXY(L.T * 0.9, -1); }")
            page.mouse.click(ruler["x"], ruler["y"] + 8)
            playhead = page.evaluate("window.__kf.editor().playhead")
            page.locator(".keyface-emotion-editor select.kf-preset").first.select_option("sad")
            with_preset, _ = _curve_from_prompt(page)
            tp = round(playhead, 3)
            assert [tp, -0.85] in [[round(t, 3), v] for t, v in with_preset["valence"]]
            assert [tp, -0.35] in [[round(t, 3), a] for t, a in with_preset["arousal"]]
            page.locator(".keyface-emotion-editor button", has_text="undo").first.click()
            back, _ = _curve_from_prompt(page)
            assert back == after

            # ---- double-click adds a point to the active curve, right-click deletes it
            add = page.evaluate("([t, v]) => window.__kf.posXY(t, v)", [3.3, 0.6])
            page.mouse.dblclick(add["x"], add["y"])
            added, _ = _curve_from_prompt(page)
            assert len(added["valence"]) == len(after["valence"]) + 1
            new_pts = [p for p in added["valence"] if p not in after["valence"]]
            assert len(new_pts) == 1 and abs(new_pts[0][0] - 3.3) < 0.06 and abs(new_pts[0][1] - 0.6) < 0.03
            page.mouse.click(add["x"], add["y"], button="right")
            removed, _ = _curve_from_prompt(page)
            assert removed == after

            # ---- textarea: typing re-renders the editor; hiding it keeps the value in the prompt
            typed = copy.deepcopy(after)
            typed["arousal"] = [[0, 0.5], [3, -0.5]]
            typed["interpolation"] = "linear"
            ta = page.locator("textarea.keyface-emotion-curve-text").first
            ta.fill(json.dumps(typed))
            _wait_settled(page)
            assert page.evaluate("window.__kf.editor().curve.arousal") == [[0, 0.5], [3, -0.5]]
            assert page.evaluate("window.__kf.editor().curve.interpolation") == "linear"
            ta.fill("{ not json")
            _wait_settled(page)
            assert "JSON" in page.locator(".keyface-emotion-editor .kf-status").first.inner_text()
            ta.fill(json.dumps(after))
            _wait_settled(page)
            page.locator(".keyface-emotion-editor button", has_text="{ }").first.click()
            _wait_settled(page)
            assert page.evaluate("window.__kf.node().widgets.find(w => w.name === 'curve').hidden") is True
            hidden_curve, _ = _curve_from_prompt(page)
            assert hidden_curve == after
            page.locator(".keyface-emotion-editor button", has_text="{ }").first.click()
            _wait_settled(page)

            # ---- queue through the frontend (emotion node as the target) and check /history
            with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                      timeout=30_000) as resp:
                page.evaluate("(id) => window.comfyAPI.app.app.queuePrompt(0, 1, [id])", node_id)
            body = resp.value.json()
            assert not body.get("node_errors"), body
            prompt_id = body["prompt_id"]
            entry = None
            deadline = time.time() + 120
            while time.time() < deadline:
                h = requests.get(f"{comfy_server.url}/history/{prompt_id}", timeout=10).json()
                entry = h.get(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None and (
                        entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                    break
                time.sleep(0.5)
            assert entry, "prompt never reached /history"
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
            sent = entry["prompt"][2][node_id]["inputs"]["curve"]
            assert json.loads(sent) == after
            ui = entry["outputs"][node_id]["keyface_emotion"][0]
            assert json.loads(ui["curve"]) == after
            assert ui["source"] == "custom curve"
            # the sampled curve the node reports goes through the dragged point
            k = round(t1 * ui["fps"])
            if abs(k / ui["fps"] - t1) < 1e-6:
                assert abs(ui["valence"][k] - v1) < 1e-4
            # executed → the editor shows the audio duration from the LoadAudio input
            if origin == "own":
                page.wait_for_function(
                    "() => window.__kf.editor().executedDuration > 0", timeout=20_000)
                assert abs(ui["duration"] - page.evaluate("window.__kf.editor().executedDuration")) < 1e-6
                assert "audio " in page.locator(".keyface-emotion-editor .kf-status").first.inner_text()

            # ---- zoom: the backing store follows the on-screen size (sharp at 1.5x)
            page.evaluate("() => { const a = window.__kf.app(); a.canvas.ds.scale = 1.5; a.canvas.setDirty(true, true); a.canvas.draw(true, true); }")
            page.wait_for_timeout(300)
            _wait_settled(page)
            sizes = page.evaluate("() => { const c = window.__kf.editor().canvas; const r = c.getBoundingClientRect(); return [c.width, r.width]; }")
            assert abs(sizes[0] - sizes[1]) <= 2, sizes
            page.evaluate("() => { const a = window.__kf.app(), n = window.__kf.node(); a.canvas.ds.scale = 1; a.canvas.ds.offset = [-n.pos[0] + 220, -n.pos[1] + 200]; a.canvas.setDirty(true, true); a.canvas.draw(true, true); }")
            page.wait_for_timeout(300)
            _wait_settled(page)

            # ---- screenshot of the node
            page.evaluate("() => { const ed = window.__kf.editor(); ed.selected = {series: 'valence', index: 1}; ed.draw(); }")
            rect = page.evaluate("window.__kf.nodeRect()")
            pad = 8
            page.screenshot(path=str(ARTIFACTS / "emotion_editor.png"), clip={
                "x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad),
                "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad})
        finally:
            browser.close()
    errors = [c for c in console if c.startswith("pageerror") and "keyface" in c.lower()]
    assert not errors, errors
