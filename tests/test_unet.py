"""VideoUNet structure, layer injection, dtypes and config parsing (numerics: tests/test_parity.py -k unet)."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from keyface.config import INTERPOLATION_UNET, KEYFRAME_UNET, UNetConfig
from keyface.ops import TORCH_OPS
from keyface.unet import VideoUNet

KEYS = Path(__file__).parent / "fixtures" / "keys"
PREFIX = "model.diffusion_model."

# The released network_config.params (scripts/sampling/configs/keyframe.yaml, spec 4.4).
RELEASED_PARAMS = {
    "adm_in_channels": 512, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 8,
    "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "spatial_transformer_attn_type": "softmax-xformers",
    "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
    "video_kernel_size": [3, 1, 1], "fine_tuning_method": None, "audio_cond_method": "both_keyframes",
    "additional_audio_frames": 0, "audio_dim": 1024, "unfreeze_blocks": [],
}

TINY = UNetConfig(
    in_channels=8, adm_in_channels=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(1, 2), num_head_channels=16, context_dim=32, audio_dim=32, num_frames=14,
)


def _reference_keys(name):
    keys = {}
    for line in (KEYS / f"{name}_unet.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        if key.startswith(PREFIX):  # model.learned_mask belongs to the interpolation wrapper
            keys[key[len(PREFIX):]] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return keys


def _breakdown(name):
    rows = (KEYS / f"{name}_unet_param_breakdown.txt").read_text().split("\n")
    return {k: int(v) for k, v in (r.split("\t") for r in rows if r.strip())}


def _inputs(cfg, videos=1, hw=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = videos * cfg.num_frames
    x = torch.randn(rows, cfg.in_channels, *hw, generator=g)
    t = torch.rand(rows, generator=g) * 2 - 1
    ctx = torch.randn(videos, cfg.num_frames, cfg.context_dim, generator=g)
    y = torch.randn(rows, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    return x, t, ctx, y


def _randomise(net, seed=0):
    """Non-trivial values everywhere (mix factors included), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("mix_factor") else 0.2))
    return net


# ------------------------------------------------------------------------------ (a) structure
@pytest.mark.parametrize("name,cfg,count", [
    ("keyframe", KEYFRAME_UNET, 1_525_606_122),
    ("interpolation", INTERPOLATION_UNET, 1_524_953_642),
])
def test_full_size_keys_shapes_and_counts(name, cfg, count):
    net = VideoUNet(cfg, device="meta")
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref = _reference_keys(name)
    assert sorted(set(ref) - set(got)) == [] and sorted(set(got) - set(ref)) == []
    assert list(got) == list(ref)  # same registration order as the original
    assert {k: v for k, v in got.items() if v != ref[k]} == {}
    assert sum(p.numel() for p in net.parameters()) == count
    assert not list(net.buffers())
    per_block = {}
    for k, p in net.named_parameters():
        parts = k.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("input_blocks", "output_blocks") else parts[0]
        per_block[block] = per_block.get(block, 0) + p.numel()
    assert per_block == _breakdown(name)
    assert sum(1 for k in got if k.endswith("time_mixer.mix_factor")) == 38  # spec 6.3


def test_label_emb_width_and_released_defaults():
    assert KEYFRAME_UNET.label_emb_in == 1536 and INTERPOLATION_UNET.label_emb_in == 1024
    assert (KEYFRAME_UNET.in_channels, INTERPOLATION_UNET.in_channels) == (8, 9)
    assert UNetConfig.from_original(RELEASED_PARAMS) == KEYFRAME_UNET
    interp = dict(RELEASED_PARAMS, in_channels=9, adm_in_channels=0, unfreeze_blocks=["input"])
    assert UNetConfig.from_original(interp) == INTERPOLATION_UNET


# ------------------------------------------------------------------------ (b) injected layers
def _counting_ops():
    created, called = {}, {}

    def counted(base):
        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            created[base.__name__] = created.get(base.__name__, 0) + 1

        def forward(self, *args, **kwargs):
            called[id(self)] = called.get(id(self), 0) + 1
            return base.forward(self, *args, **kwargs)

        return type(f"Counted{base.__name__}", (base,), {"__init__": __init__, "forward": forward})

    ops = SimpleNamespace(**{k: counted(v) for k, v in vars(TORCH_OPS).items()})
    return ops, created, called


def test_injected_operations_build_and_run_every_layer():
    ops, created, called = _counting_ops()
    net = VideoUNet(TINY, operations=ops)
    layer_types = tuple(vars(TORCH_OPS).values())
    layers = [m for m in net.modules() if isinstance(m, layer_types)]
    injected = tuple(vars(ops).values())
    plain = [type(m).__name__ for m in layers if not isinstance(m, injected)]
    assert plain == [], f"layers built without the operations namespace: {plain}"
    assert sum(created.values()) == len(layers)
    assert {"Linear", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"} <= set(created)
    # every parameter lives in an injected layer, except the blend factors
    owned = {id(p) for m in layers for p in m.parameters()}
    loose = [k for k, p in net.named_parameters() if id(p) not in owned]
    assert loose and all(k.endswith("mix_factor") for k in loose)
    x, t, ctx, y = _inputs(TINY)
    with torch.no_grad():
        net(x, t, ctx, y=y)
    unused = [type(m).__name__ for m in layers if id(m) not in called]
    assert unused == [], f"injected layers never called in forward: {unused}"


def test_dtype_and_device_reach_every_layer():
    net = VideoUNet(TINY, dtype=torch.bfloat16, device="meta")
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in net.parameters()} == {"meta"}


# ------------------------------------------------------------------------------ (c) dtypes
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_reduced_precision_forward_close_to_float32(dtype, tol):
    ref = _randomise(VideoUNet(TINY)).eval()
    low = VideoUNet(TINY, dtype=dtype)
    low.load_state_dict(ref.state_dict())
    x, t, ctx, y = _inputs(TINY)
    with torch.no_grad():
        want = ref(x, t, ctx, y=y)
        got = low(x.to(dtype), t, ctx.to(dtype), y=y.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    rel = (got.float() - want).norm() / want.norm()
    assert rel < tol, f"{dtype}: relative error {rel:.4f}"


# ------------------------------------------------------------------------ routing properties
def test_videos_are_independent_and_context_is_routed_per_video():
    """Nothing mixes videos (spec 5.5); each video's rows see only that video's tokens."""
    net = _randomise(VideoUNet(TINY)).eval()
    x, t, ctx, y = _inputs(TINY, videos=2)
    n = TINY.num_frames
    with torch.no_grad():
        both = net(x, t, ctx, y=y)
        first = net(x[:n], t[:n], ctx[:1], y=y[:n])
        second = net(x[n:], t[n:], ctx[1:], y=y[n:])
        torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-4, atol=1e-5)
        changed = ctx.clone()
        changed[1, 5] += 1.0
        out = net(x, t, changed, y=y)
    assert torch.equal(out[:n], both[:n])
    assert (out[n:] - both[n:]).abs().amax() > 1e-3


def test_label_emb_gets_y_then_the_frames_own_token():
    net = VideoUNet(TINY).eval()
    x, t, ctx, y = _inputs(TINY, videos=2)
    seen = []
    net.label_emb.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        net(x, t, ctx, y=y)
    (vec,) = seen
    n = TINY.num_frames
    assert vec.shape == (2 * n, TINY.label_emb_in)
    assert torch.equal(vec[:, : TINY.adm_in_channels], y)
    for row in (0, 3, n + 5):
        assert torch.equal(vec[row, TINY.adm_in_channels:], ctx[row // n, row % n])


@pytest.mark.parametrize("cfg,hw", [
    # non-square latent, heads from num_heads, depth 2, attention at every level, 3 levels
    (dataclasses.replace(TINY, channel_mult=(1, 1, 2), num_heads=2, num_head_channels=-1,
                         transformer_depth=2, attention_resolutions=(1, 2, 4)), (4, 8)),
    # interpolation variant: no y; per-level depths, middle depth, a different context width
    (dataclasses.replace(TINY, in_channels=9, adm_in_channels=0, context_dim=48, audio_dim=48,
                         transformer_depth=(1, 2), transformer_depth_middle=3), (8, 4)),
    # odd latent size (the skip sizes drive the upsampling)
    (dataclasses.replace(TINY, channel_mult=(1, 2, 2), attention_resolutions=(4,)), (10, 6)),
])
def test_variants_run(cfg, hw):
    net = VideoUNet(cfg).eval()
    x, t, ctx, y = _inputs(cfg, videos=2, hw=hw)
    with torch.no_grad():
        out = net(x, t, ctx, y=y)
    assert out.shape == (x.shape[0], cfg.out_channels, *hw)
    assert torch.isfinite(out).all()


def test_forward_rejects_bad_shapes():
    net = VideoUNet(TINY)
    x, t, ctx, y = _inputs(TINY)
    with pytest.raises(ValueError, match="context"):
        net(x, t, ctx[:, :7], y=y)
    with pytest.raises(ValueError, match="y must be"):
        net(x, t, ctx, y=None)
    with pytest.raises(ValueError, match="multiple"):
        net(x[:13], t[:13], ctx, y=y[:13])


# ------------------------------------------------------------------------ (d) from_original
def test_from_original_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError) as err:
        UNetConfig.from_original(dict(RELEASED_PARAMS, audio_stack_depth=2, zz_extra=True))
    assert "audio_stack_depth" in str(err.value) and "zz_extra" in str(err.value)


@pytest.mark.parametrize("key,value", [
    ("merge_strategy", "fixed"),
    ("audio_cond_method", "to_time_emb"),
    ("use_linear_in_transformer", False),
    ("additional_audio_frames", 1),
    ("use_spatial_context", False),
    ("fine_tuning_method", "adapter"),
])
def test_from_original_rejects_unsupported_values(key, value):
    with pytest.raises(ValueError) as err:
        UNetConfig.from_original(dict(RELEASED_PARAMS, **{key: value}))
    assert key in str(err.value) and repr(value) in str(err.value)


def test_from_original_accepts_inert_keys_and_normalises_lists():
    params = dict(RELEASED_PARAMS, use_checkpoint=False, spatial_transformer_attn_type="softmax",
                  unfreeze_blocks=["input", "label_emb"], dropout=0.0, num_heads_upsample=-1)
    cfg = UNetConfig.from_original(params)
    assert cfg.channel_mult == (1, 2, 4, 4) and cfg.attention_resolutions == (4, 2, 1)
    assert cfg.video_kernel_size == (3, 1, 1)
    hash(cfg)  # frozen and hashable
    with pytest.raises(ValueError, match="in_channels"):
        UNetConfig.from_original({k: v for k, v in RELEASED_PARAMS.items() if k != "in_channels"})


def test_from_original_uses_the_original_defaults_for_missing_keys():
    without = {k: v for k, v in RELEASED_PARAMS.items() if k != "merge_strategy"}
    with pytest.raises(ValueError, match=r"merge_strategy='fixed' \(the original default\)"):
        UNetConfig.from_original(without)
    cfg = UNetConfig.from_original({k: v for k, v in RELEASED_PARAMS.items() if k != "video_kernel_size"})
    assert cfg.video_kernel_size == (3, 3, 3)  # the original's default kernel 3
