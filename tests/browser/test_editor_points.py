"""Editing points in the emotion curve editor with real mouse and keyboard events, on each frontend
and renderer: drag, Delete / Ctrl+Z, preset at the playhead and the undo button, double-click /
right-click, the linear/monotone toggle. Each edit must reach ``app.graphToPrompt()`` as one plain
JSON string in the ``curve`` input (the editor widget itself is never serialized)."""

import json

import pytest

from browser_page import load_workflow, node_of

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def _drag_second_valence_point(kf, before):
    idx = 1
    t0, v0 = before["valence"][idx]
    t_next = before["valence"][idx + 1][0]
    target = (round(t0 + 0.3 * (t_next - t0), 3), -0.4 if v0 > 0 else 0.4)
    start = kf.js("([s, i]) => window.__kf.pointXY(s, i)", ["valence", idx])
    end = kf.js("([t, v]) => window.__kf.posXY(t, v)", list(target))
    mouse = kf.page.mouse
    mouse.move(start["x"], start["y"])
    mouse.down()
    mouse.move((start["x"] + end["x"]) / 2, (start["y"] + end["y"]) / 2, steps=5)
    mouse.move(end["x"], end["y"], steps=8)
    mouse.up()
    kf.settle()
    return idx, target


def test_edit_points(kf_page):
    kf = kf_page
    workflow = load_workflow()
    shipped = json.loads(node_of(workflow, "KeyFaceEmotion")["widgets_values"][1])
    kf.load_emotion_workflow(workflow)
    before, inputs = kf.curve_from_prompt()
    assert before == shipped and inputs["emotion"] == "custom curve"
    assert len(before["valence"]) >= 3, "the shipped curve needs a middle valence point to drag"

    # ---- drag the second valence point
    idx, (t_target, v_target) = _drag_second_valence_point(kf, before)
    after, inputs = kf.curve_from_prompt()
    t1, v1 = after["valence"][idx]
    assert abs(t1 - t_target) < 0.06 and abs(v1 - v_target) < 0.03, (after, t_target, v_target)
    assert after["valence"][:idx] == before["valence"][:idx]
    assert after["valence"][idx + 1:] == before["valence"][idx + 1:]
    assert after["arousal"] == before["arousal"] and after["version"] == 1
    assert "keyface_emotion_editor" not in inputs, "the editor widget must not be serialized"
    node_id = kf.js("String(window.__kf.node().id)")
    wf = kf.js("window.__kf.prompt()")["workflow"]
    saved = next(n for n in wf["nodes"] if str(n["id"]) == node_id)
    assert json.loads(saved["widgets_values"][1]) == after  # the workflow JSON carries the same string
    assert kf.js("window.__kf.editor().deleteButton.disabled") is False  # the dragged point is selected

    # ---- Delete removes the selected point (not the node); Ctrl+Z restores it
    kf.page.keyboard.press("Delete")
    kf.settle()
    assert len(kf.curve_from_prompt()[0]["valence"]) == len(after["valence"]) - 1
    assert kf.js("!!window.__kf.node()"), "Delete in the editor must not delete the node"
    assert kf.js("window.__kf.editor().deleteButton.disabled") is True
    kf.page.keyboard.press("Control+z")
    kf.settle()
    assert kf.curve_from_prompt()[0] == after

    # ---- a preset at the playhead (click in the time ruler first), then the undo button
    ruler = kf.js("() => { const L = window.__kf.editor().layout(); return window.__kf.posXY(L.T * 0.9, -1); }")
    kf.page.mouse.click(ruler["x"], ruler["y"] + 8)
    tp = round(kf.js("window.__kf.editor().playhead"), 3)
    kf.page.locator(".keyface-emotion-editor select.kf-preset").first.select_option("sad")
    with_preset, _ = kf.curve_from_prompt()
    assert [tp, -0.85] in [[round(t, 3), v] for t, v in with_preset["valence"]]
    assert [tp, -0.35] in [[round(t, 3), a] for t, a in with_preset["arousal"]]
    kf.click_button("undo")
    assert kf.curve_from_prompt()[0] == after

    # ---- double-click adds a point to the active curve, right-click deletes it
    add = kf.js("([t, v]) => window.__kf.posXY(t, v)", [3.3, 0.6])
    kf.page.mouse.dblclick(add["x"], add["y"])
    added, _ = kf.curve_from_prompt()
    new_pts = [p for p in added["valence"] if p not in after["valence"]]
    assert len(new_pts) == 1 and abs(new_pts[0][0] - 3.3) < 0.06 and abs(new_pts[0][1] - 0.6) < 0.03, added
    kf.page.mouse.click(add["x"], add["y"], button="right")
    assert kf.curve_from_prompt()[0] == after

    # ---- the interpolation toggle switches the string to the other mode (points unchanged) and back
    other = "linear" if after["interpolation"] == "monotone" else "monotone"
    kf.click_button(after["interpolation"])
    assert kf.curve_from_prompt()[0] == {**after, "interpolation": other}
    kf.click_button(other)
    assert kf.curve_from_prompt()[0] == after
