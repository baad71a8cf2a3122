"""Render jobs on disk (keyface.jobs): a render interrupted anywhere resumes from its job folder and
writes the same mp4 bytes as an uninterrupted render; a job of other inputs / models / settings is
refused by name; block files are atomic and checked."""

import copy
import json
import os

import pytest
import torch

from types import SimpleNamespace

from keyface import jobs as J
from keyface import model_files as mf
from keyface.loading import load_diffusion_models
from keyface import smoke
from keyface import pipeline as P
from keyface.planner import plan_clip

N = 60  # 5 segments, 1 keyframe batch; segments_per_call=2 -> 3 interpolation groups
SETTINGS = dict(seed=3, chunk_frames=7, segments_per_call=2)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    from keyface.smoke import write_smoke_models

    folder = tmp_path_factory.mktemp("smoke")
    write_smoke_models(folder)
    return folder


@pytest.fixture(scope="module")
def models(smoke_dir):
    """The 64 px smoke models (x264 output of 32 px frames was measured not byte-stable, even on one thread)."""
    kf, good, bad, vae = load_diffusion_models(mf.find_models(smoke_dir))
    return SimpleNamespace(kf=kf, good=good, bad=bad, vae=vae)


@pytest.fixture(scope="module")
def identity(models):
    g = torch.Generator().manual_seed(5)
    img = P.prepare_identity(torch.rand(70, 52, 3, generator=g), smoke.RESOLUTION)
    return P.encode_identity(models.vae, img)


def make_clip(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(keyframe=torch.randn(n, 2, smoke.FEATURE_DIM, generator=g),
                           interpolation=torch.randn(n, 2, smoke.FEATURE_DIM, generator=g), num_frames=n,
                           valence=torch.linspace(-0.5, 0.8, n), arousal=torch.linspace(0.3, -0.2, n),
                           audio=0.1 * torch.randn(1, n * 640, generator=g))


@pytest.fixture(scope="module")
def clip():
    return make_clip(N)


@pytest.fixture(scope="module")
def reference(models, identity, clip, tmp_path_factory):
    """The uninterrupted, job-less render's mp4 bytes."""
    path = tmp_path_factory.mktemp("ref") / "ref.mp4"
    P.render_to_file(models.kf, models.good, models.bad, models.vae, identity, clip, path, audio=clip.audio,
                     sample_rate=16000, valence=clip.valence, arousal=clip.arousal, **SETTINGS)
    return path.read_bytes()


def _render_job(models, identity, clip, folder, path, callback=None, **overrides):
    return J.render_job(folder, models.vae, identity, clip, path, networks=(models.kf, models.good, models.bad),
                        valence=clip.valence, arousal=clip.arousal, audio=clip.audio, sample_rate=16000,
                        callback=callback, **{**SETTINGS, **overrides})


def test_uninterrupted_job_equals_plain_render(models, identity, clip, reference, tmp_path):
    report = _render_job(models, identity, clip, tmp_path / "job", tmp_path / "out.mp4")
    assert (tmp_path / "out.mp4").read_bytes() == reference
    assert report.computed == {"keyframes": 1, "interpolation": 3} and report.reused == {"keyframes": 0,
                                                                                         "interpolation": 0}
    names = sorted(os.listdir(tmp_path / "job" / "interpolation"))
    assert names == [f"group_{i:06d}.safetensors" for i in range(3)]
    # a finished job reruns without sampling anything and writes the same bytes again
    report = _render_job(models, identity, clip, tmp_path / "job", tmp_path / "again.mp4")
    assert report.computed == {"keyframes": 0, "interpolation": 0}
    assert (tmp_path / "again.mp4").read_bytes() == reference


@pytest.mark.parametrize("stop_at", [("interpolation", 2), ("interpolation", 12), ("decode", 3), ("keyframes", 5)])
def test_interrupted_render_resumes_to_the_same_bytes(models, identity, clip, reference, tmp_path, stop_at):
    out = tmp_path / "out.mp4"

    def crash(ev):
        if (ev.stage, ev.step) == stop_at:
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        _render_job(models, identity, clip, tmp_path / "job", out, callback=crash)
    assert not out.exists()
    # the events count steps of the whole stage: (interpolation, 12) is in group 1 (11 evaluations a group)
    finished = {"keyframes": 0, "interpolation": 0, "decode": 3}[stop_at[0]] + (stop_at == ("interpolation", 12))
    report = _render_job(models, identity, clip, tmp_path / "job", out)
    assert report.reused["interpolation"] == finished
    assert report.computed["interpolation"] == 3 - finished
    assert out.read_bytes() == reference
    leftovers = [n for d in ("keyframes", "interpolation") for n in os.listdir(tmp_path / "job" / d) if n.startswith(".")]
    assert leftovers == []


def test_changed_inputs_models_or_settings_are_refused_by_name(models, identity, clip, tmp_path):
    folder, out = tmp_path / "job", tmp_path / "out.mp4"

    def stop(ev):
        if ev.stage == "interpolation":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _render_job(models, identity, clip, folder, out, callback=stop)
    with pytest.raises(J.JobError, match=r"settings\.seed: 3 -> 4"):
        _render_job(models, identity, clip, folder, out, seed=4)
    other = make_clip(N, seed=1)
    other.audio, other.valence, other.arousal = clip.audio, clip.valence, clip.arousal
    with pytest.raises(J.JobError, match=r"interpolation_features \(input digest differs\); "
                                         r"keyframe_features \(input digest differs\)\. Run"):
        _render_job(models, identity, other, folder, out)
    bad = copy.deepcopy(models.bad)
    with torch.no_grad():
        next(bad.parameters()).add_(1e-3)
    with pytest.raises(J.JobError, match=r"interpolation_bad_model \(input digest differs\)"):
        J.render_job(folder, models.vae, identity, clip, out, networks=(models.kf, models.good, bad),
                     valence=clip.valence, arousal=clip.arousal, audio=clip.audio, sample_rate=16000, **SETTINGS)
    with pytest.raises(J.JobError, match=r"valence \(input digest differs\)"):
        J.render_job(folder, models.vae, identity, clip, out, networks=(models.kf, models.good, models.bad),
                     arousal=clip.arousal, audio=clip.audio, sample_rate=16000, **SETTINGS)
    # the decode settings are free: another chunk size resumes this job
    report = _render_job(models, identity, clip, folder, out, chunk_frames=5)
    assert report.reused["keyframes"] == 1 and out.exists()


def test_block_files_are_checked(models, identity, clip, tmp_path):
    folder, out = tmp_path / "job", tmp_path / "out.mp4"
    _render_job(models, identity, clip, folder, out)
    block = folder / "interpolation" / "group_000001.safetensors"
    block.write_bytes(block.read_bytes()[:100])  # damaged by hand (the writer itself is atomic)
    with pytest.raises(J.JobError, match="group_000001.safetensors is unreadable.*delete it"):
        _render_job(models, identity, clip, folder, out)
    block.unlink()
    assert _render_job(models, identity, clip, folder, out).computed["interpolation"] == 1
    (folder / "interpolation" / ".group_000002.safetensors.abc.tmp").write_bytes(b"partial")  # a crash mid-write
    _render_job(models, identity, clip, folder, out)
    assert not (folder / "interpolation" / ".group_000002.safetensors.abc.tmp").exists()


def test_job_folder_misuse(models, identity, clip, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(J.JobError, match="not empty and holds no job.json"):
        _render_job(models, identity, clip, tmp_path / "busy", tmp_path / "out.mp4")
    plan = plan_clip(N)
    clip_in = J.clip_inputs(identity, clip, clip.valence, clip.arousal)
    desc = J.job_description(clip_in, P.RenderSettings(**SETTINGS), {"keyframe_model": "x"}, {"device": "cpu"})
    with J.RenderJob.open(tmp_path / "locked", desc) as job:
        with pytest.raises(J.JobError, match="in use by another render"):
            J.RenderJob.open(tmp_path / "locked", desc)
        with pytest.raises(J.JobError, match="non-finite"):
            job.save("interpolation", 0, torch.full((2, 14, 4, 8, 8), float("nan")))
        assert not job.has("interpolation", 0)
    assert json.loads((tmp_path / "locked" / "job.json").read_text())["num_frames"] == plan.num_frames
    J.RenderJob.open(tmp_path / "locked", desc).close()  # the lock is released on close


def test_block_subsets_equal_the_full_stages(models, identity, clip):
    """The pipeline guarantee jobs rely on: a batch / segment group computed alone is bit-identical
    to its rows of the full stage (noise seeded by the block index, nothing else shared)."""
    plan = plan_clip(200)  # 2 keyframe batches
    c = make_clip(200)
    full = P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, seed=1)
    parts = [P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, seed=1, batch_indices=[b])
             for b in (1, 0)]
    assert torch.equal(torch.cat([parts[1], parts[0]]), full)
    seg = P.interpolate_segments(models.good, models.bad, full, c.interpolation, plan, seed=1, segments_per_call=2)
    part = P.interpolate_segments(models.good, models.bad, full, c.interpolation, plan, seed=1, segments_per_call=2,
                                  segment_indices=[6, 7])
    assert torch.equal(part, seg[6:8])
    with pytest.raises(ValueError, match=r"batch indices \[2\] are outside 0..1"):
        P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, batch_indices=[2])
