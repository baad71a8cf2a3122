"""Generate tests/fixtures/vae_layouts/: a tiny diffusers ``AutoencoderKLTemporalDecoder`` file + the
outputs diffusers itself computes from it, so tests/test_vae.py checks our key conversion without
needing diffusers in CI.

Run it with a Python that has diffusers (not a test dependency), e.g. a scratch venv:

    python3 -m venv /tmp/dvenv && /tmp/dvenv/bin/pip install diffusers torch==2.11.0 safetensors
    /tmp/dvenv/bin/python tests/tools/make_vae_layout_fixtures.py

Files written:
* ``diffusers_temporal_tiny.fp16.safetensors``: the state dict exactly as diffusers names it, stored in
  float16 like the released ``vae/diffusion_pytorch_model.fp16.safetensors``. Architecture:
  block_out_channels (32, 64), layers_per_block 2 (the SVD depth; diffusers' temporal mid block only
  matches SVD for 2), latent 4. Every parameter is non-trivial (norm affines, biases, mix factors and
  quant_conv are randomised, not left at their init values).
* ``diffusers_temporal_tiny.expected.safetensors``: inputs and diffusers' float32 outputs computed from
  the float16 weights upcast to float32:
  - ``pixels`` [2, 3, 32, 32] in [-1, 1]; ``latent_mean`` / ``latent_logvar`` = ``encode(pixels).latent_dist``
    (after quant_conv); ``latent_sample`` = ``latent_dist.sample(generator=torch.Generator().manual_seed(SAMPLE_SEED))``;
  - ``latents`` [4, 4, 8, 8], scaled (x 0.18215); ``decoded_f1`` / ``decoded_f2`` / ``decoded_f4`` =
    ``decode((1 / 0.18215) * latents, num_frames=n)`` for n = 1, 2, 4.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "vae_layouts"
SAMPLE_SEED = 1234
SCALE = 0.18215


def main():
    import diffusers
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    config = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        layers_per_block=2,
        latent_channels=4,
        sample_size=32,
    )
    model = AutoencoderKLTemporalDecoder(**config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            elif p.ndim == 1 and ("norm" in name):
                p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.05 * noise)
            else:  # conv / linear weights: keep diffusers' init scale, add a perturbation of the same size
                p.add_(noise * p.std().clamp_min(1e-3))
        # store in float16 (as the released .fp16 file) and compute the references from exactly those values
        sd16 = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.float() for k, v in sd16.items()})

        gi = torch.Generator().manual_seed(2)
        pixels = torch.rand(2, 3, 32, 32, generator=gi) * 2 - 1
        dist = model.encode(pixels).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(SAMPLE_SEED))
        latents = torch.randn(4, 4, 8, 8, generator=gi) * SCALE
        expected = {
            "pixels": pixels,
            "latent_mean": dist.mean,
            "latent_logvar": dist.logvar,
            "latent_sample": sample,
            "latents": latents,
        }
        for n in (1, 2, 4):
            expected[f"decoded_f{n}"] = model.decode((1 / SCALE) * latents, num_frames=n).sample

    meta = {
        "generator": "tests/tools/make_vae_layout_fixtures.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "config": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}),
        "sample_seed": str(SAMPLE_SEED),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(sd16, str(OUT / "diffusers_temporal_tiny.fp16.safetensors"), metadata=meta)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(OUT / "diffusers_temporal_tiny.expected.safetensors"), metadata=meta)
    n = sum(v.numel() for v in sd16.values())
    print(f"wrote {OUT}: {len(sd16)} tensors, {n} parameters")


if __name__ == "__main__":
    main()
