"""KeyFace Emotion's errors in a real ComfyUI (the server checks a prompt before running it):

* a broken graph is refused as a whole: KeyFace Emotion is no output node, so with the portrait
  unconnected nothing runs (as an output node it ran alone and the prompt was accepted);
* an invalid curve is one error, on ``curve`` (VALIDATE_INPUTS names only that input);
* a schedule typed beside 'custom curve' stops the run with an error naming ``schedule``.
"""

from __future__ import annotations

import json

import pytest

import workflow_files
from comfy_server import comfy_server  # noqa: F401  (session fixture)
from workflow_to_api import convert

pytestmark = pytest.mark.e2e

WORKFLOW = workflow_files.workflow_path(workflow_files.EMOTION_OVER_TIME)


def _prompt(server):
    prompt = convert(json.loads(WORKFLOW.read_text(encoding="utf-8")), server.object_info())
    ids = {v["class_type"]: k for k, v in prompt.items()}
    return prompt, ids


def test_unconnected_portrait_refuses_the_whole_prompt(comfy_server):
    prompt, ids = _prompt(comfy_server)
    del prompt[ids["KeyFaceSampleKeyframes"]]["inputs"]["image"]
    r = comfy_server.post("/prompt", {"prompt": prompt})
    assert r.status_code == 400, f"a graph without its portrait must not run (got {r.status_code}: {r.text[:500]})"
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    errors = body["node_errors"][ids["KeyFaceSampleKeyframes"]]["errors"]
    assert any(e["type"] == "required_input_missing" and e["extra_info"]["input_name"] == "image" for e in errors), errors
    assert ids["KeyFaceEmotion"] not in body["node_errors"]


def test_invalid_curve_is_one_error_on_curve(comfy_server):
    prompt, ids = _prompt(comfy_server)
    emotion = ids["KeyFaceEmotion"]
    prompt[emotion]["inputs"]["curve"] = '{"version": 1, "valence": [], "arousal": [[0, 0]]}'
    r = comfy_server.post("/prompt", {"prompt": prompt})
    assert r.status_code == 400, r.text[:500]
    errors = r.json()["node_errors"][emotion]["errors"]
    assert len(errors) == 1, errors
    assert errors[0]["extra_info"]["input_name"] == "curve" and "valence: the list is empty" in errors[0]["details"]


def test_schedule_beside_custom_curve_is_an_error(comfy_server):
    prompt, ids = _prompt(comfy_server)
    emotion = ids["KeyFaceEmotion"]
    assert prompt[emotion]["inputs"]["emotion"] == "custom curve"
    prompt[emotion]["inputs"]["schedule"] = "happy@0, sad@2"
    entry = comfy_server.wait(comfy_server.submit(prompt), timeout=300)
    assert entry["status"]["status_str"] == "error"
    err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert err["node_id"] == emotion, err
    assert err["exception_message"].startswith("schedule: 'happy@0, sad@2' is set but emotion is 'custom curve'"), err
