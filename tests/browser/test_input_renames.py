"""Saved workflows that use the samplers' old input names (``ref_guidance``, ``audio_guidance``,
``guidance``) load with their links and values on the new names (js/input_renames.js)."""

import copy

import pytest

from browser_page import TALKING_HEAD_WORKFLOW, load_workflow, node_of

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def _widget_inputs(names, linked=None, link_id=None):
    """Widget input slots as frontends save them (one per widget, in widget order)."""
    return [{"name": n, "type": "FLOAT" if "guidance" in n else "INT", "widget": {"name": n},
             "link": link_id if n == linked else None} for n in names]


def _with_old_names(workflow):
    """The talking-head workflow as saved before the rename: the samplers' widget slots under the old
    names, and `ref_guidance` fed by a link (Encode Audio's FLOAT fps, as a stand-in source)."""
    wf = copy.deepcopy(workflow)
    keyframes, interp, encode = (node_of(wf, t) for t in ("KeyFaceSampleKeyframes", "KeyFaceInterpolate", "KeyFaceEncodeAudio"))
    link_id = max(link[0] for link in wf["links"]) + 1
    fps_slot = next(i for i, o in enumerate(encode["outputs"]) if o["name"] == "fps")
    keyframes["inputs"] += _widget_inputs(["seed", "steps", "ref_guidance", "audio_guidance"], "ref_guidance", link_id)
    target = next(i for i, x in enumerate(keyframes["inputs"]) if x["name"] == "ref_guidance")
    wf["links"].append([link_id, encode["id"], fps_slot, keyframes["id"], target, "FLOAT"])
    encode["outputs"][fps_slot]["links"].append(link_id)
    interp["inputs"] += _widget_inputs(["seed", "steps", "guidance"])
    keyframes["widgets_values"][4] = 6.5  # audio guidance (position 4 of the widgets)
    interp["widgets_values"][3] = 3.5  # autoguidance scale
    wf["last_link_id"] = link_id
    return wf, str(keyframes["id"]), str(interp["id"]), [str(encode["id"]), fps_slot]


@pytest.mark.parametrize("renderer", ["classic"], indirect=True)  # the migration runs before either renders
def test_old_input_names_load(kf_page):
    kf = kf_page
    wf, keyframes_id, interp_id, fps_link = _with_old_names(load_workflow(TALKING_HEAD_WORKFLOW))
    kf.load(wf)
    out = kf.js("window.__kf.prompt()")["output"]
    keyframes, interp = out[keyframes_id]["inputs"], out[interp_id]["inputs"]
    assert keyframes["reference_scale"] == fps_link, "the link into the old ref_guidance must survive"
    assert keyframes["audio_scale"] == 6.5 and interp["autoguidance_scale"] == 3.5
    old = {"ref_guidance", "audio_guidance", "guidance"}
    assert not old & (set(keyframes) | set(interp)), (keyframes, interp)
    names = kf.js(f"() => window.__kf.app().graph.getNodeById({keyframes_id}).inputs.map(i => i.name)")
    assert not old & set(names), names
