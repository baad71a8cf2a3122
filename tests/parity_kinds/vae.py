"""Parity runners for the SVD first stage: ``vae_decode`` and ``vae_encode`` (KINDS.md).

Every size comes from ``case["config"]["first_stage_config"]``; nothing is hard-coded.
"""

import torch

from keyface.vae import configs_from_first_stage, load_vae

from . import case_file, case_inputs, register


def _load(case, folder):
    cfg = case["config"]
    enc_cfg, dec_cfg = configs_from_first_stage(cfg["first_stage_config"])
    return load_vae(
        case_file(case, folder, "checkpoint"),
        decoder_config=dec_cfg,
        encoder_config=enc_cfg,
        scale_factor=cfg.get("scale_factor"),
    )


@register("vae_decode")
def run_vae_decode(case, folder):
    vae = _load(case, folder)
    z = case_inputs(case, folder)["z"]
    with torch.no_grad():
        return {
            "x_per_frame": vae.decode(z, frames_per_video=1),
            "x_all_frames": vae.decode(z, frames_per_video=z.shape[0]),
        }


@register("vae_encode")
def run_vae_encode(case, folder):
    vae = _load(case, folder)
    pixels = case_inputs(case, folder)["pixels"]
    with torch.no_grad():
        moments = vae.encode_moments(pixels)
        mean = torch.chunk(moments, 2, dim=1)[0]
        return {
            "moments": moments,
            "z": vae.encode(pixels),
            # the unscaled mean through this file's decoder, one frame per call (timesteps = 1)
            "x_decoded_per_frame": vae.decoder(mean, timesteps=1),
        }
