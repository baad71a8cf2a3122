"""A whole run queued through the real frontend, on each frontend and renderer: the emotion workflow,
its video written by KeyFace Save Video. Checks in ``/history`` that the executed prompt carried the
curve, that KeyFace Emotion's preview reached the editor (the audio's length, the sampled values), and
that the video preview in the node loads (a playing <video>, no "Image failed to load"). Leaves a
screenshot of the preview: test-artifacts/save_video_preview-<frontend>-<renderer>.png."""

import json

import pytest

from browser_page import MEDIA, load_workflow, node_of, wav_seconds
from keyface import emotion as kfe

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SAVE_CLASS = "KeyFaceSaveVideo"
SAMPLER_CLASS = "KeyFaceSampleKeyframes"

# Replace Decode -> Create Video -> Save Video by KeyFace Save Video, with the frontend's own graph API.
USE_KEYFACE_SAVE_VIDEO = """() => {
    const g = window.__kf.app().graph, byType = (t) => g.nodes.find(n => n.type === t);
    const vae = byType('KeyFaceVAELoader'), interp = byType('KeyFaceInterpolate'), enc = byType('KeyFaceEncodeAudio');
    for (const t of ['KeyFaceDecode', 'CreateVideo', 'SaveVideo']) g.remove(byType(t));
    const save = LiteGraph.createNode('KeyFaceSaveVideo');
    save.pos = [interp.pos[0] + interp.size[0] + 60, interp.pos[1]];
    g.add(save);
    const slot = (name) => save.inputs.findIndex(i => i.name === name);
    vae.connect(0, save, slot('vae'));
    interp.connect(0, save, slot('latent'));
    enc.connect(enc.outputs.findIndex(o => o.name === 'audio'), save, slot('audio'));
    save.widgets.find(w => w.name === 'filename_prefix').value = 'keyface/browser';
    return String(save.id);
}"""

# The <video> showing `file` in the page (either renderer), and whether an image-load error is shown.
PREVIEW_STATE = """(file) => {
    const v = [...document.querySelectorAll('video')].find(v => (v.currentSrc || v.src || '').includes(encodeURIComponent(file)) || (v.currentSrc || v.src || '').includes(file));
    const failed = [...document.querySelectorAll('body *')].some(e => e.children.length === 0 && /failed to load|invalid url/i.test(e.textContent || '') && window.__kf.shown(e));
    return { found: !!v, ready: v ? v.readyState : -1, error: v?.error ? v.error.code : null, width: v?.videoWidth ?? 0, failed };
}"""


def test_run_through_the_frontend(kf_page):
    kf, server = kf_page, kf_page.server
    workflow = load_workflow()
    seconds = wav_seconds(MEDIA / node_of(workflow, "LoadAudio")["widgets_values"][0])
    kf.load_emotion_workflow(workflow)
    curve, _ = kf.curve_from_prompt()
    node_id = kf.js("String(window.__kf.node().id)")
    save_id = kf.js(USE_KEYFACE_SAVE_VIDEO)
    kf.settle(200)
    server.free()  # every node runs (an earlier test's run on this server left results in the cache)

    with kf.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST",
                                 timeout=30_000) as resp:
        kf.js("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
    body = resp.value.json()
    assert not body.get("node_errors"), body
    entry = server.wait(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    executed = entry["prompt"][2]
    assert json.loads(executed[node_id]["inputs"]["curve"]) == curve
    samplers = [k for k, v in executed.items() if v["class_type"] == SAMPLER_CLASS]
    assert len(samplers) == 1 and executed[samplers[0]]["inputs"]["emotion"] == [node_id, 0], executed

    # KeyFace Emotion's preview (it is no output node: it ran because the sampler needed it)
    ui = entry["outputs"][node_id]["keyface_emotion"][0]
    assert json.loads(ui["curve"]) == curve and ui["duration_source"] == "audio"
    assert abs(ui["duration"] - seconds) < 1e-3
    kf.page.wait_for_function("() => window.__kf.editor().executedDuration > 0", timeout=20_000)
    assert abs(kf.js("window.__kf.editor().executedDuration") - ui["duration"]) < 1e-6
    # the status gives the playhead frame's values as the sampler gets them (intensity applied)
    kf.js("() => { window.__kf.setWidget('intensity', 1.5); const ed = window.__kf.editor(); ed.playhead = 1.04; ed.draw(); }")
    v, a = kfe.parse_curve(json.dumps(curve)).with_intensity(1.5).sample_lists([26 / 25])
    text = kf.status()["text"]
    assert f"frame 26 (x1.50): v {v[0]:.2f} a {a[0]:.2f}" in text, text

    # the video preview of KeyFace Save Video loads
    (item,) = entry["outputs"][save_id]["images"]
    assert item["filename"].endswith(".mp4") and item["type"] == "output", item
    kf.js("(t) => window.__kf.home(t)", SAVE_CLASS)
    try:
        kf.page.wait_for_function(f"(f) => {{ const s = ({PREVIEW_STATE})(f); return s.found && s.ready >= 1; }}",
                                  arg=item["filename"], timeout=20_000)
    finally:
        kf.settle(500)
        kf.screenshot_node("save_video_preview", SAVE_CLASS)
    state = kf.js(PREVIEW_STATE, item["filename"])
    assert state["error"] is None and state["width"] > 0 and not state["failed"], state
