"""KeyFace Long Render (resumable) under the ComfyUI stubs: a cancel in the middle of the interpolation
keeps the finished blocks in output/keyface_jobs/<id>; queueing the same inputs again resumes and
writes the same mp4 bytes as an uninterrupted render; the job folder is removed afterwards."""

import os

import pytest

import comfy_stubs
from test_nodes import N, _audio, _image, _stub_state, models, pack, smoke_dir  # noqa: F401 - shared fixtures

ARGS = dict(seed=7, steps=10, reference_scale=2.0, audio_scale=5.0, autoguidance_scale=2.0, autoguidance=True,
            segments_per_call=2, fit="crop", crf=18)


def _jobs_dir():
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "keyface_jobs")


def test_cancelled_long_render_resumes_to_the_same_file(N, models, tmp_path, pack):  # noqa: F811
    feats, n, audio, _ = N["KeyFaceEncodeAudio"]().encode(models["enc"], _audio(2.2))  # 55 frames: 3 segment groups
    node = N["KeyFaceLongRender"]()

    def render(prefix, **kw):
        return node.render(models["kf"], models["it"], models["vae"], _image(), feats, audio,
                           filename_prefix=prefix, **{**ARGS, **kw})

    full = render("full")
    assert full["result"][1] == n == 55
    reference = open(full["result"][0], "rb").read()
    assert not os.listdir(_jobs_dir())  # removed after success (keep_job off)

    # the user clicks cancel as soon as the first interpolation group is stored (the pack's own job class)
    import importlib

    import comfy.model_management

    job_cls = importlib.import_module(pack.__name__ + ".keyface.jobs").RenderJob
    real_save = job_cls.save

    def save_then_cancel(self, stage, index, latents):
        real_save(self, stage, index, latents)
        if stage == "interpolation" and index == 0:
            comfy_stubs.STATE.interrupt = True  # as ComfyUI's /interrupt: the next check raises

    job_cls.save = save_then_cancel
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            render("resumed")
    finally:
        job_cls.save = real_save
        comfy_stubs.STATE.interrupt = False
    [job] = os.listdir(_jobs_dir())
    assert sorted(os.listdir(os.path.join(_jobs_dir(), job, "interpolation"))) == ["group_000000.safetensors"]
    assert not [f for f in os.listdir(os.path.dirname(full["result"][0])) if f.startswith("resumed")]

    resumed = render("resumed", keep_job=True)
    assert resumed["ui"]["keyface_job"] == ["keyframes: 0 computed, 1 reused; interpolation: 2 computed, 1 reused"]
    assert open(resumed["result"][0], "rb").read() == reference
    assert os.listdir(_jobs_dir()) == [job]  # kept on request

    # another seed is another job: a new folder, nothing reused
    other = render("other", seed=8)
    assert other["ui"]["keyface_job"] == ["keyframes: 1 computed, 0 reused; interpolation: 3 computed, 0 reused"]
