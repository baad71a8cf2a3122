"""KeyFace Long Render in a real ComfyUI: POST /interrupt during the interpolation, queue the same
prompt again, and it resumes (fewer blocks computed) with the same latent blocks as an uninterrupted run.
The resumed mp4 is the same file, byte for byte."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest

import workflow_files
from comfy_server import SPEECH_ODD, comfy_server  # noqa: F401  (session fixture)
from test_e2e_comfyui import WsListener, _load, _node_id, _outputs
from keyface.video_io import probe_mp4
from workflow_to_api import convert

pytestmark = pytest.mark.e2e


def _long_render_prompt(server, prefix, keep_job=False):
    """The shipped workflow's loaders, image and audio encoding, then KeyFace Long Render (3.08 s speech:
    77 frames, 1 keyframe batch, 3 interpolation groups of 2 segments)."""
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    prompt[_node_id(prompt, "LoadAudio")]["inputs"]["audio"] = SPEECH_ODD
    keyframes = prompt[_node_id(prompt, "KeyFaceSampleKeyframes")]["inputs"]
    interp = prompt[_node_id(prompt, "KeyFaceInterpolate")]["inputs"]
    for cls in ("SaveVideo", "CreateVideo", "KeyFaceDecode", "PreviewImage", "KeyFaceSampleKeyframes",
                "KeyFaceInterpolate"):
        del prompt[_node_id(prompt, cls)]
    encode = _node_id(prompt, "KeyFaceEncodeAudio")
    prompt["960"] = {"class_type": "KeyFaceLongRender", "inputs": {
        "keyframe_model": keyframes["keyframe_model"], "interpolation_model": interp["interpolation_model"],
        "vae": keyframes["vae"], "image": keyframes["image"], "audio_features": [encode, 0], "audio": [encode, 2],
        "seed": 11, "steps": 10, "reference_scale": 2.0, "audio_scale": 5.0, "autoguidance_scale": 2.0, "autoguidance": True,
        "segments_per_call": 2, "fit": "crop", "filename_prefix": prefix, "crf": 18, "keep_job": keep_job}}
    return prompt


def _job_summary(entry):
    return entry["outputs"]["960"]["keyface_job"][0]


def test_long_render_resumes_after_interrupt(comfy_server):
    server = comfy_server
    client_id = uuid.uuid4().hex
    ws = WsListener(server.url, client_id)
    try:
        pid = server.submit(_long_render_prompt(server, "e2e/long/resumed"), client_id)
        t0 = time.monotonic()
        # interpolation bar: 3 groups x 11 steps; past step 11 the first group is stored
        while not any(m["data"].get("node") == "960" and m["data"].get("max") == 33 and m["data"].get("value", 0) > 12
                      for m in ws.of_type("progress")):
            assert time.monotonic() - t0 < 300, "KeyFace Long Render never got into its interpolation"
            time.sleep(0.05)
        assert server.post("/interrupt", {"prompt_id": pid}).status_code == 200
        entry = server.wait(pid, timeout=120)
        assert entry["status"]["status_str"] == "error"
        assert "execution_interrupted" in {m[0] for m in entry["status"]["messages"]}
        jobs = Path(server.output_dir) / "keyface_jobs"
        [job] = list(jobs.iterdir())
        stored = sorted(p.name for p in (job / "interpolation").iterdir())
        assert stored and "group_000002.safetensors" not in stored

        # the same prompt again (keeping the job this time, to compare its blocks): resumes
        entry = server.wait(server.submit(_long_render_prompt(server, "e2e/long/resumed", True), client_id), 400)
        assert entry["status"]["status_str"] == "success", entry["status"]
        summary = _job_summary(entry)
        assert summary == (f"keyframes: 0 computed, 1 reused; interpolation: {3 - len(stored)} computed, "
                           f"{len(stored)} reused")
        [resumed] = _outputs(server, entry, "images")
        resumed_blocks = _blocks(job)
        shutil.rmtree(job)

        # an uninterrupted render (another prefix, so ComfyUI runs the node again)
        entry = server.wait(server.submit(_long_render_prompt(server, "e2e/long/full", True), client_id), 400)
        assert _job_summary(entry) == "keyframes: 1 computed, 0 reused; interpolation: 3 computed, 0 reused"
        [full] = _outputs(server, entry, "images")
        full_blocks = _blocks(job)
    finally:
        ws.close()
    # every stored latent block is identical (tensor bytes; the files' JSON headers may order keys differently)
    assert resumed_blocks == full_blocks and len(full_blocks) == 4
    assert probe_mp4(resumed)["frames"] == probe_mp4(full)["frames"] == 77
    assert resumed.read_bytes() == full.read_bytes()
    print(f"\nKeyFace e2e long render: resumed with {summary}; mp4 bytes identical")


def _blocks(job):
    from safetensors.torch import load_file

    return {p.relative_to(job).as_posix(): load_file(str(p))["latents"].numpy().tobytes()
            for p in sorted(job.rglob("*.safetensors"))}
