"""Raw and scaled SVD VAE latents (plain Python: no torch import here).

The samplers and the conditioning work on *scaled* latents (raw VAE latent x LATENT_SCALE, as the
original's ``scale_factor``); ComfyUI's LATENT type holds *raw* ones. The conversions below are the
only place that factor is applied outside the VAE itself.
"""

LATENT_SCALE = 0.18215  # the SVD first stage's scale_factor (spec, VAE parameters)


def to_raw(scaled):
    """Scaled latents (sampler space) -> raw VAE latents (ComfyUI LATENT space)."""
    return scaled / LATENT_SCALE


def to_scaled(raw):
    """Raw VAE latents (ComfyUI LATENT space) -> scaled latents (sampler space)."""
    return raw * LATENT_SCALE
