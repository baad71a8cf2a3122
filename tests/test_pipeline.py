"""Clip pipeline: bookkeeping (stub sampler), chunking invariance, stage re-runs, output length,
cancel, mp4 output and input validation (tiny random models built with the library constructors)."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from keyface import pipeline as P
from keyface.engines import build_interpolation_network, build_keyframe_network
from keyface.planner import STEP, WINDOW, plan_clip
from keyface.vae import VAE, DecoderConfig, EncoderConfig
from keyface.video_io import probe_mp4

FEAT = 64  # [enc | BEATs] feature width of the tiny models
HW = 4  # latent size -> 32 px video

# the original network_config.params of the released YAML, at tiny sizes (cf. the parity manifest)
UNET = {
    "num_classes": "sequential",
    "use_checkpoint": False,
    "use_linear_in_transformer": True,
    "use_spatial_context": True,
    "extra_ff_mix_layer": True,
    "merge_strategy": "learned_with_images",
    "audio_cond_method": "both_keyframes",
    "spatial_transformer_attn_type": "softmax-xformers",
    "model_channels": 32,
    "out_channels": 4,
    "channel_mult": [1],
    "num_res_blocks": 1,
    "attention_resolutions": [1],
    "num_head_channels": 16,
    "transformer_depth": 1,
    "context_dim": 32,
    "audio_dim": 32,
    "video_kernel_size": [3, 1, 1],
}


def _audio_emb(index):
    embs = [{"input_key": f"unused_{i}"} for i in range(index)]
    return embs + [{"input_key": "audio_emb", "params": {"audio_dim": FEAT, "linear_dim": 32}}]


KEYFRAME_CFG = {
    "network_config": {"params": dict(UNET, in_channels=8, adm_in_channels=512)},
    "conditioner_config": {"params": {"emb_models": _audio_emb(3)}},
}
INTERP_CFG = {
    "network_config": {"params": dict(UNET, in_channels=9, adm_in_channels=0)},
    "conditioner_config": {"params": {"emb_models": _audio_emb(1)}},
    "network_wrapper": {"params": {"im_size": [8 * HW, 8 * HW], "n_channels": 4}},
}
VAE_CFG = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4}


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("mix_factor"):
                p.copy_(n)
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * n if name.endswith("weight") else 0.1 * n)
            elif p.ndim == 1:
                p.copy_(0.02 * n)
            else:
                p.copy_(n / max(1, p[0].numel()) ** 0.5)
    return module.eval().requires_grad_(False)




def build_models():
    """Tiny random keyframe / interpolation / bad networks and VAE (32 px video, 4x4 latents)."""
    kf = randomize(build_keyframe_network(KEYFRAME_CFG), 1)
    good = randomize(build_interpolation_network(INTERP_CFG), 2)
    bad = randomize(build_interpolation_network(INTERP_CFG, with_audio_projection=False), 3)
    vae = randomize(VAE(DecoderConfig(**VAE_CFG), EncoderConfig(**VAE_CFG)), 4)
    return SimpleNamespace(kf=kf, good=good, bad=bad, vae=vae)


@pytest.fixture(scope="module")
def models():
    return build_models()


def clip_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        keyframe=torch.randn(n, 2, FEAT, generator=g),
        interpolation=torch.randn(n, 2, FEAT, generator=g),
        num_frames=n,
        valence=torch.linspace(-0.5, 0.8, n),
        arousal=torch.linspace(0.3, -0.2, n),
    )


@pytest.fixture(scope="module")
def identity(models):
    g = torch.Generator().manual_seed(5)
    img = P.prepare_identity(torch.rand(40, 52, 3, generator=g), 8 * HW)
    return P.encode_identity(models.vae, img)


# ---- bookkeeping with a stub sampler: every slot / segment gets the right rows, pairs and noise ----


class _Stub(nn.Module):
    def __init__(self, hw=HW):
        super().__init__()
        self.learned_mask = nn.Parameter(torch.zeros(4, hw, hw))
        self.audio_projection = None


@pytest.mark.parametrize("n", [1, 2, 13, 14, 15, 27, 28, 157, 170, 171, 250, 339])
def test_bookkeeping_rows_pairs_noise(monkeypatch, n):
    seen_kf, seen_it = [], []

    def kf_cond(z, val, aro, audio, proj):
        seen_kf.append((audio[0, :, 0, 0].tolist(), val[0].tolist(), aro[0].tolist(), z.clone()))
        return {}, {}

    def it_cond(pairs, audio, proj):
        seen_it.append((pairs[:, 0, :, 0, 0].tolist(), audio[:, :, 0, 0].tolist()))
        return {}

    monkeypatch.setattr(P, "keyframe_conditioning", kf_cond)
    monkeypatch.setattr(P, "interpolation_conditioning", it_cond)
    monkeypatch.setattr(P, "keyframe_denoiser", lambda *a, **k: None)
    monkeypatch.setattr(P, "interpolation_denoiser", lambda *a, **k: None)
    monkeypatch.setattr(P, "sample_euler", lambda denoise, noise, sigmas, callback=None: noise.clone())

    plan = plan_clip(n)
    rows = torch.arange(n, dtype=torch.float32)
    audio = rows[:, None, None].expand(n, 2, FEAT).contiguous()  # feature value = row index
    z_id = torch.full((1, 4, HW, HW), 7.0)
    kf = P.sample_keyframes(_Stub(), z_id, audio, rows / 1000, -rows / 1000, plan, seed=11)

    assert len(seen_kf) == plan.num_batches
    for b, (a_rows, val, aro, z) in enumerate(seen_kf):
        expect = [s.audio_row for s in plan.batches[b]]
        assert a_rows == expect and expect[0] == 0  # identity slot: frame-0 audio and emotion
        assert val == pytest.approx([r / 1000 for r in expect]) and aro == pytest.approx([-r / 1000 for r in expect])
        assert torch.equal(z, z_id)
        noise = P.stage_noise(11, "keyframes", b, (WINDOW, 4, HW, HW))
        for slot, j in plan.batch_keyframes(b):  # real slots kept, identity and pads dropped
            assert torch.equal(kf[j], noise[slot])
    assert kf.shape == (plan.num_keyframes, 4, HW, HW)

    marked = torch.arange(plan.num_keyframes, dtype=torch.float32)[:, None, None, None].expand(-1, 4, HW, HW)
    seg = P.interpolate_segments(_Stub(), _Stub(), marked, audio, plan, seed=11, segments_per_call=3)
    pairs = [p for batch_pairs, _ in seen_it for p in batch_pairs]
    seg_rows = [r for _, batch_rows in seen_it for r in batch_rows]
    assert pairs == [[float(s.start_keyframe), float(s.end_keyframe)] for s in plan.segments]
    assert all(e - s == 1 for s, e in pairs)  # consecutive real keyframes
    assert seg_rows == [[float(r) for r in s.audio_rows] for s in plan.segments]
    for s in plan.segments:
        assert torch.equal(seg[s.index], P.stage_noise(11, "interpolation", s.index, (WINDOW, 4, HW, HW)))


def test_stage_noise_is_stable():
    a = P.stage_noise(23, "keyframes", 0, (2, 3))
    assert torch.equal(a, P.stage_noise(23, "keyframes", 0, (2, 3)))
    assert not torch.equal(a, P.stage_noise(23, "keyframes", 1, (2, 3)))
    assert not torch.equal(a, P.stage_noise(23, "interpolation", 0, (2, 3)))
    assert not torch.equal(a, P.stage_noise(24, "keyframes", 0, (2, 3)))
    assert 0 <= P.stage_seed(23, "keyframes", 0) < 2**63


# ---- identity image -------------------------------------------------------------------------------


def test_prepare_identity_crop_and_pad():
    h, w = 60, 40
    img = torch.zeros(h, w, 3)
    img[:10] = 1.0  # top band is cut by the centre crop
    img[10:50, :, 1] = torch.linspace(0, 1, w)  # horizontal ramp survives
    out = P.prepare_identity(img, 40, mode="crop")  # 40x40 crop, no resize needed
    assert out.shape == (40, 40, 3)
    assert torch.equal(out, img[10:50])
    out = P.prepare_identity(img, 20, mode="crop")
    assert out.shape == (20, 20, 3) and out[..., 0].max() == 0  # band cropped away, not squashed in
    assert torch.all(out[0, 1:, 1] >= out[0, :-1, 1])  # ramp keeps its direction

    pad = P.prepare_identity(img, 60, mode="pad")  # pad the width to 60 with repeated edges
    assert pad.shape == (60, 60, 3)
    assert torch.equal(pad[:, 10:50], img)
    assert torch.equal(pad[:, 0], img[:, 0]) and torch.equal(pad[:, -1], img[:, -1])

    wide = torch.rand(30, 90, 3)
    assert P.prepare_identity(wide, 16).shape == (16, 16, 3)
    assert P.prepare_identity((wide * 255).to(torch.uint8), (16, 16), mode="pad").shape == (16, 16, 3)
    with pytest.raises(ValueError, match="crop' or 'pad"):
        P.prepare_identity(wide, 16, mode="squash")
    with pytest.raises(ValueError, match="H, W, 3"):
        P.prepare_identity(torch.rand(3, 30, 30), 16)


# ---- tiny real models ---------------------------------------------------------------------------------


def test_chunking_invariance_and_stage_reruns(models, identity):
    n = 30  # 4 keyframes, 3 segments, shared frames 13 and 26
    c = clip_inputs(n)
    plan = plan_clip(n)
    kf = P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, seed=3)
    assert kf.shape == (4, 4, HW, HW) and torch.isfinite(kf).all()

    # keyframes re-run alone, after unrelated RNG use: identical
    torch.manual_seed(999)
    torch.randn(100)
    assert torch.equal(kf, P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, seed=3))
    other = P.sample_keyframes(models.kf, identity, c.keyframe, c.valence, c.arousal, plan, seed=4)
    assert not torch.allclose(kf, other)

    seg = {}
    for spc in (1, 2):  # 3 (all segments in one call) is covered by the render() below
        seg[spc] = P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan, seed=3,
                                          segments_per_call=spc)
    assert seg[2].shape == (3, WINDOW, 4, HW, HW) and torch.isfinite(seg[2]).all()
    # segments are independent: batching changes at most float rounding of the batched kernels
    torch.testing.assert_close(seg[1], seg[2], rtol=0, atol=1e-5)
    # a single segment re-run alone (re-roll / resume) gives that segment of the full run
    torch.testing.assert_close(
        P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan, seed=3, segment_indices=[1])[0],
        seg[2][1], rtol=0, atol=1e-5)

    chunks = {cf: list(P.decode_segments(models.vae, seg[2], n, chunk_frames=cf)) for cf in (1, 7, 64)}
    assert [x.shape[0] for x in chunks[7]] == [7, 7, 7, 7, 2]
    frames = {cf: torch.cat(v) for cf, v in chunks.items()}
    assert frames[7].shape == (n, 8 * HW, 8 * HW, 3) and frames[7].dtype == torch.float32
    assert frames[7].device.type == "cpu" and 0 <= frames[7].min() and frames[7].max() <= 1
    torch.testing.assert_close(frames[1], frames[7], rtol=0, atol=1e-5)
    torch.testing.assert_close(frames[64], frames[7], rtol=0, atol=1e-5)
    # resume the decode at frame 10 (e.g. after a crash): the same frames
    resumed = torch.cat(list(P.decode_segments(models.vae, seg[2], n, chunk_frames=7, start_frame=10)))
    torch.testing.assert_close(resumed, frames[7][10:], rtol=0, atol=1e-5)

    # merge: frame 13 = mean of clamp((x+1)/2) of segment 0's last frame and segment 1's first frame;
    # frames inside a segment come from that segment alone
    def dec(z):
        return ((models.vae.decode(z[None]) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0)

    with torch.no_grad():
        torch.testing.assert_close(frames[7][13], (dec(seg[2][0, 13]) + dec(seg[2][1, 0])) / 2, rtol=0, atol=1e-5)
        torch.testing.assert_close(frames[7][14], dec(seg[2][1, 1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(frames[7][29], dec(seg[2][2, 3]), rtol=0, atol=1e-5)

    # the whole-clip render (3 segments per call, 5-frame decode chunks) equals the stages run one by one
    out = P.render(models.kf, models.good, models.bad, models.vae, identity, c, valence=c.valence,
                   arousal=c.arousal, seed=3, segments_per_call=3, chunk_frames=5)
    torch.testing.assert_close(out, frames[7], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 9, 14])
def test_output_length_short_clips(models, identity, n):
    c = clip_inputs(n, seed=n)
    events = []
    out = P.render(models.kf, models.good, models.bad, models.vae, identity, c, seed=1, callback=events.append,
                   chunk_frames=4)
    assert out.shape == (n, 8 * HW, 8 * HW, 3) and torch.isfinite(out).all()
    stages = [e.stage for e in events]
    assert stages.count("keyframes") == 11 and stages.count("interpolation") == 11
    assert stages.count("decode") == -(-n // 4)
    assert [e.step for e in events if e.stage == "decode"] == list(range(1, -(-n // 4) + 1))
    assert all(e.step <= e.total for e in events)


def test_render_to_file_and_cancel(models, identity, tmp_path):
    n = 20
    c = clip_inputs(n)
    audio = 0.1 * torch.randn(1, n * 640 - 100)
    path = tmp_path / "clip.mp4"
    P.render_to_file(models.kf, models.good, models.bad, models.vae, identity, c, path, audio=audio,
                     sample_rate=16000, seed=2, chunk_frames=6)
    info = probe_mp4(path)
    assert info["frames"] == n and (info["width"], info["height"]) == (8 * HW, 8 * HW)
    # the audio is 100 samples short of N / 25 s: padded with silence to exactly the video's length
    # (within one AAC frame is the requirement; the writer's edit list makes it exact)
    assert info["audio_seconds"] == pytest.approx(n / 25, abs=1024 / 16000)
    assert info["audio_seconds"] == n / 25 == info["video_seconds"]

    # cancel in the middle of the decode (after some frames were encoded), and during sampling
    for when in (("decode", 2), ("interpolation", 3), ("keyframes", 1)):
        target = tmp_path / f"cancel_{when[0]}.mp4"

        def cancel(ev, when=when):
            if (ev.stage, ev.step) == when:
                raise KeyboardInterrupt("user cancel")

        with pytest.raises(KeyboardInterrupt):
            P.render_to_file(models.kf, models.good, models.bad, models.vae, identity, c, target, audio=audio,
                             sample_rate=16000, seed=2, chunk_frames=6, callback=cancel)
        assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # no temp files left


def test_validation_errors(models, identity):
    c = clip_inputs(30)
    plan = plan_clip(30)
    with pytest.raises(ValueError, match="29 frames but the clip plan has 30"):
        P.sample_keyframes(models.kf, identity, c.keyframe[:29], None, None, plan, seed=0)
    with pytest.raises(ValueError, match="valence has 31 frames but the clip plan has 30"):
        P.sample_keyframes(models.kf, identity, c.keyframe, torch.zeros(31), None, plan, seed=0)
    kf = torch.zeros(4, 4, HW, HW)
    with pytest.raises(ValueError, match="3 keyframes but the clip plan \\(30 frames\\) has 4"):
        P.interpolate_segments(models.good, models.bad, kf[:3], c.interpolation, plan, seed=0)
    with pytest.raises(ValueError, match="interpolation audio features has 40 frames but the clip plan has 30"):
        P.interpolate_segments(models.good, models.bad, kf, torch.zeros(40, 2, FEAT), plan, seed=0)
    with pytest.raises(ValueError, match="learned mask is 4x4"):
        P.interpolate_segments(models.good, models.bad, torch.zeros(4, 4, 8, 8), c.interpolation, plan, seed=0)
    with pytest.raises(ValueError, match="segments_per_call"):
        P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan, seed=0, segments_per_call=0)
    with pytest.raises(ValueError, match="bad"):
        P.interpolate_segments(models.good, None, kf, c.interpolation, plan, seed=0)
    with pytest.raises(ValueError, match="2 segments but a clip of 30 frames has 3"):
        next(P.decode_segments(models.vae, torch.zeros(2, WINDOW, 4, HW, HW), 30))
    with pytest.raises(ValueError, match="identity latent is 8x8 .* learned mask is 4x4"):
        P.render(models.kf, models.good, models.bad, models.vae, torch.zeros(1, 4, 8, 8), c)
    with pytest.raises(ValueError, match="identity latent: expected"):
        P.render(models.kf, models.good, models.bad, models.vae, torch.zeros(2, 4, HW, HW), c)
    with pytest.raises(ValueError, match="keyframe features have 30 frames but interpolation features 29"):
        P.render(models.kf, models.good, models.bad, models.vae, identity, (c.keyframe, c.interpolation[:29]))
    assert P.model_resolution(models.good) == (8 * HW, 8 * HW)
    assert STEP == 13


# ---- output audio length: exactly N / 25 s ------------------------------------------------------------


@pytest.mark.parametrize("rate,channels,seconds", [(44100, 2, 1.3), (22222, 1, 0.5)])
def test_render_to_file_audio_is_cut_or_padded_to_the_video(models, identity, tmp_path, rate, channels, seconds):
    n = 20  # 0.8 s: 1.3 s of audio is cut, 0.5 s padded; 22222 Hz is not an AAC rate (written at 48 kHz)
    audio = 0.1 * torch.randn(channels, int(rate * seconds))
    path = tmp_path / "clip.mp4"
    P.render_to_file(models.kf, models.good, models.bad, models.vae, identity, clip_inputs(n), path, audio=audio,
                     sample_rate=rate, seed=2, segments_per_call=3)
    info = probe_mp4(path)
    aac_rate = rate if rate == 44100 else 48000
    assert info["frames"] == n and info["audio_rate"] == aac_rate and info["audio_channels"] == channels
    assert info["audio_seconds"] == pytest.approx(n / 25, abs=1024 / aac_rate)


def test_fit_audio_to_frames():
    from keyface.planner import audio_samples_for_frames
    from keyface.video_io import MediaError, fit_audio_to_frames

    assert audio_samples_for_frames(77, 16000) == 49280 and audio_samples_for_frames(1, 22222) == 889  # 888.88
    assert audio_samples_for_frames(3, 44100) == 5292 and audio_samples_for_frames(0, 8000) == 0
    wav = torch.arange(1.0, 1001.0).reshape(1, -1) / 2000
    cut = fit_audio_to_frames(wav, 16000, 1)  # 640 samples
    assert cut.shape == (1, 640) and cut.dtype.name == "float32" and (cut == wav[:, :640].numpy()).all()
    padded = fit_audio_to_frames(wav[0], 16000, 2)  # [S] input -> [1, 1280], silence after the input
    assert padded.shape == (1, 1280) and (padded[:, :1000] == wav.numpy()).all() and not padded[:, 1000:].any()
    assert wav.shape == (1, 1000)  # input untouched
    with pytest.raises(MediaError, match="channels, samples"):
        fit_audio_to_frames(torch.zeros(1, 2, 3), 16000, 1)
    with pytest.raises(ValueError, match="sample_rate > 0"):
        audio_samples_for_frames(3, 0)


# ---- speed settings: call sizes under out-of-memory, attention backend, torch.compile ------------------


class _OomAbove:
    """Wraps a real network: torch.OutOfMemoryError for calls above ``max_rows`` rows, counts the rest."""

    def __init__(self, net, max_rows):
        self.net, self.max_rows, self.calls, self.failed = net, max_rows, [], []

    def __getattr__(self, name):  # learned_mask, audio_projection, parameters(), ...
        return getattr(self.net, name)

    def denoise(self, x, sigma, **kw):
        if x.shape[0] > self.max_rows:
            self.failed.append(x.shape[0])
            raise torch.OutOfMemoryError(f"test: {x.shape[0]} rows > {self.max_rows}")
        self.calls.append(x.shape[0])
        return self.net.denoise(x, sigma, **kw)


def test_out_of_memory_back_off_same_result(models, identity, caplog):
    n = 60  # 5 keyframes in one batch, 5 segments
    c = clip_inputs(n)
    plan = plan_clip(n)
    kf_net = _OomAbove(models.kf, 14)  # one guidance branch (14 rows) per call fits, two do not
    with caplog.at_level("WARNING", logger="keyface.diffusion"):
        kf = P.sample_keyframes(kf_net, identity, c.keyframe, None, None, plan, seed=3)
    assert kf_net.failed == [42, 28] and kf_net.calls == [14] * 33  # 11 steps x 3 branches, 2 failures in all
    # bit-identical to one branch per call without any failure (the same calls), close to 3 per call
    one = P.sample_keyframes(models.kf, identity, c.keyframe, None, None, plan, seed=3, branches_per_call=1)
    assert torch.equal(kf, one)
    torch.testing.assert_close(kf, P.sample_keyframes(models.kf, identity, c.keyframe, None, None, plan, seed=3),
                               rtol=0, atol=1e-5)

    good, bad = _OomAbove(models.good, 28), _OomAbove(models.bad, 28)  # 2 segments fit, 4 do not
    with caplog.at_level("WARNING", logger="keyface.diffusion"):
        seg = P.interpolate_segments(good, bad, kf, c.interpolation, plan, seed=3, segments_per_call=4)
    # groups of 4 + 1 segments; the good network's first call fails, then 2 + 2 (+ 1) per step and network
    assert good.failed == [56] and bad.failed == []
    assert good.calls == bad.calls == [28, 28] * 11 + [14] * 11
    assert torch.equal(seg, P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan, seed=3,
                                                   segments_per_call=2))
    msgs = [r.getMessage() for r in caplog.records]  # once per stage, with the size that worked
    assert len(msgs) == 2
    assert "3 keyframe guidance branches" in msgs[0] and "continuing with 1" in msgs[0]
    assert "4 interpolation segments" in msgs[1] and "continuing with 2" in msgs[1]

    with pytest.raises(torch.OutOfMemoryError):  # not even one segment fits: the error reaches the caller
        P.interpolate_segments(_OomAbove(models.good, 13), models.bad, kf, c.interpolation, plan, seed=3)


def test_attention_backend_applies_to_the_render_only(models, identity):
    n = 16
    c = clip_inputs(n)
    seen = []  # (flash enabled, math enabled) at every UNet / decoder call

    def record(*_):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))

    hooks = [m.register_forward_pre_hook(record) for m in (models.kf.diffusion_model, models.good.diffusion_model,
                                                          models.vae.decoder)]
    try:
        between = []
        chunks = P.iter_render(models.kf, models.good, models.bad, models.vae, identity, c, seed=1, chunk_frames=8,
                               attention="math")
        out = []
        for chunk in chunks:
            between.append(torch.backends.cuda.flash_sdp_enabled())  # the caller's code between chunks
            out.append(chunk)
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {(False, True)}
    assert between == [True, True] and torch.backends.cuda.flash_sdp_enabled()
    default = P.render(models.kf, models.good, models.bad, models.vae, identity, c, seed=1)
    torch.testing.assert_close(torch.cat(out), default, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="attention must be one of auto, math, flash, efficient, cudnn, got 'fast'"):
        P.render(models.kf, models.good, models.bad, models.vae, identity, c, attention="fast")
    if not torch.cuda.is_available():  # no memory-efficient SDPA kernel on the CPU
        with pytest.raises(ValueError, match="attention='efficient': torch has no efficient attention kernel"):
            P.render(models.kf, models.good, models.bad, models.vae, identity, c, attention="efficient")


def test_compile_swaps_the_unet_bodies_for_the_render_only(models, identity, monkeypatch):
    """The plumbing of RenderSettings.compile (a real inductor compile takes minutes on a CPU: bench knobs)."""
    compiled = []

    class Counted(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body, self.calls = body, 0

        def forward(self, *a, **k):
            self.calls += 1
            return self.body(*a, **k)

    def fake_compile(body, dynamic=None):
        assert dynamic is False
        compiled.append(Counted(body))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    bodies = [m.diffusion_model for m in (models.kf, models.good, models.bad)]
    c = clip_inputs(16)
    out = P.render(models.kf, models.good, models.bad, models.vae, identity, c, seed=1, compile=True)
    assert [w.body for w in compiled] == bodies and all(w.calls > 0 for w in compiled)
    assert [m.diffusion_model for m in (models.kf, models.good, models.bad)] == bodies  # put back
    torch.testing.assert_close(out, P.render(models.kf, models.good, models.bad, models.vae, identity, c, seed=1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("field,value,message", [
    ("segments_per_call", 0, "segments_per_call must be an integer >= 1, got 0"),
    ("branches_per_call", 4, "branches_per_call must be an integer 1..3, got 4"),
    ("chunk_frames", 1.5, "chunk_frames must be an integer >= 1"),
    ("interpolation_steps", 9, "interpolation_steps must be an integer >= 10"),
    ("compile", "yes", "compile must be True or False"),
    ("attention", "xformers", "attention must be one of"),
])
def test_render_settings_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        P.RenderSettings(**{field: value})


# ------------------------------------------------------------------- decoder memory (issue 9 item 9)
def test_decode_chunk_frames_fit_the_free_memory(models):
    from keyface.vae import decode_memory

    cfg = models.vae.decoder.config
    per_row = decode_memory(cfg, 1, (64, 64), torch.float16)
    upscale = 2 ** (len(cfg.ch_mult) - 1)
    # the released decoder's bytes per pixel, scaled by this decoder's width at full resolution
    assert per_row == int((64 * upscale) ** 2 * 2 * 2178 * (cfg.ch * cfg.ch_mult[0] / 128))
    assert P.decode_chunk_frames(models.vae, (64, 64), torch.float16, None, most=16) == 16  # unknown: as asked
    assert P.decode_chunk_frames(models.vae, (64, 64), torch.float16, 0, most=16) == 1  # never below one frame
    for frames in (1, 5, 13, 14, 16):
        room = P.decode_rows_for(frames) * per_row / P.DECODE_MEMORY_FRACTION
        assert P.decode_chunk_frames(models.vae, (64, 64), torch.float16, int(room) + 1, most=16) == frames
        assert P.decode_chunk_frames(models.vae, (64, 64), torch.float16, int(room) + 1, most=3) == min(frames, 3)
    # the released decoder at 512 px, float16: ~1.1 GB per latent row (an estimate; vae.py says how
    # it compares with measurements), so 16 frames (18 rows) need ~25 GB of free memory
    from keyface.vae import SVD_DECODER

    released = decode_memory(SVD_DECODER, 1, (64, 64), torch.float16)
    assert 1.0e9 < released < 1.3e9
    assert P.decode_rows_for(16) == 18 and P.decode_rows_for(13) == 15 and P.decode_rows_for(1) == 2


def test_chunked_decode_equals_unchunked(models):
    """Sizing the chunks from the free memory changes how many frames go into one decoder call, never
    the frames (each frame is decoded on its own, decoding_t = 1)."""
    from keyface.vae import decode_memory

    n = 30
    plan = plan_clip(n)
    seg = torch.randn(plan.num_segments, WINDOW, 4, HW, HW, generator=torch.Generator().manual_seed(5))
    whole = torch.cat(list(P.decode_segments(models.vae, seg, plan, chunk_frames=n)))
    per_row = decode_memory(models.vae.decoder.config, 1, (HW, HW), torch.float32)
    for frames in (1, 3, 7, 13, 16):
        free = int(P.decode_rows_for(frames) * per_row / P.DECODE_MEMORY_FRACTION) + 1
        chunks = list(P.decode_segments(models.vae, seg, plan, chunk_frames=n, free_memory=free))
        assert [c.shape[0] for c in chunks[:-1]] == [frames] * (len(chunks) - 1)
        # the same frames up to float rounding of batched kernels (measured: at most 9.2e-7 of 0..1)
        torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=1e-5)
    keyframes = torch.randn(5, 4, HW, HW, generator=torch.Generator().manual_seed(6))
    previews = P.decode_keyframe_preview(models.vae, keyframes, chunk_frames=5)
    tight = P.decode_keyframe_preview(models.vae, keyframes, chunk_frames=5,
                                      free_memory=int(2 * per_row / P.DECODE_MEMORY_FRACTION) + 1)
    torch.testing.assert_close(tight, previews, rtol=0, atol=1e-5)


def test_free_device_memory(monkeypatch):
    """CUDA: the driver's free memory plus torch's unused cache; the CPU: unknown (the chunk as given)."""
    assert P.free_device_memory("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    assert P.free_device_memory("cuda:0") == 4 << 30


def test_render_decodes_each_group_before_sampling_the_next(models, identity, monkeypatch):
    """iter_render interpolates a segment group only when the decode reaches it: the frames of a group
    go to the writer (which encodes in its own thread) while the next group is not yet sampled, and at
    most one group plus the shared segment is held, however long the clip. Same frames as sampling all
    segments first; the interpolation progress still counts 1..total over the whole stage."""
    n = 5 * STEP + 1  # 5 segments
    c = clip_inputs(n, seed=4)
    held = []
    real_call = P._SegmentsOnDemand.__call__

    def spy(self, segment):
        out = real_call(self, segment)
        held.append(len(self._held))
        return out

    monkeypatch.setattr(P._SegmentsOnDemand, "__call__", spy)
    events = []
    out = P.render(models.kf, models.good, models.bad, models.vae, identity, c, seed=6, segments_per_call=2,
                   chunk_frames=4, callback=events.append)
    interp = [e for e in events if e.stage == "interpolation"]
    assert [e.step for e in interp] == list(range(1, 34)) and {e.total for e in interp} == {33}
    assert [e.item for e in interp][::11] == [0, 1, 2] and {e.items for e in interp} == {3}
    stages = [e.stage for e in events]
    first_decode, last_interp = stages.index("decode"), len(stages) - 1 - stages[::-1].index("interpolation")
    assert first_decode < last_interp  # decoding started before the last group was sampled
    assert max(held) <= 2 + 1

    kf, seg, plan = P.sample_clip(models.kf, models.good, models.bad, identity, c, seed=6, segments_per_call=2)
    at_once = torch.cat(list(P.decode_segments(models.vae, seg, plan, chunk_frames=4)))
    torch.testing.assert_close(out, at_once, rtol=0, atol=0)
