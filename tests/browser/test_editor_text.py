"""The emotion editor's JSON text on each frontend and renderer: typing re-renders the editor, invalid
text shows its error in the editor, sub-millisecond points stay valid for Python once the editor
rewrites them, and "{ } hide" really hides the text (the native ``curve`` textarea is never shown:
Nodes 2.0 on frontend 1.32 drew its own copy that could not be hidden)."""

import copy
import json

import pytest

from keyface import emotion as kfe

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

TEXT = "textarea.keyface-emotion-curve-text"


def _visible_textareas(kf):
    """Textareas on screen inside the emotion node (ours and any the frontend draws for `curve`)."""
    return kf.js("""() => {
        const n = window.__kf.node(), root = window.__kf.editor().root;
        const host = document.querySelector(`[data-node-id="${n.id}"]`) ?? root.parentElement;
        const all = new Set([...host.querySelectorAll("textarea"), ...document.querySelectorAll(".comfy-multiline-input")]);
        const w = window.__kf.widget("curve");
        if (w.element) all.add(w.element);
        return [...all].filter(t => window.__kf.shown(t)).map(t => t.className || t.tagName);
    }""")


def test_curve_text(kf_page):
    kf = kf_page
    kf.load_emotion_workflow()
    after, _ = kf.curve_from_prompt()
    assert _visible_textareas(kf) == ["keyface-emotion-curve-text"], "only the editor's own JSON text is shown"

    # ---- typing re-renders the editor
    typed = copy.deepcopy(after)
    typed["arousal"] = [[0, 0.5], [3, -0.5]]
    typed["interpolation"] = "linear"
    kf.type_curve(json.dumps(typed))
    assert kf.js("window.__kf.editor().curve.arousal") == [[0, 0.5], [3, -0.5]]
    assert kf.js("window.__kf.editor().curve.interpolation") == "linear"
    assert kf.curve_from_prompt()[0] == typed
    assert kf.status()["error"] is False

    # ---- invalid text: the error shows in the editor
    kf.type_curve("{ not json")
    st = kf.status()
    assert st["error"] and "not valid JSON" in st["text"], st
    dup = copy.deepcopy(after)
    dup["valence"] = [[1, 0], [1, 0.5]]
    kf.type_curve(json.dumps(dup))
    st = kf.status()
    assert st["error"] and "duplicate time" in st["text"], st

    # ---- points closer than the 1 ms the editor writes: still valid for Python once the editor
    # rewrites the text (an edit: the interpolation toggle)
    close = copy.deepcopy(after)
    close["valence"] = [[0, 0.2], [1.0001, 0], [1.0004, 0.5], [3, -0.3]]
    kf.type_curve(json.dumps(close))
    assert kf.status()["error"] is False
    kf.click_button(after["interpolation"])
    written = kf.js("window.__kf.widget('curve').value")
    parsed = kfe.parse_curve(written)  # would raise "duplicate time" with plain 1 ms rounding
    assert [t for t, _ in parsed.valence] == [0.0, 1.0, 1.001, 3.0], written
    assert kf.page.locator(TEXT).first.input_value() == written  # the text shows what the node gets
    kf.type_curve(json.dumps(after))
    assert kf.curve_from_prompt()[0] == after

    # ---- a schedule typed beside the drawn curve: the editor says the run will refuse it
    kf.js("() => window.__kf.setWidget('schedule', 'happy@0')")
    kf.page.wait_for_function("() => window.__kf.status().text.includes('schedule is set: clear it')", timeout=5_000)
    kf.js("() => window.__kf.setWidget('schedule', '')")
    kf.page.wait_for_function("() => !window.__kf.status().text.includes('schedule is set')", timeout=5_000)

    # ---- "{ } hide" hides the text and gives its height to the plot; "{ } show" brings it back
    plot0 = kf.js("window.__kf.canvasSize()")["layout"][1]
    kf.click_button("{ } hide")
    kf.settle(300)
    assert _visible_textareas(kf) == []
    assert kf.page.locator(".keyface-emotion-editor button", has_text="{ } show").count() == 1
    assert kf.js("window.__kf.canvasSize()")["layout"][1] >= plot0 + 40, "the plot takes the text's place"
    assert kf.curve_from_prompt()[0] == after  # hidden text still travels
    kf.click_button("{ } show")
    kf.settle(300)
    assert _visible_textareas(kf) == ["keyface-emotion-curve-text"]
