"""bench (python -m bench) count mode: the instrumented pipeline must match the closed form of the released
batching, decode nothing twice or in vain, and keep per-call sizes independent of the clip length.

Fast (a few seconds): the network bodies are stubs, everything else is the real pipeline code at the
released tensor sizes.
"""

import math

import pytest

from bench import benchmark as bench
from keyface.planner import plan_clip


@pytest.fixture(scope="module")
def models():
    # counts do not depend on the latent size: 8x8 latents keep the (stub) decode cheap
    return bench._stub_models(latent_hw=(8, 8))


def test_steady_state_closed_form():
    ss = bench.steady_state()
    # keyframes: 25/13 keyframes/s x 14/13 slots x 3 branches x 11 evals; interpolation 25/13 x 14 x 2 x 11
    assert ss["keyframe_frame_evals_per_s"] == pytest.approx(25 / 13 * 14 / 13 * 33)
    assert ss["interpolation_frame_evals_per_s"] == pytest.approx(25 / 13 * 14 * 22)
    assert ss["unet_frame_evals_per_s"] == pytest.approx(660.65, abs=0.01)  # spec 8.2: 660.6
    assert ss["decoder_frames_per_s"] == pytest.approx(25 * 14 / 13)  # no wasted keyframe decodes (29.0 in the original)
    approx = bench.steady_state(last_step_good_only=True)
    assert approx["unet_frame_evals_per_s"] == pytest.approx(660.65 - 25 / 13 * 14, abs=0.01)
    assert approx["unet_frame_evals_per_s"] <= bench.TARGET_FRAME_EVALS_PER_S < ss["unet_frame_evals_per_s"]


@pytest.mark.parametrize("n", [200, 171])  # 171: 14 keyframes -> a second batch of [identity, 1 keyframe, 12 pads]
def test_count_matches_released_batching(models, n):
    r = bench.count_clip(n, models=models)
    m, cf = r["measured"], r["closed_form"]
    plan = plan_clip(n)
    b, s = plan.num_batches, plan.num_segments
    assert r["frames_out"] == n
    # keyframes: one call per Euler step per batch, 3 branches x 14 slots in it
    assert m["unet_rows_per_call"]["keyframe"] == {"42": 11 * b}
    # interpolation: 2 segments (28 frames) per call, good and bad network each, 11 steps
    calls = math.ceil(s / 2) * 11
    for net in ("interpolation_good", "interpolation_bad"):
        assert sum(m["unet_rows_per_call"][net].values()) == calls
        assert m["unet_max_rows_per_call"][net] == 28
    assert m["unet_frame_evals"] == b * 14 * 3 * 11 + s * 14 * 2 * 11 == cf["unet_frame_evals"]
    assert m["unet_calls"] == b * 11 + 2 * calls
    # decoder: exactly the frames that reach the output (shared keyframes twice), one frame per video,
    # nothing while the keyframes sample (no keyframe decode without a preview), chunks on the CPU
    needed = n + len([t for t in range(13, n, 13)])
    assert m["decoder_frames"] == m["decoder_frames_needed"] == needed == cf["decoder_frames"]
    assert m["decoder_frames_wasted"] == 0
    assert m["decoder_frames_during_keyframes"] == 0
    assert m["decoder_frames_per_video"] == [1]
    assert m["decoder_max_frames_per_call"] <= 2 * 16
    assert m["output_chunk_devices"] == ["cpu"] and m["output_chunk_max_frames"] <= 16


def test_batching_is_configurable_and_approximation_counts(models):
    n = 120
    plan = plan_clip(n)
    r4 = bench.count_clip(n, models=models, segments_per_call=4)
    assert r4["measured"]["unet_max_rows_per_call"]["interpolation_good"] == 56
    assert r4["measured"]["interpolation_calls"] == 2 * math.ceil(plan.num_segments / 4) * 11
    exact = bench.count_clip(n, models=models)
    approx = bench.count_clip(n, models=models, guidance_min_sigma=bench.LAST_STEP_SIGMA)
    # the last step (sigma 0.002 -> 0) evaluates only the good network and the full keyframe branch
    saved = exact["measured"]["interpolation_frame_evals"] - approx["measured"]["interpolation_frame_evals"]
    assert saved == plan.num_segments * 14
    saved_kf = exact["measured"]["keyframe_frame_evals"] - approx["measured"]["keyframe_frame_evals"]
    assert saved_kf == plan.num_batches * 14 * 2
    assert approx["measured"]["unet_frame_evals"] == approx["closed_form"]["unet_frame_evals"]
    off = bench.count_clip(n, models=models, autoguidance=False)
    assert off["measured"]["interpolation_frame_evals"] == plan.num_segments * 14 * 11
    assert "interpolation_bad" not in off["measured"]["unet_rows_per_call"] or \
        off["measured"]["unet_rows_per_call"]["interpolation_bad"] == {}


def test_per_call_sizes_do_not_grow_with_clip_length(models):
    short = bench.count_clip(40, models=models)["measured"]
    long = bench.count_clip(300, models=models)["measured"]
    assert short["unet_max_rows_per_call"] == long["unet_max_rows_per_call"]
    assert long["decoder_max_frames_per_call"] <= 2 * 16 and long["output_chunk_max_frames"] <= 16


# ---- run and knobs modes (tiny models) --------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    from keyface.smoke import write_smoke_models

    d = tmp_path_factory.mktemp("smoke")
    write_smoke_models(d)
    return str(d)


def test_rss_sampler_sees_a_block_allocation():
    import numpy as np

    import time

    before = bench.rss_mb()
    with bench.RssSampler(interval=0.001) as s:
        # 48 MiB of fresh anonymous pages, touched: a numpy buffer may reuse heap pages that are
        # already resident after the earlier tests (CI saw +0.008 MB), which no sampler can see
        import mmap

        a = mmap.mmap(-1, 48 * 2**20)
        np.frombuffer(a, np.uint8)[::4096] = 1
        # held until the sampler has read twice: a busy machine may not schedule its thread within the
        # allocation itself (a spike shorter than the interval may be missed, as documented)
        seen = s.samples
        deadline = time.monotonic() + 10
        while s.samples < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        a.close()
    assert s.samples >= 2
    assert s.peak_mb - before >= 40  # the short-lived buffer is in the peak, not in the RSS after


def test_run_rows_measure_growth_during_the_render(smoke_dir, tmp_path):
    """One fresh worker per row: frames (pipeline.render), node (KeyFace Save Video under the stand-ins)."""
    rows = {}
    for output in ("frames", "node"):
        spec = {"device": "cpu", "models": "tiny", "dtype": "fp32", "num_frames": 13, "output": output,
                "threads": 1, "folder": smoke_dir, "tmp": str(tmp_path)}
        rows[output] = r = bench._spawn_worker(spec, timeout=300)
        assert "error" not in r, r.get("error")
        assert r["rss_growth_mb"] is not None and r["rss_growth_mb"] > 0
        assert r["rss_growth_minus_output_mb"] == pytest.approx(r["rss_growth_mb"] - r["output_held_mb"])
    assert rows["frames"]["output_held_mb"] == pytest.approx(13 * 64 * 64 * 3 * 4 / 2**20)
    assert rows["frames"]["unet_frame_evals"] == bench.closed_form(13)["unet_frame_evals"]
    assert rows["node"]["output_held_mb"] == 0 and rows["node"]["output_file_mb"] > 0
    assert rows["node"]["unet_frame_evals"] == 0 and rows["node"]["decoder_frames"] == 0  # decode + mp4 only
    assert list(tmp_path.rglob("*.mp4")) == []  # the rows delete what they wrote
    assert "g-held" in bench.format_run({"gpu_note": "", "results": list(rows.values())})


def test_run_rows_time_and_measure_memory_in_separate_workers(smoke_dir, tmp_path, monkeypatch):
    """Wall time comes from a default-allocator worker, memory from a fixed-mmap-threshold one."""
    monkeypatch.chdir(tmp_path)
    result = bench.run_run([0.52], out_dir="", outputs=("frames",), smoke_dir=smoke_dir)
    assert list(tmp_path.iterdir()) == []  # out_dir '' writes no JSON (not even into the current folder)
    row, = result["results"]
    assert "error" not in row, row.get("error")
    assert row["wall_s"] > 0 and row["wall_s_fixed_mmap_threshold"] > 0
    assert row["wall_s"] != row["wall_s_fixed_mmap_threshold"]  # two renders, not one number copied
    assert row["wall_per_output_s"] == pytest.approx(row["wall_s"] / (13 / 25))


def test_knobs_use_the_render_settings_path(smoke_dir):
    import torch

    from keyface import pipeline as P

    kf, good, bad, vae = models = bench.load_tiny_models(smoke_dir)
    features, z_id = bench.random_inputs(20, good, kf)
    settings = P.RenderSettings(attention="math", segments_per_call=1)
    with torch.inference_mode():
        _, _, frames = bench._stages(*models, z_id, features, settings)
        assert torch.equal(frames, P.render(kf, good, bad, vae, z_id, features, settings=settings))


def test_face_bench_rows_run_and_measure_what_they_say():
    """bench/face_bench.py's preset and memory rows on a few frames (the bench itself runs 100 frames and
    60 s clips): each x264 preset keeps the pasted photo (PSNR > 35 dB at crf 18, read back from the
    mp4), superfast within 1.5 dB of medium; the memory row streams exactly its frames through the
    writer's paste-back."""
    from bench import face_bench

    rows = {r["preset"]: r for r in face_bench.preset_rows(presets=("medium", "superfast"), n=6)}
    for r in rows.values():
        assert r["size"] == "1920x1080" and r["bytes"] > 0 and r["psnr_db"] > 35, r
    assert abs(rows["medium"]["psnr_db"] - rows["superfast"]["psnr_db"]) < 1.5, rows
    memory = face_bench.memory_worker(0.4)
    assert memory["frames"] == 10 and memory["peak_rss_mib"] > 100, memory
