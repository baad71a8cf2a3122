"""Engine configuration: the released architecture overridden by original parameter names (flat or in
the original sections), unknown keys refused, the assumed head size, sidecars and the key ledger."""

import dataclasses
import logging

import pytest
import torch

from keyface import smoke
from keyface.checkpoints import CheckpointError
from keyface.config import INTERPOLATION_UNET, KEYFRAME_UNET
from keyface.engines import (
    BAD_NETWORK_PREFIX,
    build_interpolation_network,
    build_keyframe_network,
    interpolation_network_config,
    keyframe_network_config,
    load_interpolation_networks,
    load_keyframe_network,
)
from keyface.model_files import write_sidecar

# a keyframe UNet of another size whose attention widths (64, 128) the released head size 64 divides
SMALL = {"model_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [1, 2],
         "context_dim": 32, "audio_dim": 32}


def test_flat_original_names_override_the_released_architecture():
    cfg, _, _ = keyframe_network_config(dict(SMALL, num_head_channels=32, transformer_depth=2))
    assert cfg == dataclasses.replace(KEYFRAME_UNET, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_resolutions=(1, 2), context_dim=32, audio_dim=32,
                                      num_head_channels=32, transformer_depth=2)
    net = build_keyframe_network(SMALL, device="meta")
    assert net.diffusion_model.input_blocks[0][0].weight.shape == (64, 8, 3, 3)
    assert sum(p.numel() for p in net.parameters()) < 100_000_000  # not the 1.5B released UNet


@pytest.mark.parametrize("section", [{"model_channels": 64}, {"params": {"model_channels": 64}}])
def test_partial_network_config_merges_onto_released(section):
    kf, _, _ = keyframe_network_config({"network_config": section})
    assert kf == dataclasses.replace(KEYFRAME_UNET, model_channels=64)
    it, *_ = interpolation_network_config({"network_config": section})
    assert it == dataclasses.replace(INTERPOLATION_UNET, model_channels=64)


def test_complete_original_network_config_keeps_the_original_defaults():
    # with a target it is an original YAML: missing switches take the original VideoUNet's defaults,
    # which build another network, so they are refused by name
    with pytest.raises(ValueError, match="num_classes"):
        keyframe_network_config({"network_config": {"target": "sgm.modules.diffusionmodules.video_model.VideoUNet",
                                                     "params": {"model_channels": 64}}})


def test_flat_im_size_sets_the_learned_mask():
    _, _, _, mask_hw, n_ch = interpolation_network_config({"im_size": [256, 320]})
    assert mask_hw == (32, 40) and n_ch == 4
    net = build_interpolation_network({"im_size": [256, 256], "model_channels": 64}, device="meta")
    assert net.learned_mask.shape == (4, 32, 32)
    with pytest.raises(ValueError, match="im_size"):
        interpolation_network_config({"im_size": [100, 100]})
    with pytest.raises(ValueError, match="im_size"):  # the keyframe network has no learned mask
        keyframe_network_config({"im_size": [256, 256]})


@pytest.mark.parametrize("config,bad,hint", [
    ({"modl_channels": 64}, "modl_channels", "model_channels"),
    ({"network_confg": {"params": {"model_channels": 64}}}, "network_confg", "network_config"),
    ({"network_config": {"params": {}}, "conditioner_confg": {}}, "conditioner_confg", "conditioner_config"),
])
def test_unknown_keys_are_refused_by_name(config, bad, hint):
    with pytest.raises(ValueError) as err:
        build_keyframe_network(config, device="meta")
    msg = str(err.value)
    assert repr(bad) in msg and hint in msg


def test_flat_unknown_key_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        keyframe_network_config({"width": 64})
    assert "'width'" in str(err.value) and "num_head_channels" in str(err.value) and "network_config" in str(err.value)


def test_flat_switches_are_validated():
    with pytest.raises(ValueError, match="use_spatial_context"):
        keyframe_network_config({"use_spatial_context": False})
    cfg, _, _ = keyframe_network_config({"use_checkpoint": True, "dropout": 0.1})  # training-only: accepted
    assert cfg == KEYFRAME_UNET


def test_nested_config_ignores_the_originals_other_settings():
    # parity cases and original configs carry sampling settings beside the sections
    cfg, _, _ = keyframe_network_config({"network_config": {"params": {"model_channels": 64}},
                                         "sampler_config": {}, "num_steps": 10, "latent_hw": [8, 8]})
    assert cfg == dataclasses.replace(KEYFRAME_UNET, model_channels=64)


def _small_keyframe_sd(**overrides):
    net = build_keyframe_network(dict(SMALL, **overrides), audio_feature_dim=48)
    return smoke.engine_state_dict(net, 3), net


def test_assumed_head_size_is_logged(caplog):
    sd, ref = _small_keyframe_sd()
    with caplog.at_level(logging.WARNING, logger="keyface.engine_config"):
        net = load_keyframe_network(sd)
    assert net.unet_config == ref.unet_config
    warned = [r.getMessage() for r in caplog.records if r.name == "keyface.engine_config"]
    assert len(warned) == 1 and "num_head_channels=64 was assumed" in warned[0] and "config=" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keyface.engine_config"):
        load_keyframe_network(sd, config={"num_head_channels": 64})  # said, not assumed
    assert not [r for r in caplog.records if r.name == "keyface.engine_config"]


def test_head_size_from_a_partial_config():
    # attention width 32: the released head size 64 cannot be right, and the shapes do not tell
    params = dict(SMALL, model_channels=32, channel_mult=[1, 1], num_head_channels=16)
    net = build_keyframe_network(params, audio_feature_dim=48)
    sd = smoke.engine_state_dict(net, 3)
    with pytest.raises(CheckpointError, match="num_head_channels"):
        load_keyframe_network(sd)
    got = load_keyframe_network(sd, config={"num_head_channels": 16})  # the rest read from the shapes
    assert got.unet_config == net.unet_config


@pytest.mark.parametrize("config", [{"num_heads": 8}, {"network_config": {"params": {"num_heads": 8}}}])
def test_head_count_replaces_the_released_head_size(config):
    """num_heads alone means a head count (the original's num_head_channels=-1), not a setting to drop."""
    cfg, _, _ = keyframe_network_config(config)
    assert (cfg.num_heads, cfg.num_head_channels) == (8, -1)
    # explicit head size still wins over a head count, as in the original
    cfg, _, _ = keyframe_network_config({"num_heads": 8, "num_head_channels": 32})
    assert cfg.num_head_channels == 32


def test_loaders_read_the_sidecar(tmp_path):
    sd, ref = _small_keyframe_sd(num_head_channels=32)
    path = tmp_path / "keyframe.pt"
    torch.save({"module": sd}, path)
    # shapes alone would give the released head size 64; the sidecar says 32
    write_sidecar(path, {"network_config": {"params": {"num_head_channels": 32}}, "resolution": 64})
    assert load_keyframe_network(path).unet_config == ref.unet_config
    assert load_keyframe_network(path, config={}).unet_config.num_head_channels == 64  # an explicit config wins
    # another tool's <model>.json beside the checkpoint: the error names the file and what to do
    (tmp_path / "keyframe.json").write_text('{"sha256": "abc", "preferred_weight": 1}')
    with pytest.raises(ValueError, match=r"sidecar config .*keyframe\.json: .*sha256.*another tool"):
        load_keyframe_network(path)


def _tiny_interpolation(gen_seed):
    params = dict(smoke.INTERPOLATION_PARAMS)
    net = smoke._randomize(build_interpolation_network({"network_config": {"params": params}, "im_size": [64, 64]}),
                           torch.Generator().manual_seed(gen_seed))
    return smoke.engine_state_dict(net, 1), {"network_config": {"params": params}}


def test_embedded_bad_network_is_on_the_ledger():
    good_sd, cfg = _tiny_interpolation(0)
    bad_sd, _ = _tiny_interpolation(1)
    embedded = {BAD_NETWORK_PREFIX + k[len("model."):]: v for k, v in bad_sd.items() if k.startswith("model.")}
    engine = dict(good_sd, **embedded)

    good, bad = load_interpolation_networks(engine, bad_sd, config=cfg)
    assert set(good.ignored_keys) == set(embedded)
    assert all("superseded by bad_source" in why for why in good.ignored_keys.values())
    assert "conditioner.embedders.1.linear.weight" in bad.ignored_keys  # the bad network's own projection

    good2, bad2 = load_interpolation_networks(engine, config=cfg)  # the embedded one is used
    assert set(good2.ignored_keys) == set(embedded)
    assert all("loaded as the bad network" in why for why in good2.ignored_keys.values())
    for a, b in zip(bad.state_dict().values(), bad2.state_dict().values()):
        assert torch.equal(a, b)
