"""Full-size networks on the ``meta`` device reproduce the released key layout and parameter counts
(spec 6.3, 6.4; key lists in tests/fixtures/keys/)."""

from pathlib import Path

import pytest
import torch

from keyface.engines import build_interpolation_network, build_keyframe_network

KEYS = Path(__file__).parent / "fixtures" / "keys"


def _read_keys(name):
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def _shapes(module, prefix=""):
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _assert_same_layout(got: dict, want: dict):
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    assert not missing and not extra and not wrong, (
        f"missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)}), wrong shapes {wrong[:5]}"
    )


@pytest.fixture(scope="module")
def keyframe_net():
    return build_keyframe_network(device="meta")


@pytest.fixture(scope="module")
def interpolation_nets():
    good = build_interpolation_network(device="meta")
    bad = build_interpolation_network(with_audio_projection=False, device="meta")
    return good, bad


def test_keyframe_engine_layout(keyframe_net):
    from keyface.vae import VideoDecoder

    decoder = VideoDecoder(device="meta")
    got = _shapes(keyframe_net.diffusion_model, "model.diffusion_model.")
    got.update(_shapes(keyframe_net.audio_projection, "conditioner.embedders.3."))
    got.update(_shapes(decoder, "first_stage_model.decoder."))
    want = _read_keys("keyframe_engine_full_state_dict.txt")
    _assert_same_layout(got, want)
    assert len(want) == 1696
    # module order mirrors the checkpoint
    unet_want = [k for k in want if k.startswith("model.diffusion_model.")]
    assert [k for k in got if k.startswith("model.diffusion_model.")] == unet_want

    assert _numel(keyframe_net.diffusion_model) == 1_525_606_122
    assert _numel(keyframe_net.audio_projection) == 1_573_888
    assert _numel(decoder) == 63_579_183
    assert _numel(keyframe_net) + _numel(decoder) == 1_590_759_193


def test_interpolation_engine_layout(interpolation_nets):
    good, bad = interpolation_nets
    got = _shapes(good.diffusion_model, "model.diffusion_model.")
    got["model.learned_mask"] = tuple(good.learned_mask.shape)
    _assert_same_layout(got, _read_keys("interpolation_unet.txt"))

    proj_want = {k: v for k, v in _read_keys("interpolation_conditioner.txt").items() if ".linear." in k}
    assert set(proj_want) == {"conditioner.embedders.1.linear.weight", "conditioner.embedders.1.linear.bias"}
    _assert_same_layout(_shapes(good.audio_projection, "conditioner.embedders.1."), proj_want)

    bad_got = _shapes(bad.diffusion_model, "denoiser.bad_network.diffusion_model.")
    bad_got["denoiser.bad_network.learned_mask"] = tuple(bad.learned_mask.shape)
    _assert_same_layout(bad_got, _read_keys("interpolation_bad_network.txt"))
    assert bad.audio_projection is None

    assert _numel(good.diffusion_model) + good.learned_mask.numel() == 1_524_970_026
    assert _numel(bad) == 1_524_970_026
    assert _numel(good.audio_projection) == 1_573_888


def test_first_stage_decoder_layout():
    from keyface.vae import VideoDecoder

    decoder = VideoDecoder(device="meta")
    for name in ("keyframe_first_stage.txt", "interpolation_first_stage.txt"):
        _assert_same_layout(_shapes(decoder, "first_stage_model.decoder."), _read_keys(name))


def test_meta_networks_hold_no_memory(keyframe_net, interpolation_nets):
    for net in (keyframe_net, *interpolation_nets):
        assert all(p.device == torch.device("meta") for p in net.parameters())


def _meta_state_dict(name):
    return {k: torch.empty(shape, device="meta") for k, shape in _read_keys(name).items()}


def test_loaders_account_for_every_released_key():
    """The loaders consume or knowingly ignore every key of released-layout files (on meta)."""
    from keyface import config
    from keyface.engines import load_interpolation_networks, load_keyframe_network

    sd = _meta_state_dict("keyframe_engine_full_state_dict.txt")
    net = load_keyframe_network(sd, device="meta")
    assert net.unet_config == config.KEYFRAME_UNET  # sizes inferred from the shapes = released
    assert net.audio_projection.linear.weight.shape == (1024, 1536)

    # the DiffusionEngine's full interpolation state dict: conditioner VAE encoder ignored, the
    # bad network taken from denoiser.bad_network.*
    full = _meta_state_dict("interpolation_engine_full_state_dict.txt")
    good, bad = load_interpolation_networks(full, device="meta")
    assert good.unet_config == config.INTERPOLATION_UNET
    assert bad is not None and bad.audio_projection is None
    assert tuple(good.learned_mask.shape) == (4, 64, 64)

    # released file pair: engine + interpolation_bad.pt layout (with its ignored own projection)
    engine = {k: v for k, v in full.items() if not k.startswith("denoiser.")}
    bad_file = {"model." + k[len("denoiser.bad_network."):]: v for k, v in full.items() if k.startswith("denoiser.bad_network.")}
    bad_file["conditioner.embedders.1.linear.weight"] = torch.empty(1024, 1536, device="meta")
    bad_file["conditioner.embedders.1.linear.bias"] = torch.empty(1024, device="meta")
    good, bad = load_interpolation_networks(engine, bad_file, device="meta")
    assert bad is not None
