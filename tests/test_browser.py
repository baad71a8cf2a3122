"""The emotion curve editor in a real browser, against a real ComfyUI and its real frontend.

Debian chromium (``/usr/bin/chromium``, headless) driven by Playwright for Python loads the ComfyUI
page (the shared ``comfy_server`` fixture of ``tests/comfy_server.py``: the whole pack and the smoke
models), loads the shipped ``workflows/keyface_emotion_over_time.json`` with ``app.loadGraphData``,
drags a control point of the editor's valence curve with real mouse events and checks that
``app.graphToPrompt()`` carries the new curve as one plain JSON string. It also checks Delete / Ctrl+Z,
presets, double-click / right-click, the linear/monotone toggle, the textarea (typed text re-renders
the editor, invalid text shows the error, sub-millisecond points still serialize to text Python
accepts), the duration label (audio vs duration hint), resizing and zooming the node, that the zero
line is drawn, and that the toolbar follows the selection. Then it queues the whole workflow through
the frontend (``app.queuePrompt``) and checks in ``/history`` that the run rendered a video and that
the executed prompt carried the dragged curve. A screenshot of the node goes to
``test-artifacts/emotion_editor.png``.

The test skips when chromium, Playwright, requests or ComfyUI are missing, except when
``KEYFACE_REQUIRE_BROWSER=1`` or ``CI=true``: then it fails, so CI cannot pass without it.
"""

import copy
import importlib
import json
import os
import wave
from pathlib import Path

import pytest

import comfy_server as comfy_env
from comfy_server import comfy_server  # noqa: F401  (session fixture, requested lazily below)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("KEYFACE_CHROMIUM", "/usr/bin/chromium")
WORKFLOW = ROOT / "workflows" / "keyface_emotion_over_time.json"
MEDIA = ROOT / "tests" / "fixtures" / "media"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
EMOTION_CLASS = "KeyFaceEmotion"
SAMPLER_CLASS = "KeyFaceSampleKeyframes"


# ------------------------------------------------------------------------------------ availability
def _browser_required():
    return os.environ.get("KEYFACE_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "").lower() == "true"


def _unavailable(why):
    """Skip on a developer machine; fail where the browser test is required (CI)."""
    if _browser_required():
        pytest.fail(f"the browser test is required here (KEYFACE_REQUIRE_BROWSER=1 or CI=true) but cannot "
                    f"run: {why}. Install it with KEYFACE_WITH_BROWSER=1 scripts/setup_env.sh", pytrace=False)
    pytest.skip(why)


def _import_or_unavailable(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _unavailable(f"cannot import {name} ({e})")


def _server_or_unavailable(request):
    """The shared ComfyUI fixture, requested only once the browser side is known to be there."""
    if not (comfy_env.comfyui_dir() / "main.py").is_file():
        _unavailable(f"no ComfyUI at {comfy_env.comfyui_dir()}")
    try:
        return request.getfixturevalue("comfy_server")
    except pytest.skip.Exception as e:
        _unavailable(f"the comfy_server fixture skipped: {e}")


def _wav_seconds(path):
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def _emotion_node(workflow):
    nodes = [n for n in workflow["nodes"] if n.get("type") == EMOTION_CLASS]
    assert len(nodes) == 1, f"{WORKFLOW.name} must hold one {EMOTION_CLASS} node"
    return nodes[0]


@pytest.mark.parametrize("env, outcome", [
    ({}, pytest.skip.Exception),
    ({"KEYFACE_REQUIRE_BROWSER": "1"}, pytest.fail.Exception),
    ({"CI": "true"}, pytest.fail.Exception),
], ids=["developer", "required", "ci"])
def test_missing_browser_is_a_failure_where_required(monkeypatch, env, outcome):
    """CI must not pass by skipping the browser test (runs without a browser)."""
    for k in ("KEYFACE_REQUIRE_BROWSER", "CI"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(outcome, match="no chromium"):
        _unavailable("no chromium")


# ------------------------------------------------------------------------------------- page helpers
JS_HELPERS = r"""
window.__kf = {
  app: () => window.comfyAPI.app.app,
  node: () => window.comfyAPI.app.app.graph.nodes.find(n => n.type === "KeyFaceEmotion"),
  editor: () => window.__kf.node().keyfaceEmotionEditor,
  widget: (name) => window.__kf.node().widgets.find(w => w.name === name),
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
  redraw: () => { const a = window.__kf.app(); a.canvas.setDirty(true, true); a.canvas.draw(true, true); },
  // the node at zoom 1, fully on screen
  home: () => {
    const app = window.__kf.app(), n = window.__kf.node();
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [-n.pos[0] + 220, -n.pos[1] + 200];
    window.__kf.redraw();
  },
  canvasSize: () => {
    const c = window.__kf.editor().canvas, r = c.getBoundingClientRect();
    return { backing: [c.width, c.height], screen: [r.width, r.height] };
  },
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


def _curve_from_prompt(page):
    res = page.evaluate("window.__kf.promptCurve()")
    assert res["classType"] == EMOTION_CLASS
    assert isinstance(res["curve"], str), "the curve must travel as one plain string"
    return json.loads(res["curve"]), res["inputs"]


def _wait_settled(page, ms=0):
    if ms:
        page.wait_for_timeout(ms)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _status(page):
    return page.evaluate("window.__kf.status()")


def _type_curve(page, text):
    page.locator("textarea.keyface-emotion-curve-text").first.fill(text)
    _wait_settled(page)


def _wait_history(server, prompt_id, timeout=300):
    entry = server.wait(prompt_id, timeout=timeout)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


# ------------------------------------------------------------------------------------------- test
def test_emotion_curve_editor_in_real_frontend(request):
    requests = _import_or_unavailable("requests")
    sync_api = _import_or_unavailable("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} not found")
    server = _server_or_unavailable(request)
    from keyface import emotion as kfe

    info = requests.get(f"{server.url}/object_info/{EMOTION_CLASS}", timeout=30).json()
    assert EMOTION_CLASS in info, (
        f"{EMOTION_CLASS} is not registered on the server: nodes/__init__.py must merge "
        "nodes.emotion.NODE_CLASS_MAPPINGS")
    workflow = json.loads(WORKFLOW.read_text())
    shipped = json.loads(_emotion_node(workflow)["widgets_values"][1])
    audio_name = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadAudio")
    assert (Path(server.input_dir) / audio_name).is_file(), f"the fixture did not provide {audio_name}"
    audio_seconds = _wav_seconds(MEDIA / audio_name)

    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            # no first-run template browser over the canvas
            requests.post(f"{server.url}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
            page.goto(server.url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function(
                "() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.extensions?.some("
                "e => e.name === 'KeyFace.EmotionCurveEditor') && !!LiteGraph.registered_node_types."
                + EMOTION_CLASS, timeout=60_000)
            page.evaluate(JS_HELPERS)

            # ---- load the shipped workflow through the real loader
            page.evaluate(
                "async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf, true, true, null, "
                "{showMissingNodesDialog: false, showMissingModelsDialog: false}); }", workflow)
            page.wait_for_function("() => !!window.__kf.node()?.keyfaceEmotionEditor", timeout=20_000)
            node_id = page.evaluate("String(window.__kf.node().id)")
            assert json.loads(page.evaluate("window.__kf.widget('curve').value")) == shipped
            assert page.evaluate("window.__kf.widget('emotion').value") == "custom curve"
            page.evaluate("""() => {
                const n = window.__kf.node();
                if (n.size[0] < 460 || n.size[1] < 420) n.setSize([Math.max(n.size[0], 460), Math.max(n.size[1], 420)]);
                window.__kf.app().canvas.deselectAll?.();
                window.__kf.home();
            }""")
            _wait_settled(page, 300)
            editor = page.locator(".keyface-emotion-editor canvas").first
            editor.wait_for(state="visible", timeout=10_000)
            box = editor.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 80, f"editor too small: {box}"

            # ---- duration: read from the LoadAudio file before anything runs, labelled "audio"; the
            # duration_hint (set to 2.5 s here to tell them apart) is labelled as such once unlinked
            page.wait_for_function("() => window.__kf.editor().audioDuration > 0", timeout=20_000)
            assert abs(page.evaluate("window.__kf.editor().audioDuration") - audio_seconds) < 0.02
            assert f"audio {audio_seconds:.2f} s" in _status(page)["text"]
            hint_before = page.evaluate("window.__kf.widget('duration_hint').value")
            page.evaluate("""() => {
                const n = window.__kf.node(), w = window.__kf.widget('duration_hint');
                w.value = 2.5; w.callback?.(2.5);
                n.disconnectInput(n.inputs.findIndex(i => i.name === 'audio'));
                window.__kf.redraw();
            }""")
            _wait_settled(page)
            text = _status(page)["text"]
            assert "duration hint 2.50 s" in text and "audio" not in text, text
            page.evaluate("""(hint) => {
                const n = window.__kf.node(), w = window.__kf.widget('duration_hint');
                const src = window.__kf.app().graph.nodes.find(m => m.type === 'LoadAudio');
                src.connect(0, n, n.inputs.findIndex(i => i.name === 'audio'));
                w.value = hint; w.callback?.(hint);
                window.__kf.redraw();
            }""", hint_before)
            page.wait_for_function("() => window.__kf.editor().audioDuration > 0", timeout=20_000)
            _wait_settled(page)
            assert f"audio {audio_seconds:.2f} s" in _status(page)["text"]

            before, inputs = _curve_from_prompt(page)
            assert before == shipped and isinstance(inputs["audio"], list), inputs
            assert len(before["valence"]) >= 3, "the shipped curve needs a middle valence point to drag"

            # ---- the zero line is drawn: its pixel row is mostly the dashed grey, a row at 0.25 is not
            zero, quarter = page.evaluate("[window.__kf.greyRow(0), window.__kf.greyRow(0.25)]")
            assert zero > 0.4 and quarter < 0.1, (zero, quarter)

            # ---- drag the second valence point with real mouse events
            idx = 1
            t0, v0 = before["valence"][idx]
            t_next = before["valence"][idx + 1][0]
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
            # the dragged point is selected: the toolbar's delete button is live
            assert page.evaluate("window.__kf.editor().deleteButton.disabled") is False

            # ---- keyboard: Delete removes the selected (dragged) point, the node stays; Ctrl+Z restores
            page.keyboard.press("Delete")
            _wait_settled(page)
            deleted, _ = _curve_from_prompt(page)
            assert len(deleted["valence"]) == len(after["valence"]) - 1
            assert page.evaluate("!!window.__kf.node()"), "Delete in the editor must not delete the node"
            assert page.evaluate("window.__kf.editor().deleteButton.disabled") is True  # nothing selected
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

            # ---- interpolation toggle: the curve string switches to linear (points unchanged) and back
            interp = page.locator(".keyface-emotion-editor button", has_text=after["interpolation"]).first
            interp.click()
            toggled, _ = _curve_from_prompt(page)
            other = "linear" if after["interpolation"] == "monotone" else "monotone"
            assert toggled == {**after, "interpolation": other}
            page.locator(".keyface-emotion-editor button", has_text=other).first.click()
            assert _curve_from_prompt(page)[0] == after

            # ---- textarea: typing re-renders the editor; invalid text shows its error in the widget
            typed = copy.deepcopy(after)
            typed["arousal"] = [[0, 0.5], [3, -0.5]]
            typed["interpolation"] = "linear"
            _type_curve(page, json.dumps(typed))
            assert page.evaluate("window.__kf.editor().curve.arousal") == [[0, 0.5], [3, -0.5]]
            assert page.evaluate("window.__kf.editor().curve.interpolation") == "linear"
            assert _status(page)["error"] is False
            _type_curve(page, "{ not json")
            st = _status(page)
            assert st["error"] and "not valid JSON" in st["text"], st
            dup = copy.deepcopy(after)
            dup["valence"] = [[1, 0], [1, 0.5]]
            _type_curve(page, json.dumps(dup))
            st = _status(page)
            assert st["error"] and "duplicate time" in st["text"], st
            # points closer than the 1 ms the editor writes: valid for Python, and still valid once the
            # editor rewrites the text (an edit: the interpolation toggle)
            close = copy.deepcopy(after)
            close["valence"] = [[0, 0.2], [1.0001, 0], [1.0004, 0.5], [3, -0.3]]
            _type_curve(page, json.dumps(close))
            assert _status(page)["error"] is False
            page.locator(".keyface-emotion-editor button", has_text=after["interpolation"]).first.click()
            _wait_settled(page)
            written = page.evaluate("window.__kf.widget('curve').value")
            parsed = kfe.parse_curve(written)  # would raise "duplicate time" with plain 1 ms rounding
            assert [t for t, _ in parsed.valence] == [0.0, 1.0, 1.001, 3.0], written
            assert _status(page)["error"] is False
            _type_curve(page, json.dumps(after))
            assert _curve_from_prompt(page)[0] == after
            page.locator(".keyface-emotion-editor button", has_text="{ }").first.click()
            _wait_settled(page)
            assert page.evaluate("window.__kf.widget('curve').hidden") is True
            assert _curve_from_prompt(page)[0] == after
            page.locator(".keyface-emotion-editor button", has_text="{ }").first.click()
            _wait_settled(page)

            # ---- resize: the editor canvas follows the node (layout and sharp backing store)
            size0 = page.evaluate("window.__kf.canvasSize()")
            page.evaluate("() => { const n = window.__kf.node(); n.setSize([n.size[0] + 160, n.size[1] + 80]); window.__kf.redraw(); }")
            _wait_settled(page, 300)
            size1 = page.evaluate("window.__kf.canvasSize()")
            assert abs(size1["screen"][0] - size0["screen"][0] - 160) <= 6, (size0, size1)
            assert size1["screen"][1] - size0["screen"][1] >= 40, (size0, size1)
            assert all(abs(b - s) <= 2 for b, s in zip(size1["backing"], size1["screen"])), size1
            page.evaluate("() => { const n = window.__kf.node(); n.setSize([n.size[0] - 160, n.size[1] - 80]); window.__kf.redraw(); }")
            _wait_settled(page, 300)

            # ---- zoom: the backing store follows the on-screen size (sharp at 1.5x)
            page.evaluate("() => { window.__kf.app().canvas.ds.scale = 1.5; window.__kf.redraw(); }")
            _wait_settled(page, 300)
            sizes = page.evaluate("window.__kf.canvasSize()")
            assert abs(sizes["backing"][0] - sizes["screen"][0]) <= 2, sizes
            page.evaluate("window.__kf.home()")
            _wait_settled(page, 300)

            # ---- queue the whole workflow through the frontend and check /history
            with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                      timeout=30_000) as resp:
                page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
            body = resp.value.json()
            assert not body.get("node_errors"), body
            entry = _wait_history(server, body["prompt_id"])
            executed = entry["prompt"][2]
            assert json.loads(executed[node_id]["inputs"]["curve"]) == after
            samplers = [k for k, v in executed.items() if v["class_type"] == SAMPLER_CLASS]
            assert len(samplers) == 1 and executed[samplers[0]]["inputs"]["emotion"] == [node_id, 0], executed
            ui = entry["outputs"][node_id]["keyface_emotion"][0]
            assert json.loads(ui["curve"]) == after and ui["source"] == "custom curve"
            assert ui["duration_source"] == "audio" and abs(ui["duration"] - audio_seconds) < 1e-3
            # the sampled curve the node reports goes through the dragged point
            k = round(t1 * ui["fps"])
            if abs(k / ui["fps"] - t1) < 1e-6:
                assert abs(ui["valence"][k] - v1) < 1e-4
            videos = [item["filename"] for out in entry["outputs"].values() for item in out.get("images", [])
                      if str(item.get("filename", "")).endswith(".mp4")]
            assert len(videos) == 1, entry["outputs"]
            # executed → the editor shows the audio duration the node reported
            page.wait_for_function("() => window.__kf.editor().executedDuration > 0", timeout=20_000)
            assert abs(ui["duration"] - page.evaluate("window.__kf.editor().executedDuration")) < 1e-6
            assert f"audio {audio_seconds:.2f} s" in _status(page)["text"]

            # ---- status: the playhead frame's values as the sampler gets them (intensity applied)
            page.evaluate("""() => {
                const w = window.__kf.widget('intensity'), ed = window.__kf.editor();
                w.value = 1.5; w.callback?.(1.5);
                ed.playhead = 1.04; ed.draw();
            }""")
            v, a = kfe.parse_curve(json.dumps(after)).with_intensity(1.5).sample_lists([26 / 25])
            text = _status(page)["text"]
            assert f"frame 26 (x1.50): v {v[0]:.2f} a {a[0]:.2f}" in text, text
            page.evaluate("() => { const w = window.__kf.widget('intensity'); w.value = 1.0; w.callback?.(1.0); }")

            # ---- screenshot of the node, a point selected (setting the selection refreshes the toolbar)
            page.evaluate("() => { const ed = window.__kf.editor(); ed.selected = {series: 'valence', index: 1}; ed.draw(); }")
            assert page.evaluate("window.__kf.editor().deleteButton.disabled") is False
            _wait_settled(page)
            rect = page.evaluate("window.__kf.nodeRect()")
            pad = 8
            page.screenshot(path=str(ARTIFACTS / "emotion_editor.png"), clip={
                "x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad),
                "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad})
        finally:
            browser.close()
    errors = [c for c in console if c.startswith("pageerror") and "keyface" in c.lower()]
    assert not errors, errors
