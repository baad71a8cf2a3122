"""Sigma schedule, v-scaling, Euler sampler and both guidance schemes (spec 5)."""

import math

import pytest
import torch

from keyface import diffusion
from keyface.diffusion import (
    AYS_BASE_SIGMAS,
    CallSizer,
    ays_sigmas,
    interpolation_denoiser,
    keyframe_denoiser,
    sample_euler,
    v_scaling,
)


def test_ays_schedule():
    s = ays_sigmas(10)
    assert s.dtype == torch.float64 and len(s) == 12 and s[-1] == 0
    assert s[:-1].tolist() == list(AYS_BASE_SIGMAS)
    s11 = ays_sigmas(11)
    torch.testing.assert_close(s11[:-1], s[:-1], rtol=1e-12, atol=0)
    s25 = ays_sigmas(25)
    assert len(s25) == 26 and math.isclose(float(s25[0]), 700.0) and math.isclose(float(s25[-2]), 0.002)
    assert bool((s25[:-1][1:] < s25[:-1][:-1]).all())


@pytest.mark.parametrize("n", [0, 1, 5, 9, -3])
def test_ays_below_10_errors(n):
    with pytest.raises(ValueError, match="at least 10"):
        ays_sigmas(n)


def test_ays_non_integer_errors():
    with pytest.raises(ValueError):
        ays_sigmas(10.5)


def test_v_scaling_table():
    # spec 5.2 table
    for sigma, c_in, c_noise in [(700, 1.4286e-3, 1.63777), (4.248, 0.22914, 0.36161), (0.002, 0.999998, -1.55365)]:
        c_skip, c_out, ci, cn = v_scaling(torch.tensor(sigma, dtype=torch.float64))
        assert math.isclose(float(ci), c_in, rel_tol=1e-4)
        assert math.isclose(float(cn), c_noise, rel_tol=1e-4)
        assert math.isclose(float(c_skip), 1 / (sigma**2 + 1), rel_tol=1e-9)
        assert math.isclose(float(c_out), -sigma / math.sqrt(sigma**2 + 1), rel_tol=1e-9)


def test_sampler_formula_callback_and_noise_untouched():
    noise = torch.randn(14, 4, 2, 2)
    keep = noise.clone()
    sigmas = ays_sigmas(10)
    calls = []

    def denoise(x, sigma):
        assert sigma.dim() == 0
        return 0.5 * x

    def callback(i, total, x, denoised):
        calls.append((i, total, x.clone(), denoised.clone()))

    out = sample_euler(denoise, noise, sigmas, callback=callback)
    assert torch.equal(noise, keep)
    assert [c[0] for c in calls] == list(range(11)) and all(c[1] == 11 for c in calls)
    # manual reference
    x = keep * math.sqrt(1 + 700.0**2)
    for i in range(11):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (sn - s) * (x - 0.5 * x) / s
        torch.testing.assert_close(calls[i][2], x.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, calls[-1][2])
    torch.testing.assert_close(out, calls[-1][3], rtol=1e-5, atol=1e-6)  # last step lands on D


def test_sampler_abort_from_callback():
    class Cancelled(Exception):
        pass

    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return torch.zeros_like(x)

    def callback(i, total, x, d):
        if i == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        sample_euler(denoise, torch.randn(2, 4, 2, 2), ays_sigmas(10), callback=callback)
    assert len(seen) == 3


class _FakeNet:
    """Deterministic per-segment function standing in for a network's ``denoise``."""

    def __init__(self, k):
        self.k = k
        self.calls = []

    def denoise(self, x, sigma, *, concat, crossattn, vector=None):
        self.calls.append(x.shape[0])
        rows = x.shape[0]
        videos = concat.shape[0]
        sig = torch.as_tensor(sigma).expand(rows) if torch.as_tensor(sigma).dim() == 0 else sigma
        per_video = concat.flatten(1).mean(1) + crossattn.flatten(1).sum(1)
        out = self.k * torch.tanh(x) + per_video.repeat_interleave(rows // videos)[:, None, None, None] + sig[:, None, None, None]
        if vector is not None:
            out = out + vector.mean(1)[:, None, None, None]
        return out


def test_interpolation_segments_per_call_invariance_and_guidance():
    torch.manual_seed(0)
    s = 5
    cond = {"concat": torch.randn(s, 8, 3, 3), "crossattn": torch.randn(s, 14, 6)}
    x = torch.randn(s * 14, 4, 3, 3)
    sigma = torch.tensor(4.248)
    results = {}
    for per_call in (1, 2, 3, 5, 8):
        good, bad = _FakeNet(1.0), _FakeNet(0.3)
        d = interpolation_denoiser(good, bad, cond, scale=2.0, segments_per_call=per_call)(x, sigma)
        assert max(good.calls) <= per_call * 14 and sum(good.calls) == s * 14
        results[per_call] = d
    for d in results.values():
        torch.testing.assert_close(d, results[2], rtol=0, atol=0)
    good, bad = _FakeNet(1.0), _FakeNet(0.3)
    d_good = good.denoise(x, sigma, **cond)
    d_bad = bad.denoise(x, sigma, **cond)
    torch.testing.assert_close(results[2], d_bad + 2.0 * (d_good - d_bad))
    # autoguidance off: the good network only, the bad one is never called
    good, bad = _FakeNet(1.0), _FakeNet(0.3)
    d = interpolation_denoiser(good, bad, cond, autoguidance=False)(x, sigma)
    torch.testing.assert_close(d, d_good)
    assert bad.calls == []
    with pytest.raises(ValueError, match="bad network"):
        interpolation_denoiser(good, None, cond)
    with pytest.raises(ValueError):
        interpolation_denoiser(good, bad, cond, segments_per_call=0)


def test_keyframe_guidance_one_batched_call():
    torch.manual_seed(1)
    c = {"concat": torch.randn(1, 4, 3, 3), "crossattn": torch.randn(1, 14, 6), "vector": torch.randn(14, 512)}
    uc = {"concat": torch.zeros(1, 4, 3, 3), "crossattn": torch.zeros(1, 14, 6), "vector": c["vector"]}
    net = _FakeNet(1.0)
    x = torch.randn(14, 4, 3, 3)
    sigma = torch.tensor(15.886)
    d = keyframe_denoiser(net, c, uc, ref_ratio=1.5, audio_ratio=3.0)(x, sigma)
    assert net.calls == [42]
    ref = _FakeNet(1.0)
    d_u = ref.denoise(x, sigma, concat=uc["concat"], crossattn=uc["crossattn"], vector=c["vector"])
    d_id = ref.denoise(x, sigma, concat=c["concat"], crossattn=uc["crossattn"], vector=c["vector"])
    d_full = ref.denoise(x, sigma, **c)
    torch.testing.assert_close(d, d_u + 1.5 * (d_id - d_u) + 3.0 * (d_full - d_id))


def test_interpolation_segments_per_call_invariance_real_network():
    """Same invariance through the real tiny interpolation network (wrapper assembly included)."""
    from keyface.engines import InterpolationNetwork
    from keyface.config import UNetConfig

    cfg = UNetConfig(in_channels=9, adm_in_channels=0, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1,), num_head_channels=16, context_dim=16, audio_dim=16)
    torch.manual_seed(0)
    good = InterpolationNetwork(cfg, mask_hw=(4, 4), audio_feature_dim=24)
    bad = InterpolationNetwork(cfg, mask_hw=(4, 4), audio_feature_dim=None)
    with torch.no_grad():
        for p in list(good.parameters()) + list(bad.parameters()):
            p.copy_(torch.randn_like(p) * 0.1)
    s = 3
    cond = {"concat": torch.randn(s, 8, 4, 4), "crossattn": torch.randn(s, 14, 16)}
    x = torch.randn(s * 14, 4, 4, 4)
    with torch.no_grad():
        outs = [interpolation_denoiser(good, bad, cond, segments_per_call=k)(x, torch.tensor(1.789)) for k in (1, 2, 3)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


def test_keyframe_denoiser_default_uc_and_pair():
    torch.manual_seed(2)
    c = {"concat": torch.randn(1, 4, 3, 3), "crossattn": torch.randn(1, 14, 6), "vector": torch.randn(14, 512)}
    uc = {"concat": torch.zeros(1, 4, 3, 3), "crossattn": torch.zeros(1, 14, 6), "vector": c["vector"]}
    x = torch.randn(14, 4, 3, 3)
    sigma = torch.tensor(0.981)
    ref = keyframe_denoiser(_FakeNet(1.0), c, uc)(x, sigma)
    torch.testing.assert_close(keyframe_denoiser(_FakeNet(1.0), c)(x, sigma), ref, rtol=0, atol=0)
    torch.testing.assert_close(keyframe_denoiser(_FakeNet(1.0), (c, uc))(x, sigma), ref, rtol=0, atol=0)


class _RecordingNet:
    """A stand-in network: D = x * (1 + sum of the conditioning), recording the rows of every call."""

    def __init__(self, offset=0.0):
        self.rows, self.offset = [], offset

    def denoise(self, x, sigma, concat, crossattn, vector=None):
        self.rows.append(x.shape[0])
        rows = x.shape[0]
        per_video = rows // concat.shape[0]
        c = concat.flatten(1).sum(1) + crossattn.flatten(1).sum(1) + self.offset
        return x * (1 + c.repeat_interleave(per_video)[:, None, None, None])


def test_guidance_min_sigma_skips_guidance_only_at_or_below_it():
    import torch

    from keyface.diffusion import interpolation_denoiser, keyframe_denoiser

    g = torch.Generator().manual_seed(0)
    cond = {"concat": torch.randn(1, 4, 2, 2, generator=g), "crossattn": torch.randn(1, 14, 3, generator=g),
            "vector": torch.randn(14, 5, generator=g)}
    x = torch.randn(14, 4, 2, 2, generator=g)
    net = _RecordingNet()
    exact = keyframe_denoiser(net, cond)
    approx = keyframe_denoiser(net, cond, guidance_min_sigma=0.0025)
    torch.testing.assert_close(approx(x, torch.tensor(0.01)), exact(x, torch.tensor(0.01)))  # above: exact
    assert net.rows == [42, 42]
    full_only = approx(x, torch.tensor(0.002))
    assert net.rows[-1] == 14  # one third of the rows
    torch.testing.assert_close(full_only, net.denoise(x, 0.002, cond["concat"], cond["crossattn"], cond["vector"]))
    assert not torch.allclose(full_only, exact(x, torch.tensor(0.002)))

    good, bad = _RecordingNet(), _RecordingNet(offset=0.5)
    icond = {"concat": torch.randn(2, 8, 2, 2, generator=g), "crossattn": torch.randn(2, 14, 3, generator=g)}
    xi = torch.randn(28, 4, 2, 2, generator=g)
    guided = interpolation_denoiser(good, bad, icond, guidance_min_sigma=0.0025)
    guided(xi, torch.tensor(0.01))
    assert len(good.rows) == 1 and len(bad.rows) == 1
    out = guided(xi, torch.tensor(0.002))
    assert len(good.rows) == 2 and len(bad.rows) == 1  # the bad network is skipped at the last step
    torch.testing.assert_close(out, good.denoise(xi, 0.002, icond["concat"], icond["crossattn"]))


# ---- out-of-memory back-off: split the call, same result ---------------------------------------------


class _OomAbove(_FakeNet):
    """_FakeNet that runs out of memory (torch.OutOfMemoryError, as CUDA raises it) above ``max_rows``."""

    def __init__(self, k, max_rows):
        super().__init__(k)
        self.max_rows, self.failed = max_rows, []

    def denoise(self, x, sigma, **kw):
        if x.shape[0] > self.max_rows:
            self.failed.append(x.shape[0])
            raise torch.OutOfMemoryError(f"fake: {x.shape[0]} rows > {self.max_rows}")
        return super().denoise(x, sigma, **kw)


def test_interpolation_out_of_memory_halves_the_call_and_keeps_the_size(monkeypatch, caplog):
    torch.manual_seed(3)
    s = 5
    cond = {"concat": torch.randn(s, 8, 3, 3), "crossattn": torch.randn(s, 14, 6)}
    x = torch.randn(s * 14, 4, 3, 3)
    sigmas = [torch.tensor(4.248), torch.tensor(0.981)]
    ref_good, ref_bad = _FakeNet(1.0), _FakeNet(0.3)
    ref = interpolation_denoiser(ref_good, ref_bad, cond, segments_per_call=4)
    expect = [ref(x, sig) for sig in sigmas]
    assert ref_good.calls == [56, 14, 56, 14]

    released = []
    monkeypatch.setattr(diffusion, "_release_cached_memory", lambda: released.append(1))
    good, bad = _OomAbove(1.0, 28), _OomAbove(0.3, 28)  # 2 segments fit, 4 do not
    sizer = CallSizer(4, "interpolation segments")
    with caplog.at_level("WARNING", logger="keyface.diffusion"):
        den = interpolation_denoiser(good, bad, cond, segments_per_call=sizer)
        got = [den(x, sig) for sig in sigmas]
    for g, e in zip(got, expect):
        assert torch.equal(g, e)  # row-independent network: the split changes nothing
    # one failed call of 4 segments, then 2 + 2 + 1 per network and step; the size sticks
    assert good.failed == [56] and bad.failed == []
    assert good.calls == [28, 28, 14] * 2 and bad.calls == [28, 28, 14] * 2
    assert sizer.limit == 2 and released == [1]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "4 interpolation segments" in msgs[0] and "continuing with 2" in msgs[0]


def test_keyframe_out_of_memory_splits_branches_then_gives_up():
    torch.manual_seed(4)
    c = {"concat": torch.randn(1, 4, 3, 3), "crossattn": torch.randn(1, 14, 6), "vector": torch.randn(14, 512)}
    x = torch.randn(14, 4, 3, 3)
    sigma = torch.tensor(7.977)
    expect = keyframe_denoiser(_FakeNet(1.0), c)(x, sigma)
    net = _OomAbove(1.0, 14)  # one branch fits
    den = keyframe_denoiser(net, c)
    assert torch.equal(den(x, sigma), expect)
    assert net.failed == [42, 28] and net.calls == [14, 14, 14]  # 3 -> 2 -> 1 branch per call
    assert torch.equal(den(x, sigma), expect)
    assert net.failed == [42, 28] and net.calls == [14] * 6  # the working size is kept
    # a single branch that does not fit: the error reaches the caller
    with pytest.raises(torch.OutOfMemoryError):
        keyframe_denoiser(_OomAbove(1.0, 13), c)(x, sigma)
    with pytest.raises(ValueError, match="per call must be an integer >= 1"):
        keyframe_denoiser(net, c, branches_per_call=0)


def test_call_sizer_other_errors_pass_through():
    sizer = CallSizer(4, "things")

    def boom(i0, i1):
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        sizer.map(boom, 8)
    assert sizer.limit == 4
    assert CallSizer(3).map(lambda i0, i1: (i0, i1), 7) == [(0, 3), (3, 6), (6, 7)]
