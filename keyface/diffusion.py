"""Diffusion maths (spec 5): v-scaling, AYS sigmas, the Euler EDM sampler and both guidance schemes.

Short pure functions over explicit sigma tensors, in the k-diffusion style. A *denoiser* is a
callable ``denoise(x, sigma) -> D`` where ``sigma`` is a 0-d tensor (one noise level for all rows)
and D is the x0 estimate in the scaled latent space.
"""

from __future__ import annotations

import logging

import torch

from .conditioning import keyframe_unconditional
from .planner import WINDOW
from .settings import DEFAULTS

log = logging.getLogger(__name__)

# AYSDiscretization base list (spec 5.2)
AYS_BASE_SIGMAS = (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)
FRAMES_PER_VIDEO = WINDOW  # rows of one video / segment in a batched call


def ays_sigmas(num_steps: int) -> torch.Tensor:
    """AYS sigma schedule, float64, with a trailing 0.

    ``num_steps`` 10 -> the 11 base sigmas (11 Euler steps / network evaluations); n > 10 -> the base
    list interpolated linearly in log sigma to n points over an even grid (n evaluations).
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps:
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    n = int(num_steps)
    if n < 10:
        raise ValueError(
            f"num_steps={n}: the AYS schedule of the released models needs at least 10 steps "
            "(10 gives its 11 base sigmas; more steps interpolate them)"
        )
    base = torch.tensor(AYS_BASE_SIGMAS, dtype=torch.float64)
    if n == 10:
        sig = base
    else:
        # np.interp over the ascending, log-space list, then reversed back to descending order
        ys = torch.log(base.flip(0))
        xs = torch.linspace(0.0, 1.0, len(base), dtype=torch.float64)
        new_xs = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
        x0, x1 = xs[idx - 1], xs[idx]
        y0, y1 = ys[idx - 1], ys[idx]
        t = (new_xs - x0) / (x1 - x0)
        sig = torch.exp(y0 + t * (y1 - y0)).flip(0)
    return torch.cat([sig, sig.new_zeros(1)])


def v_scaling(sigma):
    """VScalingWithEDMcNoise (sigma_data = 1) -> (c_skip, c_out, c_in, c_noise)."""
    sigma = torch.as_tensor(sigma)
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / (sigma**2 + 1.0) ** 0.5
    c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def row_scalings(sigma, rows: int, like: torch.Tensor):
    """Per-row scalings [rows, 1, 1, 1] (c_skip, c_out, c_in) in ``like``'s dtype, and c_noise [rows] float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(rows)
    if sigma.shape != (rows,):
        raise ValueError(f"sigma: expected a scalar or [{rows}], got {tuple(sigma.shape)}")
    c_skip, c_out, c_in, c_noise = v_scaling(sigma)
    shape = (rows,) + (1,) * (like.dim() - 1)
    return (
        c_skip.reshape(shape).to(like.dtype),
        c_out.reshape(shape).to(like.dtype),
        c_in.reshape(shape).to(like.dtype),
        c_noise,  # stays float32: the timestep sinusoid is computed in float32, as in the original
    )


def sample_euler(denoise, noise: torch.Tensor, sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """EulerEDMSampler with s_churn 0: deterministic Euler steps over ``sigmas`` (last one may be 0).

    x0 = noise * sqrt(1 + sigmas[0]^2) (a new tensor; ``noise`` is not modified); then
    x <- x + (s_{i+1} - s_i) (x - D(x; s_i)) / s_i. ``callback(i, total, x, denoised)`` runs after
    every step; an exception raised by it aborts sampling (it propagates unchanged).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    total = len(sigmas) - 1
    if total < 1:
        raise ValueError("sample_euler: need at least two sigmas")
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2).to(noise.dtype)
    for i in range(total):
        sigma = sigmas[i].to(torch.float32)  # the original runs the steps in float32 (per-row sigma)
        sigma_next = sigmas[i + 1].to(torch.float32)
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma.to(x.dtype)
        x = x + (sigma_next - sigma).to(x.dtype) * d
        if callback is not None:
            callback(i, total, x, denoised)
    return x


# --------------------------------------------------------------------------------------------------
# Call sizes: as many guidance branches / segments per network call as memory allows
# --------------------------------------------------------------------------------------------------


def _release_cached_memory():
    """Give the CUDA caching allocator's free blocks back before a smaller retry (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CallSizer:
    """How many items (guidance branches or segments) go into one network call.

    Starts at ``limit``. When a call raises ``torch.OutOfMemoryError`` (CUDA's is a subclass), that
    call's items are retried in halves (rounded up), down to one item per call; out of memory with a
    single item is re-raised. The size that worked is kept for every later call through the same
    sizer, so one sizer per stage run means one failed call per halving, not one per step. The items
    are independent of each other (separate videos), so the split changes the number of calls, not
    what is computed (bit-identical up to the float rounding of different batch sizes).
    """

    def __init__(self, limit: int, what: str = "items"):
        if isinstance(limit, bool) or int(limit) != limit or int(limit) < 1:
            raise ValueError(f"{what} per call must be an integer >= 1, got {limit!r}")
        self.limit = int(limit)
        self.what = what
        self._initial = self.limit
        self._reported = False

    def map(self, call, total: int) -> list:
        """``[call(i0, i1), ...]`` over consecutive ranges covering items ``0..total``, each of at most
        ``limit`` items, halving ``limit`` on out-of-memory as described above."""
        out, i = [], 0
        while i < total:
            n = min(self.limit, total - i)
            try:
                out.append(call(i, i + n))
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
            else:
                i += n
                self._report()
                continue
            # outside the except block: the exception (and the activations its traceback holds) is gone
            self.limit = (n + 1) // 2
            _release_cached_memory()
        return out

    def _report(self):
        if self.limit < self._initial and not self._reported:
            self._reported = True
            log.warning("keyface: out of memory with %d %s per network call; continuing with %d per call",
                        self._initial, self.what, self.limit)


def _sizer(per_call, what: str) -> CallSizer:
    return per_call if isinstance(per_call, CallSizer) else CallSizer(per_call, what)


# --------------------------------------------------------------------------------------------------
# Engine denoisers (wrapper input assembly lives on the networks, see keyface.networks)
# --------------------------------------------------------------------------------------------------


# A guidance_min_sigma just above the AYS schedule's last sigma (0.002): only the final Euler step is unguided.
UNGUIDED_LAST_STEP_SIGMA = 0.0025


def _unguided(sigma, guidance_min_sigma: float) -> bool:
    """True where the guidance is skipped: every row's sigma is at or below ``guidance_min_sigma``."""
    return guidance_min_sigma > 0 and float(torch.as_tensor(sigma).max()) <= guidance_min_sigma


def keyframe_denoiser(network, cond, uc=None, ref_ratio: float = DEFAULTS.ref_ratio,
                      audio_ratio: float = DEFAULTS.audio_ratio, guidance_min_sigma: float = DEFAULTS.guidance_min_sigma,
                      branches_per_call=DEFAULTS.branches_per_call):
    """AudioRefMultiCondGuider around the keyframe engine (spec 5.4).

    Branches [u: uc concat, uc crossattn, c vector | id: c concat, uc crossattn, c vector | full: c],
    all three in one batched network call of 3 x rows by default. D = D_u + ref (D_id - D_u) +
    audio (D_full - D_id). ``cond``/``uc`` as returned by
    :func:`keyface.conditioning.keyframe_conditioning` (B videos); ``cond`` may also be that
    ``(c, uc)`` pair. ``uc=None``: the released unconditional branch,
    :func:`keyface.conditioning.keyframe_unconditional` of ``cond``.

    ``branches_per_call``: 1..3 branches per network call, or a :class:`CallSizer` shared by several
    denoisers; out of memory halves it (see :class:`CallSizer`). The result does not depend on it.

    ``guidance_min_sigma`` (default 0: exact, as released): at sigmas at or below it only the full
    branch is evaluated (D = D_full, one third of the cost). With AYS the last step is at 0.002,
    where c_out = -0.002 makes the guidance terms ~0.002 x a network difference: an approximation,
    measured in bench/README.md.
    """
    if isinstance(cond, tuple) and len(cond) == 2 and uc is None:
        cond, uc = cond
    if uc is None:
        uc = keyframe_unconditional(cond)
    if not isinstance(cond, dict) or not isinstance(uc, dict):
        raise TypeError("keyframe_denoiser: cond and uc must be the dicts of keyface.conditioning.keyframe_conditioning")
    sizer = _sizer(branches_per_call, "keyframe guidance branches")
    concat = torch.cat([uc["concat"], cond["concat"], cond["concat"]], dim=0)
    crossattn = torch.cat([uc["crossattn"], uc["crossattn"], cond["crossattn"]], dim=0)
    vector = torch.cat([cond["vector"], cond["vector"], cond["vector"]], dim=0)
    videos = cond["concat"].shape[0]

    def denoise(x, sigma):
        if _unguided(sigma, guidance_min_sigma):
            return network.denoise(x, sigma, concat=cond["concat"], crossattn=cond["crossattn"], vector=cond["vector"])
        rows = x.shape[0]
        per_row = torch.as_tensor(sigma).dim() > 0

        def branches(b0, b1):  # branches b0..b1-1: rows b0*rows.., videos b0*videos..
            k = b1 - b0
            return network.denoise(x.repeat(k, *([1] * (x.dim() - 1))), sigma.repeat(k) if per_row else sigma,
                                   concat=concat[b0 * videos:b1 * videos], crossattn=crossattn[b0 * videos:b1 * videos],
                                   vector=vector[b0 * rows:b1 * rows])

        d_u, d_id, d_full = torch.cat(sizer.map(branches, 3), dim=0).split(rows, dim=0)
        return d_u + ref_ratio * (d_id - d_u) + audio_ratio * (d_full - d_id)

    return denoise


def interpolation_denoiser(good, bad, cond: dict, scale: float = DEFAULTS.scale,
                           segments_per_call=DEFAULTS.segments_per_call, autoguidance: bool = DEFAULTS.autoguidance,
                           guidance_min_sigma: float = DEFAULTS.guidance_min_sigma):
    """KarrasGuider autoguidance around the two interpolation networks (spec 5.5).

    D = D_bad + scale (D_good - D_bad); both networks get the same (main engine's) conditioning.
    Segments are independent, so they are evaluated ``segments_per_call`` at a time (the released
    code uses 2; the result does not depend on it beyond float rounding). ``segments_per_call`` may
    also be a :class:`CallSizer` shared by several denoisers; out of memory halves it.
    ``autoguidance=False`` evaluates the good network only (D = D_good): half the cost, a different
    (unguided) result. ``guidance_min_sigma``: as in :func:`keyframe_denoiser`, the good network
    alone at sigmas at or below it (default 0: exact).
    """
    sizer = _sizer(segments_per_call, "interpolation segments")
    if autoguidance and bad is None:
        raise ValueError("interpolation_denoiser: autoguidance needs the bad network")
    concat, crossattn = cond["concat"], cond["crossattn"]
    n_seg = concat.shape[0]

    def run(net, x, sigma):
        per_row = torch.as_tensor(sigma).dim() > 0

        def segments(s0, s1):
            rows = slice(s0 * FRAMES_PER_VIDEO, s1 * FRAMES_PER_VIDEO)
            return net.denoise(x[rows], sigma[rows] if per_row else sigma, concat=concat[s0:s1],
                               crossattn=crossattn[s0:s1])

        return torch.cat(sizer.map(segments, n_seg), dim=0)

    def denoise(x, sigma):
        if x.shape[0] != n_seg * FRAMES_PER_VIDEO:
            raise ValueError(f"interpolation denoiser: x has {x.shape[0]} rows, expected {n_seg} x {FRAMES_PER_VIDEO}")
        d_good = run(good, x, sigma)
        if not autoguidance or _unguided(sigma, guidance_min_sigma):
            return d_good
        d_bad = run(bad, x, sigma)
        return d_bad + scale * (d_good - d_bad)

    return denoise


__all__ = [
    "AYS_BASE_SIGMAS",
    "CallSizer",
    "UNGUIDED_LAST_STEP_SIGMA",
    "ays_sigmas",
    "interpolation_denoiser",
    "keyframe_denoiser",
    "sample_euler",
    "v_scaling",
]
