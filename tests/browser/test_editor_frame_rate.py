"""The emotion editor's frame readout uses the frame rate the server serves with the node definition
(the ``keyface_fps`` option of the ``curve`` input, from ``keyface.planner.FPS``), on each frontend and
renderer: the frontends pass the option through; and on each frontend (classic renderer: the definition
is read before any renderer draws) a different served rate changes the frame shown, and a missing one
is reported in the console and shows no frame values instead of a guessed rate."""

import re

import pytest

from browser_page import KFPage
from keyface import planner

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PLAYHEAD = 2.0  # seconds; frame 2 x fps


def _frame_readout(kf):
    """(the editor's fps, the frame index its status shows at the playhead, or None)."""
    kf.load_emotion_workflow()
    kf.js(f"() => {{ const ed = window.__kf.editor(); ed.playhead = {PLAYHEAD}; ed.updateStatus(); }}")
    text = kf.status()["text"]
    found = re.search(r"\bframe (\d+)\b", text)
    return kf.js("window.__kf.editor().fps"), (int(found.group(1)) if found else None), text


def _curve_options(data):
    return data["KeyFaceEmotion"]["input"]["required"]["curve"][1]


def _open_patched(kf_page, patch):
    return KFPage.open(kf_page.page.context.browser, kf_page.server, vue=kf_page.vue, tag=kf_page.tag,
                       patch_object_info=patch)


def test_frame_readout_follows_the_served_rate(kf_page):
    fps, frame, text = _frame_readout(kf_page)
    assert fps == planner.FPS and frame == round(PLAYHEAD * planner.FPS), text
    if kf_page.vue:
        return  # the node definition is read the same way in both renderers: patched pages in one (~20 s each)

    other = 10.0  # a rate the library never uses: only a served value can produce frame 20
    kf = _open_patched(kf_page, lambda d: _curve_options(d).update(keyface_fps=other))
    try:
        fps, frame, text = _frame_readout(kf)
        assert fps == other and frame == round(PLAYHEAD * other), text
    finally:
        kf.close()

    kf = _open_patched(kf_page, lambda d: _curve_options(d).pop("keyface_fps"))
    try:
        fps, frame, text = _frame_readout(kf)
        assert fps is None and frame is None, text
        assert "playhead 2.00 s" in text, text  # the rest of the status still works
        assert any(c.startswith("error") and "keyface_fps" in c for c in kf.console), kf.console
        # nothing thrown by the editor (the frontend's own unrelated page errors are not ours to judge)
        thrown = [c for c in kf.console if c.startswith("pageerror") and ("keyface" in c.lower() or "fps" in c)]
        assert not thrown, thrown
    finally:
        kf.close()
