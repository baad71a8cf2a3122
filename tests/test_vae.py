"""SVD first stage (keyface/vae.py): architecture, layouts, decode modes.

Numerical parity with the original is in test_parity.py (kinds vae_decode / vae_encode); this file
checks the full-size key layout on ``meta``, the diffusers layout against outputs diffusers computed
(fixtures/vae_layouts, made by tests/tools/make_vae_layout_fixtures.py), and the loader's bookkeeping.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from keyface.checkpoints import CheckpointError
from keyface.vae import (
    SVD_DECODER,
    SVD_ENCODER,
    VAE,
    DecoderConfig,
    EncoderConfig,
    Encoder,
    VideoDecoder,
    configs_from_first_stage,
    convert_diffusers_vae,
    load_vae,
)

FIXTURES = Path(__file__).parent / "fixtures"
KEYS = FIXTURES / "keys"
PARITY = FIXTURES / "parity"
LAYOUTS = FIXTURES / "vae_layouts"


def _key_list(path, prefix):
    out = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        if key.startswith(prefix):
            out[key[len(prefix):]] = tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]")))
    return out


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_vae():
    return load_vae(PARITY / "vae.safetensors")


# -- full-size architecture on meta ------------------------------------------------------------------


def test_full_decoder_matches_reference_keys():
    want = _key_list(KEYS / "keyframe_first_stage.txt", "first_stage_model.decoder.")
    dec = VideoDecoder(SVD_DECODER, device="meta")
    assert _shapes(dec) == want
    assert len(want) == 266
    assert sum(p.numel() for p in dec.parameters()) == 63_579_183
    assert sum(1 for k in want if k.endswith("mix_factor")) == 14


def test_full_encoder_matches_reference_keys():
    want = _key_list(KEYS / "first_stage_full_with_encoder.txt", "first_stage_model.encoder.")
    enc = Encoder(SVD_ENCODER, device="meta")
    assert _shapes(enc) == want
    assert sum(p.numel() for p in enc.parameters()) == 34_163_592
    # the whole first stage = the full AutoencodingEngine list (372 tensors, no quant_conv)
    full = _key_list(KEYS / "first_stage_full_with_encoder.txt", "first_stage_model.")
    vae = VAE(SVD_DECODER, SVD_ENCODER, device="meta")
    assert _shapes(vae) == full and len(full) == 372
    assert sum(p.numel() for p in vae.parameters()) == 97_742_775


def test_config_from_original():
    manifest = json.loads((PARITY / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["kind"] == "vae_encode")
    enc, dec = configs_from_first_stage(case["config"]["first_stage_config"])
    p = case["config"]["first_stage_config"]["params"]["decoder_config"]["params"]
    assert dec.ch == p["ch"] and dec.ch_mult == tuple(p["ch_mult"]) and dec.video_kernel_size == (3, 1, 1)
    assert enc.num_res_blocks == p["num_res_blocks"] and enc.double_z
    assert EncoderConfig() == SVD_ENCODER and SVD_DECODER.ch_mult == (1, 2, 4, 4) and SVD_DECODER.z_channels == 4
    with pytest.raises(ValueError, match="bogus"):
        DecoderConfig.from_original({**p, "bogus": 1})
    with pytest.raises(ValueError, match="attn_type"):
        EncoderConfig.from_original({"attn_type": "linear"})


# -- decode modes --------------------------------------------------------------------------------------


def test_batched_per_frame_equals_single_frame_loop(tiny_vae):
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.18215
    with torch.no_grad():
        batched = tiny_vae.decode(z, frames_per_video=1)
        loop = torch.cat([tiny_vae.decode(z[i : i + 1], frames_per_video=1) for i in range(z.shape[0])])
    assert batched.shape == (5, 3, 32, 32)
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)


def test_frames_per_video(tiny_vae):
    z = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.18215
    with torch.no_grad():
        per_frame = tiny_vae.decode(z)
        videos = tiny_vae.decode(z, frames_per_video=6)
        halves = tiny_vae.decode(z, frames_per_video=3)
        first_half = tiny_vae.decode(z[:3], frames_per_video=3)
    assert (per_frame - videos).abs().max() > 1e-2  # the temporal convs see their neighbours
    torch.testing.assert_close(halves[:3], first_half, rtol=1e-5, atol=1e-5)  # videos are independent
    for bad in (4, 0):
        with pytest.raises(ValueError, match="frames_per_video"):
            tiny_vae.decode(z, frames_per_video=bad)
    with pytest.raises(ValueError, match="latents"):
        tiny_vae.decode(z[0])


def test_encode_mean_and_seeded_sample(tiny_vae):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny_vae.encode_moments(pixels).chunk(2, dim=1)
        z = tiny_vae.encode(pixels)
        s1 = tiny_vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(7))
        s2 = tiny_vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, mean * 0.18215)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * 0.18215)
    assert (s1 - z).abs().max() > 1e-3


# -- layouts -------------------------------------------------------------------------------------------


def test_diffusers_layout_matches_diffusers_outputs():
    """fp16 diffusers file -> our VAE; outputs equal those diffusers computed (generator in tests/tools)."""
    path = LAYOUTS / "diffusers_temporal_tiny.fp16.safetensors"
    raw = load_file(str(path))
    converted = convert_diffusers_vae(raw)
    assert len(converted) == len(raw)
    vae = load_vae(path)
    assert vae.quant_conv is not None and vae.encoder is not None
    assert set(converted) == set(vae.state_dict())
    assert vae.decoder.config.ch_mult == (1, 2) and vae.decoder.config.num_res_blocks == 2

    want = load_file(str(LAYOUTS / "diffusers_temporal_tiny.expected.safetensors"))
    tol = dict(rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        mean, logvar = vae.encode_moments(want["pixels"]).chunk(2, dim=1)
        torch.testing.assert_close(mean, want["latent_mean"], **tol)
        torch.testing.assert_close(logvar, want["latent_logvar"], **tol)
        torch.testing.assert_close(vae.encode(want["pixels"]), want["latent_mean"] * vae.scale_factor, **tol)
        gen = torch.Generator().manual_seed(1234)
        torch.testing.assert_close(vae.encode(want["pixels"], sample=True, generator=gen) / vae.scale_factor, want["latent_sample"], **tol)
        for n in (1, 2, 4):
            torch.testing.assert_close(vae.decode(want["latents"], frames_per_video=n), want[f"decoded_f{n}"], **tol)


def test_diffusers_unknown_key_is_named():
    raw = load_file(str(LAYOUTS / "diffusers_temporal_tiny.fp16.safetensors"))
    raw["decoder.mid_block.resnets.2.spatial_res_block.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"resnets\.2\.spatial_res_block\.conv1\.weight"):
        load_vae(raw)


def test_leftover_key_raises(tiny_vae):
    sd = dict(tiny_vae.state_dict())
    sd["decoder.extra_layer.weight"] = torch.zeros(3)
    sd["loss.logvar"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_vae(sd)
    assert "decoder.extra_layer.weight" in str(err.value) and "loss.logvar" in str(err.value)


def test_shape_mismatch_with_explicit_config():
    with pytest.raises(CheckpointError, match="shape mismatch|missing"):
        load_vae(PARITY / "vae.safetensors", decoder_config=DecoderConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1))


def test_full_checkpoint_prefix(tiny_vae):
    sd = {f"first_stage_model.{k}": v for k, v in tiny_vae.state_dict().items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 8, 3, 3)
    sd["conditioner.embedders.0.open_clip.x"] = torch.zeros(2)
    sd["denoiser.sigmas"] = torch.zeros(2)
    vae = load_vae(sd)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), tiny_vae.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(vae.encode(pixels), tiny_vae.encode(pixels), rtol=0, atol=0)


def test_engine_file_is_decoder_only():
    vae = load_vae(PARITY / "keyframe_engine.pt")
    assert vae.encoder is None
    with torch.no_grad():
        assert vae.decode(torch.zeros(2, 4, 4, 4)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="encoder"):
        vae.encode(torch.zeros(1, 3, 32, 32))


def test_operations_are_injected():
    used = []

    class Conv3d(nn.Conv3d):
        def forward(self, x):
            used.append(x.shape)
            return super().forward(x)

    vae = VAE(DecoderConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1), operations=SimpleNamespace(Conv3d=Conv3d))
    assert isinstance(vae.decoder.conv_out.time_mix_conv, Conv3d)
    assert isinstance(vae.decoder.conv_in, nn.Conv2d)  # missing classes fall back to torch
    with torch.no_grad():
        vae.decode(torch.zeros(2, 4, 4, 4))
    assert len(used) == 2 * 6 + 1  # 6 VideoResBlocks (mid 2, 2 levels x 2) x 2 temporal convs + time_mix_conv


def test_level_attention_roundtrip_and_inference():
    """attn_resolutions place AttnBlocks per level as the original (curr_res rule); shapes-only loading
    finds the same levels."""
    torch.manual_seed(0)
    dec_cfg = DecoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)
    enc_cfg = EncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=32)
    vae = VAE(dec_cfg, enc_cfg)
    keys = set(vae.state_dict())
    assert "decoder.up.1.attn.1.q.weight" in keys and not any(k.startswith("decoder.up.0.attn.") for k in keys)
    assert "encoder.down.0.attn.0.q.weight" in keys and not any(k.startswith("encoder.down.1.attn.") for k in keys)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    again = load_vae(vae.state_dict())
    assert set(again.state_dict()) == keys
    z = torch.randn(3, 4, 4, 4)
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z), vae.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(again.encode(pixels), vae.encode(pixels), rtol=0, atol=0)
