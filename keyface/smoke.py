"""Tiny random-weight KeyFace models in the RELEASED file formats, for smoke tests and demos.

``write_smoke_models(folder, seed=0)`` writes every file a models folder needs
(:mod:`keyface.model_files` names), built with the library's own classes at tiny sizes:

* ``keyframe.pt`` / ``interpolation.pt``: DeepSpeed engine files ``{"module": {...}}`` with the
  ``_forward_module.`` prefix: ``model.diffusion_model.*``, the audio projection
  ``conditioner.embedders.{3|1}.linear.*``, ``model.learned_mask`` (interpolation) and the VAE decoder
  ``first_stage_model.decoder.*`` (as the released engines carry it).
* ``interpolation_bad.pt``: the autoguidance network, same layout.
* ``svd_vae.safetensors``: SVD first-stage layout (``encoder.*`` + ``decoder.*``).
* ``WavLM-Base+.pt`` / ``BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt``: unilm pickles
  ``{"cfg": {...}, "model": {...}}`` with unilm key names.
* ``wav2vec2-base-960h/``: a Hugging Face folder (``config.json`` + ``model.safetensors`` of a
  ``Wav2Vec2ForCTC``, ``wav2vec2.*`` + ``lm_head.*``).
* sidecar configs ``keyframe.json``, ``interpolation.json``, ``interpolation_bad.json`` in the original
  config format (``network_config`` / ``conditioner_config`` / ``network_wrapper``), plus ``resolution``.

Sizes: latents 8x8 (64x64 px video), UNet 32 channels on two levels, one res block per level, audio encoders of
hidden size 32 with the real convolution kernels and strides (so the 25 fps alignment is the real one).
A 3 s clip renders on a laptop CPU in seconds. The weights are random: **the video is noise**.

Run ``python -m keyface.smoke FOLDER`` to write them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from . import model_files as mf
from .planner import WINDOW
from .engine_config import INTERPOLATION_AUDIO_EMBEDDER, KEYFRAME_AUDIO_EMBEDDER, MASK_KEY, UNET_PREFIX
from .networks import InterpolationNetwork, KeyframeNetwork

RESOLUTION = 64  # pixels; latent 8x8
HIDDEN = 32  # every audio encoder's hidden size
FEATURE_DIM = 2 * HIDDEN  # [WavLM|BEATs] or [wav2vec2|BEATs]
CONTEXT_DIM = 32  # audio token width = UNet context_dim (1024 released)

UNET_PARAMS = {
    "model_channels": 32,
    "out_channels": 4,
    "channel_mult": [1, 1],
    "num_res_blocks": 1,
    "attention_resolutions": [2],
    "num_head_channels": 16,
    "transformer_depth": 1,
    "context_dim": CONTEXT_DIM,
    "audio_dim": CONTEXT_DIM,
    "num_frames": WINDOW,
    "video_kernel_size": [3, 1, 1],
    # the released architecture switches (the original VideoUNet's defaults differ)
    "num_classes": "sequential",
    "use_linear_in_transformer": True,
    "use_spatial_context": True,
    "merge_strategy": "learned_with_images",
    "audio_cond_method": "both_keyframes",
    "spatial_transformer_attn_type": "softmax-xformers",
    "extra_ff_mix_layer": True,
}
KEYFRAME_PARAMS = dict(UNET_PARAMS, in_channels=8, adm_in_channels=512)
INTERPOLATION_PARAMS = dict(UNET_PARAMS, in_channels=9, adm_in_channels=0)

VAE_PARAMS = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 4}

WAVLM_CFG = {
    "extractor_mode": "default",
    "encoder_layers": 1,
    "encoder_embed_dim": HIDDEN,
    "encoder_ffn_embed_dim": 2 * HIDDEN,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
    "conv_bias": False,
    "normalize": False,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 128,
    "gru_rel_pos": True,
}

BEATS_CFG = {
    "input_patch_size": 16,
    "embed_dim": 16,
    "conv_bias": False,
    "encoder_layers": 1,
    "encoder_embed_dim": HIDDEN,
    "encoder_ffn_embed_dim": 2 * HIDDEN,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 128,
    "gru_rel_pos": True,
    "finetuned_model": True,
    "predictor_class": 527,
}

WAV2VEC2_CONFIG = {
    "model_type": "wav2vec2",
    "architectures": ["Wav2Vec2ForCTC"],
    "hidden_size": HIDDEN,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 2 * HIDDEN,
    "hidden_act": "gelu",
    "feat_extract_norm": "group",
    "feat_extract_activation": "gelu",
    "conv_dim": [32] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "do_stable_layer_norm": False,
    "vocab_size": 32,
    "layer_norm_eps": 1e-5,
    "apply_spec_augment": True,
    "mask_time_prob": 0.05,
}


def _emb_models(audio_index: int) -> list:
    """An original-style conditioner emb_models list with the audio embedder at ``audio_index``."""
    others = ["cond_frames_without_noise", "cond_frames", "valence", "arousal"]
    out = []
    for i in range(max(audio_index + 1, 2)):
        if i == audio_index:
            out.append({"input_key": "audio_emb", "params": {"audio_dim": FEATURE_DIM, "linear_dim": CONTEXT_DIM}})
        else:
            out.append({"input_key": others[i % len(others)]})
    return out


def sidecar_configs() -> dict:
    """The sidecar config dict of each engine file (original format + ``resolution``)."""

    def interpolation():  # the bad network has the good one's architecture
        return {
            "network_config": {"params": dict(INTERPOLATION_PARAMS)},
            "conditioner_config": {"params": {"emb_models": _emb_models(INTERPOLATION_AUDIO_EMBEDDER)}},
            "network_wrapper": {"params": {"im_size": [RESOLUTION, RESOLUTION], "n_channels": 4}},
            "resolution": RESOLUTION,
        }

    return {
        mf.KEYFRAME: {
            "network_config": {"params": dict(KEYFRAME_PARAMS)},
            "conditioner_config": {"params": {"emb_models": _emb_models(KEYFRAME_AUDIO_EMBEDDER)}},
            "resolution": RESOLUTION,
        },
        mf.INTERPOLATION: interpolation(),
        mf.INTERPOLATION_BAD: interpolation(),
    }


def _randomize(module: torch.nn.Module, gen: torch.Generator, scale: float = 1.0):
    """Deterministic (generator-driven) random weights: every parameter non-trivial and small
    enough that a tiny network stays finite through sampling."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            elif p.ndim == 1 and ("norm" in name or name.endswith("layer_norm.weight")):
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(noise * (scale / fan_in ** 0.5))
    return module


def _deepspeed(sd: dict) -> dict:
    """A DeepSpeed ``mp_rank_00_model_states.pt`` dict: ``module`` with ``_forward_module.`` keys."""
    module = {"_forward_module." + k: v.detach().clone().contiguous() for k, v in sd.items()}
    return {"module": module, "buffer_names": [], "optimizer": None, "global_steps": 0, "dp_world_size": 1,
            "mp_world_size": 1, "ds_version": "0.14.0"}


def _unet_config(params):
    from .config import UNetConfig

    return UNetConfig.from_original(dict(params))


def _decoder_sd(vae) -> dict:
    return {"first_stage_model.decoder." + k: v for k, v in vae.decoder.state_dict().items()}


def build_vae(gen):
    from .vae import VAE, DecoderConfig, EncoderConfig

    vae = VAE(DecoderConfig(**VAE_PARAMS), EncoderConfig(**VAE_PARAMS))
    return _randomize(vae, gen)


def engine_state_dict(net, audio_embedder: int) -> dict:
    """An engine network's tensors under the released engine-file keys (the inverse of
    :mod:`keyface.loading`' loaders): the UNet body, the learned mask (interpolation) and the audio
    projection as ``conditioner.embedders.<audio_embedder>.*`` (absent on a bad network without one)."""
    sd = {UNET_PREFIX + k: v for k, v in net.diffusion_model.state_dict().items()}
    mask = getattr(net, "learned_mask", None)
    if mask is not None:
        sd[MASK_KEY] = mask.detach().clone()
    if net.audio_projection is not None:
        prefix = f"conditioner.embedders.{audio_embedder}."
        sd.update({prefix + k: v for k, v in net.audio_projection.state_dict().items()})
    return sd


def build_keyframe_sd(gen) -> dict:
    net = _randomize(KeyframeNetwork(_unet_config(KEYFRAME_PARAMS), FEATURE_DIM), gen)
    return engine_state_dict(net, KEYFRAME_AUDIO_EMBEDDER)


def build_interpolation_sd(gen) -> dict:
    hw = (RESOLUTION // 8, RESOLUTION // 8)
    net = _randomize(InterpolationNetwork(_unet_config(INTERPOLATION_PARAMS), hw, 4, FEATURE_DIM), gen)
    return engine_state_dict(net, INTERPOLATION_AUDIO_EMBEDDER)


# HF WavLMModel key -> unilm key (inverse of keyface.audio.wavlm's rules)
_WAVLM_TO_UNILM = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", r"feature_extractor.conv_layers.\1.0.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)", r"feature_extractor.conv_layers.\1.2.\2"),
    (r"feature_projection\.layer_norm\.(weight|bias)", r"layer_norm.\1"),
    (r"feature_projection\.projection\.(weight|bias)", r"post_extract_proj.\1"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", r"encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", r"encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv_embed\.conv\.(weight_g|weight_v|bias)", r"encoder.pos_conv.0.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", r"encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.weight", r"encoder.layers.\1.self_attn.relative_attention_bias.weight"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.(weight|bias)", r"encoder.layers.\1.self_attn.grep_linear.\2"),
    (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
    (r"encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(weight|bias)", r"encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(weight|bias)", r"encoder.layers.\1.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"masked_spec_embed", r"mask_emb"),
]
_WAVLM_TO_UNILM = [(re.compile(p + "$"), r) for p, r in _WAVLM_TO_UNILM]


def build_wavlm_unilm(gen) -> dict:
    from transformers import WavLMModel

    from .audio.wavlm import wavlm_config_from_unilm

    model = _randomize(WavLMModel(wavlm_config_from_unilm(WAVLM_CFG)), gen)
    out = {}
    for k, v in model.state_dict().items():
        for pat, repl in _WAVLM_TO_UNILM:
            if pat.match(k):
                out[pat.sub(repl, k)] = v.detach().clone().contiguous()
                break
        else:
            raise KeyError(f"smoke WavLM: no unilm name for {k}")
    cfg = dict(WAVLM_CFG, mask_prob=0.65)
    return {"cfg": cfg, "model": out}


def build_beats_unilm(gen) -> dict:
    from .audio.beats import BEATs, BEATsConfig

    cfg = BEATsConfig.from_cfg(BEATS_CFG)
    model = _randomize(BEATs(cfg), gen)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # the fine-tuned release carries its AudioSet head; KeyFace ignores it
    sd["predictor.weight"] = torch.randn(BEATS_CFG["predictor_class"], HIDDEN, generator=gen) * 0.02
    sd["predictor.bias"] = torch.zeros(BEATS_CFG["predictor_class"])
    return {"cfg": dict(BEATS_CFG), "model": sd}


def build_wav2vec2_hf(gen) -> tuple[dict, dict]:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    model = _randomize(Wav2Vec2ForCTC(Wav2Vec2Config.from_dict(dict(WAV2VEC2_CONFIG))), gen)
    sd = {}
    for k, v in model.state_dict().items():
        # store the weight-norm pair as the hub files do (weight_g / weight_v)
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v")
        sd[k] = v.detach().clone().contiguous()
    return dict(WAV2VEC2_CONFIG), sd


def write_smoke_models(folder, seed: int = 0) -> dict:
    """Write the tiny models into ``folder`` (created if needed); returns ``find_models(folder)``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(int(seed))
    names = mf.DEFAULT_NAMES
    cfgs = sidecar_configs()

    vae = build_vae(gen)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / names[mf.VAE]),
              metadata={"format": "pt", "keyface_smoke": "1"})
    decoder = _decoder_sd(vae)

    # the bad (autoguidance) network has the interpolation layout; its weights are the next draws of gen
    for kind, build in ((mf.KEYFRAME, build_keyframe_sd), (mf.INTERPOLATION, build_interpolation_sd),
                        (mf.INTERPOLATION_BAD, build_interpolation_sd)):
        sd = build(gen)
        sd.update(decoder)  # the released engine files carry the VAE decoder too
        torch.save(_deepspeed(sd), folder / names[kind])
        mf.write_sidecar(folder / names[kind], cfgs[kind])

    torch.save(build_wavlm_unilm(gen), folder / names[mf.WAVLM])
    torch.save(build_beats_unilm(gen), folder / names[mf.BEATS])

    w2v_dir = folder / names[mf.WAV2VEC2]
    w2v_dir.mkdir(exist_ok=True)
    cfg, sd = build_wav2vec2_hf(gen)
    (w2v_dir / "config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    save_file(sd, str(w2v_dir / "model.safetensors"), metadata={"format": "pt"})

    (folder / "SMOKE_MODELS_ARE_RANDOM_NOISE.txt").write_text(
        "These KeyFace models are tiny random-weight stand-ins written by keyface.smoke.write_smoke_models.\n"
        "They exercise the whole pipeline in the released file formats; their output is noise.\n",
        encoding="utf-8")
    return mf.find_models(folder)


def is_smoke_folder(folder) -> bool:
    return (Path(folder) / "SMOKE_MODELS_ARE_RANDOM_NOISE.txt").is_file()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m keyface.smoke FOLDER [SEED]")
        return 2
    found = write_smoke_models(argv[0], int(argv[1]) if len(argv) > 1 else 0)
    for k, p in found.items():
        print(f"{k:18s} {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
