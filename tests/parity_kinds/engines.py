"""Parity runners for the engine-level kinds: conditioner, denoiser, sigmas, sample_keyframes,
sample_interpolation. Everything is read from ``case["config"]``; files go through the library loaders.
"""

import torch

from keyface import conditioning, diffusion, engines

from . import case_file, case_inputs, register


def _guider_params(config):
    return ((config.get("sampler_config") or {}).get("params") or {}).get("guider_config", {}).get("params") or {}


def _num_steps(config):
    if "num_steps" in config:
        return int(config["num_steps"])
    return int(((config.get("sampler_config") or {}).get("params") or {}).get("num_steps", 10))


def _param(config, key, default):
    if key in config:
        return float(config[key])
    return float(_guider_params(config).get(key, default))


def _scale_factor(config):
    return float(config.get("scale_factor", conditioning.SCALE_FACTOR))


@register("conditioner")
def run_conditioner(case, folder):
    cfg = case["config"]
    inp = case_inputs(case, folder)
    proj = engines.load_audio_projection(case_file(case, folder, "checkpoint"), cfg["engine"], config=cfg)
    sf = _scale_factor(cfg)
    if cfg["engine"] == "keyframe":
        c, uc = conditioning.keyframe_conditioning(
            inp["cond_frames"], inp["valence"], inp["arousal"], inp["audio_emb"], proj, scale_factor=sf
        )
        out = {f"c_{k}": v for k, v in c.items()}
        out.update({f"uc_{k}": v for k, v in uc.items()})
        return out
    c = conditioning.interpolation_conditioning(inp["cond_frames"], inp["audio_emb"], proj, scale_factor=sf)
    return {f"c_{k}": v for k, v in c.items()}


@register("denoiser")
def run_denoiser(case, folder):
    cfg = case["config"]
    inp = case_inputs(case, folder)
    if cfg["engine"] == "keyframe":
        net = engines.load_keyframe_network(case_file(case, folder, "checkpoint"), config=cfg)
        d = net.denoise(inp["x"], inp["sigma"], concat=inp["concat"], crossattn=inp["crossattn"], vector=inp["vector"])
        return {"denoised": d}
    good, bad = engines.load_interpolation_networks(
        case_file(case, folder, "checkpoint"), case_file(case, folder, "bad_checkpoint"), config=cfg
    )
    cond = {"concat": inp["concat"], "crossattn": inp["crossattn"]}
    per_call = int(cfg.get("chunk_size", 2))
    # each network alone (autoguidance off), evaluated per_call segments at a time as the reference does
    return {
        name: diffusion.interpolation_denoiser(net, None, cond, segments_per_call=per_call, autoguidance=False)(
            inp["x"], inp["sigma"])
        for name, net in (("denoised_bad", bad), ("denoised_good", good))
    }


@register("sigmas")
def run_sigmas(case, folder):
    inp = case_inputs(case, folder)
    return {f"sigmas_{int(n)}": diffusion.ays_sigmas(int(n)) for n in inp["num_steps"].tolist()}


def _run_sampler(denoise, noise, steps):
    trajectory = []
    latents = diffusion.sample_euler(
        denoise, noise, diffusion.ays_sigmas(steps), callback=lambda i, n, x, d: trajectory.append(x.clone())
    )
    return {"latents": latents, "trajectory": torch.stack(trajectory)}


@register("sample_keyframes")
def run_sample_keyframes(case, folder):
    cfg = case["config"]
    inp = case_inputs(case, folder)
    net = engines.load_keyframe_network(case_file(case, folder, "checkpoint"), config=cfg)
    c, uc = conditioning.keyframe_conditioning(
        inp["cond_frames"], inp["valence"], inp["arousal"], inp["audio_emb"], net.audio_projection,
        scale_factor=_scale_factor(cfg),
    )
    denoise = diffusion.keyframe_denoiser(
        net, c, uc, ref_ratio=_param(cfg, "ref_ratio", 2.0), audio_ratio=_param(cfg, "audio_ratio", 5.0)
    )
    return _run_sampler(denoise, inp["noise"], _num_steps(cfg))


@register("sample_interpolation")
def run_sample_interpolation(case, folder):
    cfg = case["config"]
    inp = case_inputs(case, folder)
    good, bad = engines.load_interpolation_networks(
        case_file(case, folder, "checkpoint"), case_file(case, folder, "bad_checkpoint"), config=cfg
    )
    c = conditioning.interpolation_conditioning(
        inp["cond_frames"], inp["audio_emb"], good.audio_projection, scale_factor=_scale_factor(cfg)
    )
    denoise = diffusion.interpolation_denoiser(
        good, bad, c, scale=_param(cfg, "scale", 2.0), segments_per_call=int(cfg.get("chunk_size", 2))
    )
    return _run_sampler(denoise, inp["noise"], _num_steps(cfg))
