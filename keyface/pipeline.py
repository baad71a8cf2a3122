"""Clip-level pipeline: identity preparation, keyframes, interpolation, decode/merge, rendering.

The stages follow the clean bookkeeping of :mod:`keyface.planner` (spec 1.10) and the numerics of the
original (spec 1.5-1.7, 5):

1. :func:`sample_keyframes`: one sampler run per 14-slot batch ([identity slot | up to 13 keyframes
   | pads]) with the 3-branch keyframe guidance; only the real keyframe slots are kept. No decode
   (use :func:`decode_keyframe_preview` for a preview).
2. :func:`interpolate_segments`: every segment (keyframe pair j, j+1 and its 14 audio rows) with
   autoguidance, ``segments_per_call`` segments per sampler run / UNet call.
3. :func:`decode_segments`: per-frame VAE decode (``decoding_t = 1``) in chunks of output frames;
   a frame shared by two segments is the pixel mean of both decodes after clamp((x+1)/2, 0, 1);
   trimmed to N. Yields CPU float chunks [n, H, W, 3] in 0..1.

**Noise.** Every 14-frame block of noise comes from its own CPU ``torch.Generator`` seeded with a
stable hash of ``(seed, stage, index)`` (keyframe batch index, or segment index), drawn in float32
and then moved to the device. Results therefore do not depend on ``segments_per_call``, on the decode
chunk size, on which other stages ran before, or on the device's RNG; any stage (or any subset of
segments) can be re-run alone with the same result. (This differs from the original's single CUDA
RNG stream, which cannot be reproduced on the CPU anyway, spec 9.)

**Memory.** The keyframe latents of the whole clip live on the CPU (64 KiB per 512-px keyframe, one
keyframe per 13 frames); only the current batch / segment group / decode chunk and the networks are
on ``device``. :func:`iter_render` interpolates a segment group when the decode reaches it and drops
the segments it has passed, so it holds one group of segment latents (0.9 MB per segment), not the
clip's. Decoded pixels leave the device chunk by chunk; :func:`render_to_file` streams them into the
mp4 writer (which encodes in its own thread while the next group samples), so neither the GPU nor
the host holds pixels proportional to the clip length. (:func:`sample_clip` returns all segments.)

**Progress and cancel.** ``callback(ProgressEvent)`` is called after every denoising step of both
sampling stages and after every decode chunk; an exception raised by the callback propagates
unchanged (cancel), and :func:`render_to_file` then leaves no output file behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .conditioning import interpolation_conditioning, keyframe_conditioning
from .config import ATTENTION_BACKENDS
from .diffusion import CallSizer, ays_sigmas, interpolation_denoiser, keyframe_denoiser, sample_euler
from .memory import segment_decode_rows
from .networks import check_latent_size, mask_latent_hw
from .planner import FPS, WINDOW, ClipPlan, plan_clip
from .settings import DEFAULT_CHUNK_FRAMES, DEFAULT_CRF, DEFAULT_SEED, RenderSettings, check_attention
from .vae import decode_memory
from .validate import MAX_RESOLUTION, finite, integer, number, stage_output

STAGE_KEYFRAMES = "keyframes"
STAGE_INTERPOLATION = "interpolation"
STAGE_DECODE = "decode"

LATENT_CHANNELS = 4
# Likely causes named when a stage's output is not finite although its inputs were checked.
_SAMPLING_CAUSES = ("a model file with non-finite weights, or activations overflowing the network's dtype (fp16 "
                    "weights: try bf16 or fp32)")
_DECODE_CAUSES = "a VAE file with non-finite weights, or the decoder overflowing its dtype (try fp32)"
# Share of the free memory a decoder call may plan for: the rest absorbs allocator fragmentation,
# the chunk's outputs and the estimate's error (keyface.vae.decode_memory).
DECODE_MEMORY_FRACTION = 0.8
DEFAULTS = RenderSettings()  # every default below is read from here (keyface/settings.py)


# --------------------------------------------------------------------------------------------------
# Progress, noise
# --------------------------------------------------------------------------------------------------


class ProgressEvent(NamedTuple):
    """Progress of one stage. ``step``/``total`` count the stage's units: denoising steps over all
    batches (keyframes) or segment groups (interpolation), decode chunks (decode). ``item``/``items``
    say which batch / segment group / chunk the step belongs to (0-based) and how many there are."""

    stage: str
    step: int
    total: int
    item: int = 0
    items: int = 1

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


def stage_seed(seed: int, stage: str, index: int) -> int:
    """A stable 63-bit seed for block ``index`` of ``stage`` (independent of Python's hash salt)."""
    digest = hashlib.sha256(f"keyface/{int(seed)}/{stage}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stage_noise(seed: int, stage: str, index: int, shape, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` for block ``index`` of ``stage``: drawn in float32 on the CPU
    from its own generator, then moved to ``device`` / ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(stage_seed(seed, stage, index))
    noise = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return noise.to(device=device or "cpu", dtype=dtype or torch.float32)


def _emit(callback, event):
    if callback is not None:
        callback(event)


# --------------------------------------------------------------------------------------------------
# Helpers: devices, validation
# --------------------------------------------------------------------------------------------------


def _target_device(device, module) -> torch.device:
    """``device`` if given, else the device of ``module``'s first parameter (CPU if it has none)."""
    if device is not None:
        return torch.device(device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _vae_dtype(vae) -> torch.dtype:
    return next((p.dtype for p in vae.parameters() if p.is_floating_point()), torch.float32)


def _plan_of(plan_or_n) -> ClipPlan:
    if isinstance(plan_or_n, ClipPlan):
        return plan_or_n
    return plan_clip(plan_or_n)


def model_latent_size(interpolation_network) -> tuple[int, int]:
    """(h, w) of the latents the interpolation network works on: its ``learned_mask`` size
    (64 x 64 for the released weights, i.e. 512 x 512 pixels)."""
    return mask_latent_hw(interpolation_network)


def model_resolution(interpolation_network) -> tuple[int, int]:
    """(height, width) in pixels the released pipeline renders at (8 x the latent size)."""
    h, w = model_latent_size(interpolation_network)
    return 8 * h, 8 * w


def _identity_latent(identity_latent) -> torch.Tensor:
    z = torch.as_tensor(identity_latent)
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4 or z.shape[0] != 1 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"identity latent: expected [1, {LATENT_CHANNELS}, h, w] or [{LATENT_CHANNELS}, h, w] "
            f"(a scaled VAE latent), got {tuple(z.shape)}"
        )
    return finite("identity latent", z, "encode the portrait again (pipeline.encode_identity)")


def check_identity_latent(identity_latent, interpolation_network) -> torch.Tensor:
    """Return the identity latent as [1, 4, h, w]; ValueError if its size is not the model's."""
    z = _identity_latent(identity_latent)
    h, w = model_latent_size(interpolation_network)
    check_latent_size(interpolation_network, z.shape[-2:], "identity latent",
                                            f": prepare the image at {8 * h}x{8 * w} px (prepare_identity(image, size))")
    return z


def _check_rows(name: str, tensor, plan: ClipPlan, dims: int | None = None):
    if tensor is None:
        raise ValueError(f"{name} is missing")
    n = tensor.shape[0]
    if n != plan.num_frames:
        raise ValueError(
            f"{name} has {n} frames but the clip plan has {plan.num_frames} frames: features, emotion and "
            "plan must come from the same clip"
        )
    if dims is not None and tensor.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions [frames, ...], got shape {tuple(tensor.shape)}")
    finite(name, tensor)


def _emotion(values, plan: ClipPlan, name: str) -> torch.Tensor:
    if values is None:
        return torch.zeros(plan.num_frames, dtype=torch.float32)
    v = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    _check_rows(name, v, plan)  # also refuses NaN / inf
    return v.cpu()


def _index_rows(tensor: torch.Tensor, rows) -> torch.Tensor:
    return tensor[torch.as_tensor(list(rows), dtype=torch.long, device=tensor.device)]


def _check_indices(what: str, indices, count: int) -> list:
    """``indices`` (None = all of 0..count-1) as a list of ints, each checked to be in range."""
    if indices is None:
        return list(range(count))
    selected = [int(i) for i in indices]
    outside = [i for i in selected if not 0 <= i < count]
    if outside:
        raise ValueError(f"{what} indices {outside} are outside 0..{count - 1}")
    return selected


def _state_dtype(dtype) -> torch.dtype:
    """Sampler state dtype: float32 (or float64 if asked). Half types are promoted: the original runs
    its Euler steps in float32 while the networks compute in their own (possibly half) dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Identity image
# --------------------------------------------------------------------------------------------------


def prepare_identity(image, size, mode: str = "crop") -> torch.Tensor:
    """Square the identity image and resize it to the model size, never squashing it.

    image [H, W, 3] (or [1, H, W, 3]) float in 0..1. ``mode="crop"``: centre crop to the shorter
    side; ``mode="pad"``: pad the shorter side symmetrically (edge pixels repeated). Then an
    antialiased bilinear resize to ``size`` (an int, or (height, width) for a non-square model).
    Returns [height, width, 3] float32 in 0..1 on the image's device.
    """
    img = torch.as_tensor(image)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[-1] not in (3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"identity image: expected [H, W, 3] in 0..1, got {tuple(img.shape)}")
    img = img[..., :3]
    if not img.is_floating_point():
        img = img.float() / 255.0
    finite("identity image", img, "the portrait's pixels must be numbers in 0..1")
    img = img.float()
    sizes = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size, size)
    if len(sizes) != 2:
        raise ValueError(f"identity size: expected an integer or (height, width), got {size!r}")
    th, tw = (integer("identity size", s, 1, MAX_RESOLUTION) for s in sizes)  # NaN / 1e9 named, not a crash
    h, w = img.shape[:2]
    x = img.permute(2, 0, 1)[None]  # [1, 3, H, W]
    target_aspect = tw / th
    if mode == "crop":
        if w / h > target_aspect:  # too wide: crop width
            cw = max(1, round(h * target_aspect))
            left = (w - cw) // 2
            x = x[..., :, left:left + cw]
        else:
            ch = max(1, round(w / target_aspect))
            top = (h - ch) // 2
            x = x[..., top:top + ch, :]
    elif mode == "pad":
        if w / h > target_aspect:
            ph = round(w / target_aspect) - h
            x = F.pad(x, (0, 0, ph // 2, ph - ph // 2), mode="replicate")
        else:
            pw = round(h * target_aspect) - w
            x = F.pad(x, (pw // 2, pw - pw // 2, 0, 0), mode="replicate")
    else:
        raise ValueError(f"identity mode must be 'crop' or 'pad', got {mode!r}")
    if tuple(x.shape[-2:]) != (th, tw):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()


@torch.no_grad()
def encode_identity(vae, image, device=None) -> torch.Tensor:
    """Identity image [H, W, 3] in 0..1 (already prepared) -> scaled latent [1, 4, H/8, W/8] on the CPU.

    Uses the posterior mean (deterministic; the original drew an unseeded sample, spec B10).
    """
    device = _target_device(device, vae)
    dtype = _vae_dtype(vae)
    img = torch.as_tensor(image, dtype=torch.float32)
    if img.dim() != 3 or img.shape[-1] != 3:
        raise ValueError(f"identity image: expected [H, W, 3], got {tuple(img.shape)}")
    pixels = (img.permute(2, 0, 1)[None] * 2.0 - 1.0).to(device=device, dtype=dtype)
    z = vae.encode(pixels, sample=False)
    return stage_output("identity encoding", z.float().cpu(), _DECODE_CAUSES.replace("decoder", "encoder"))


# --------------------------------------------------------------------------------------------------
# Stage 1: keyframes
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_keyframes(network, identity_latent, keyframe_audio, valence, arousal, plan, *, seed: int = DEFAULT_SEED,
                     steps: int = DEFAULTS.keyframe_steps, ref_ratio: float = DEFAULTS.ref_ratio,
                     audio_ratio: float = DEFAULTS.audio_ratio, guidance_min_sigma: float = DEFAULTS.guidance_min_sigma,
                     branches_per_call: int = DEFAULTS.branches_per_call, device=None, dtype=None,
                     callback: Callable | None = None, batch_indices: Sequence[int] | None = None) -> torch.Tensor:
    """Sample every keyframe of the plan -> scaled latents [K, 4, h, w] (float32, CPU).

    ``identity_latent`` [1, 4, h, w] (scaled); ``keyframe_audio`` [N, 2, F] ([WavLM | BEATs] rows);
    ``valence`` / ``arousal`` [N] or None (neutral). One sampler run per 14-slot batch: the identity
    slot gets row 0's audio and emotion, pad slots repeat the last keyframe; identity and pad samples
    are discarded. Batch ``b`` draws its noise from ``stage_noise(seed, "keyframes", b)``.
    ``device``: where the batch is sampled (default: the network's device; only the current batch and
    the identity latent go there). ``dtype``: sampler state dtype (float32; half types are promoted,
    the network still computes in its own weight dtype). ``guidance_min_sigma``: see
    :func:`keyface.diffusion.keyframe_denoiser` (0 = exact). ``branches_per_call``: guidance branches
    (1..3) per UNet call; halved on out-of-memory, and the smaller size kept for the rest of the stage
    (:class:`keyface.diffusion.CallSizer`). It does not change the result. ``batch_indices`` (a subset of
    batches, e.g. one block of a job, :mod:`keyface.jobs`) returns only those batches' keyframes, in
    order, [sum of their keyframes, 4, h, w]: exactly those rows of the full result.
    """
    plan = _plan_of(plan)
    selected = _check_indices("batch", batch_indices, plan.num_batches)
    if not 1 <= int(branches_per_call) <= 3:
        raise ValueError(f"branches_per_call must be 1, 2 or 3 (the keyframe guidance has 3 branches), "
                         f"got {branches_per_call}")
    sizer = CallSizer(int(branches_per_call), "keyframe guidance branches")
    ref_ratio, audio_ratio = number("ref_ratio", ref_ratio), number("audio_ratio", audio_ratio)
    guidance_min_sigma = number("guidance_min_sigma", guidance_min_sigma, low=0.0)
    z_id = _identity_latent(identity_latent)
    _check_rows("keyframe audio features", keyframe_audio, plan, dims=3)
    val = _emotion(valence, plan, "valence")
    aro = _emotion(arousal, plan, "arousal")
    device = _target_device(device, network)
    dtype = _state_dtype(dtype)
    sigmas = ays_sigmas(steps)
    nfe = len(sigmas) - 1
    h, w = z_id.shape[-2:]
    z_id = z_id.to(device=device, dtype=dtype)
    kf_slots = [kf for b in selected for _, kf in plan.batch_keyframes(b)]
    out_row = {kf: row for row, kf in enumerate(kf_slots)}
    out = torch.empty(len(kf_slots), LATENT_CHANNELS, h, w, dtype=torch.float32)
    total = len(selected) * nfe
    for pos, b in enumerate(selected):
        batch = plan.batches[b]
        rows = [s.audio_row for s in batch]
        audio = _index_rows(keyframe_audio, rows).to(device=device, dtype=dtype)
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        c, uc = keyframe_conditioning(z_id, val[rows_t][None].to(device), aro[rows_t][None].to(device), audio[None],
                                      network.audio_projection)
        denoise = keyframe_denoiser(network, c, uc, ref_ratio=ref_ratio, audio_ratio=audio_ratio,
                                    guidance_min_sigma=guidance_min_sigma, branches_per_call=sizer)
        noise = stage_noise(seed, STAGE_KEYFRAMES, b, (WINDOW, LATENT_CHANNELS, h, w), device, dtype)

        def step_cb(i, n, x, d, pos=pos):
            _emit(callback, ProgressEvent(STAGE_KEYFRAMES, pos * nfe + i + 1, total, pos, len(selected)))

        x = sample_euler(denoise, noise, sigmas, callback=step_cb)
        for slot_index, kf_index in plan.batch_keyframes(b):
            out[out_row[kf_index]] = x[slot_index].float().cpu()
        del x, c, uc, denoise, noise, audio
    return stage_output(STAGE_KEYFRAMES, out, _SAMPLING_CAUSES)


# --------------------------------------------------------------------------------------------------
# Stage 2: interpolation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def interpolate_segments(good, bad, keyframe_latents, interpolation_audio, plan, *, seed: int = DEFAULT_SEED,
                         steps: int = DEFAULTS.interpolation_steps, scale: float = DEFAULTS.scale,
                         segments_per_call: int = DEFAULTS.segments_per_call, autoguidance: bool = DEFAULTS.autoguidance,
                         guidance_min_sigma: float = DEFAULTS.guidance_min_sigma, device=None, dtype=None, callback: Callable | None = None,
                         segment_indices: Sequence[int] | None = None) -> torch.Tensor:
    """Interpolate the plan's segments -> scaled latents [S, 14, 4, h, w] (float32, CPU).

    ``keyframe_latents`` [K, 4, h, w] from :func:`sample_keyframes` (K = plan.num_keyframes);
    ``interpolation_audio`` [N, 2, F] ([wav2vec2 | BEATs] rows). Segment j pairs keyframes (j, j+1)
    and uses audio rows ``plan.segments[j].audio_rows``. ``segments_per_call`` segments share one
    sampler run and, memory permitting, one UNet call per network per step: a call that runs out of
    memory is retried in halves and the smaller size is kept for the rest of the stage
    (:class:`keyface.diffusion.CallSizer`); the result does not depend on it. Segment j draws its noise from
    ``stage_noise(seed, "interpolation", j)``, so ``segment_indices`` (a subset, e.g. to re-roll or
    resume) gives exactly those rows of the full result. ``device`` / ``dtype`` as in
    :func:`sample_keyframes`; only the current segment group goes to the device.
    """
    plan = _plan_of(plan)
    if int(segments_per_call) < 1:
        raise ValueError(f"segments_per_call must be >= 1, got {segments_per_call}")
    segments_per_call = int(segments_per_call)
    sizer = CallSizer(segments_per_call, "interpolation segments")  # shared by every group: a halving sticks
    scale = number("scale", scale)
    guidance_min_sigma = number("guidance_min_sigma", guidance_min_sigma, low=0.0)
    kf = torch.as_tensor(keyframe_latents)
    if kf.dim() != 4 or kf.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"keyframe latents: expected [K, {LATENT_CHANNELS}, h, w], got {tuple(kf.shape)}")
    if kf.shape[0] != plan.num_keyframes:
        raise ValueError(
            f"keyframe latents hold {kf.shape[0]} keyframes but the clip plan ({plan.num_frames} frames) has "
            f"{plan.num_keyframes}: keyframes and plan must come from the same clip"
        )
    check_latent_size(good, kf.shape[-2:], "keyframe latents")
    h, w = mask_latent_hw(good)
    finite("keyframe latents", kf, "sample the keyframes again")
    _check_rows("interpolation audio features", interpolation_audio, plan, dims=3)
    if autoguidance and bad is None:
        raise ValueError("autoguidance needs the interpolation 'bad' network (or pass autoguidance=False)")
    selected = _check_indices("segment", segment_indices, plan.num_segments)
    device = _target_device(device, good)
    dtype = _state_dtype(dtype)
    sigmas = ays_sigmas(steps)
    nfe = len(sigmas) - 1
    groups = [selected[i:i + segments_per_call] for i in range(0, len(selected), segments_per_call)]
    total = len(groups) * nfe
    out = torch.empty(len(selected), WINDOW, LATENT_CHANNELS, h, w, dtype=torch.float32)
    done = 0
    for g, group in enumerate(groups):
        segs = [plan.segments[i] for i in group]
        pairs = torch.stack(
            [torch.stack([kf[s.start_keyframe], kf[s.end_keyframe]], dim=1) for s in segs]
        ).to(device=device, dtype=dtype)  # [g, 4, 2, h, w]
        rows = [r for s in segs for r in s.audio_rows]
        audio = _index_rows(interpolation_audio, rows).reshape(len(segs), WINDOW, *interpolation_audio.shape[1:])
        cond = interpolation_conditioning(pairs, audio.to(device=device, dtype=dtype), good.audio_projection)
        denoise = interpolation_denoiser(good, bad, cond, scale=scale, segments_per_call=sizer,
                                         autoguidance=autoguidance, guidance_min_sigma=guidance_min_sigma)
        noise = torch.cat([
            stage_noise(seed, STAGE_INTERPOLATION, s.index, (WINDOW, LATENT_CHANNELS, h, w), device, dtype)
            for s in segs
        ])

        def step_cb(i, n, x, d, g=g):
            _emit(callback, ProgressEvent(STAGE_INTERPOLATION, g * nfe + i + 1, total, g, len(groups)))

        x = sample_euler(denoise, noise, sigmas, callback=step_cb)
        out[done:done + len(segs)] = x.float().cpu().reshape(len(segs), WINDOW, LATENT_CHANNELS, h, w)
        done += len(segs)
        del x, cond, denoise, noise, pairs, audio
    return stage_output(STAGE_INTERPOLATION, out, _SAMPLING_CAUSES)


# --------------------------------------------------------------------------------------------------
# Stage 3: decode and merge
# --------------------------------------------------------------------------------------------------


def _decode_rows(vae, latents: torch.Tensor, device, dtype) -> torch.Tensor:
    """[R, 4, h, w] scaled latents -> [R, 3, H, W] float32 pixels in 0..1 (one frame per video)."""
    x = vae.decode(latents.to(device=device, dtype=dtype), frames_per_video=1)
    stage_output(STAGE_DECODE, x, _DECODE_CAUSES)  # clamp would keep a NaN: it becomes a black pixel
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def decode_rows_for(chunk_frames: int) -> int:
    """Latent rows one decoder call on ``chunk_frames`` consecutive output frames decodes at most
    (keyface.memory.segment_decode_rows)."""
    return segment_decode_rows(chunk_frames)


def free_device_memory(device) -> int | None:
    """Bytes a CUDA device has free for a new allocation (the driver's free memory plus what torch's
    cache holds unused); None for any other device, whose decode keeps the chunk size it is given
    (on the CPU a chunk's peak is measured and documented beside ``keyface.vae.decode_memory``)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def decode_chunk_frames(vae, latent_hw, dtype, free_memory: int | None, most: int = DEFAULT_CHUNK_FRAMES,
                        rows_for: Callable[[int], int] = decode_rows_for) -> int:
    """Frames per decoder call: the most (up to ``most``) whose estimated working memory
    (``keyface.vae.decode_memory`` of ``rows_for(frames)`` latents) fits in
    :data:`DECODE_MEMORY_FRACTION` of ``free_memory`` bytes; at least 1. ``free_memory=None``
    (unknown, e.g. the CPU) keeps ``most``. The decoded frames do not depend on it."""
    most = int(most)
    if free_memory is None:
        return most
    per_row = decode_memory(vae.decoder.config, 1, latent_hw, dtype)
    budget = DECODE_MEMORY_FRACTION * float(free_memory)
    fits = [c for c in range(1, most + 1) if rows_for(c) * per_row <= budget]
    return max(fits, default=1)


def _segment_lookup(segment_latents, plan: ClipPlan):
    """``s -> segment_latents[s]`` after checking the tensor holds the plan's segments."""
    lat = torch.as_tensor(segment_latents)
    if lat.dim() != 5 or lat.shape[1] != WINDOW or lat.shape[2] != LATENT_CHANNELS:
        raise ValueError(f"segment latents: expected [S, {WINDOW}, {LATENT_CHANNELS}, h, w], got {tuple(lat.shape)}")
    if lat.shape[0] != plan.num_segments:
        raise ValueError(
            f"segment latents hold {lat.shape[0]} segments but a clip of {plan.num_frames} frames has "
            f"{plan.num_segments}: segments and frame count must come from the same clip"
        )
    return lat.__getitem__


@torch.no_grad()
def decode_segments(vae, segment_latents, num_frames, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES, device=None,
                    dtype=None, callback: Callable | None = None, start_frame: int = 0,
                    free_memory: int | None = None) -> Iterator[torch.Tensor]:
    """Decode and merge the segments -> iterator of CPU float32 chunks [n, H, W, 3] in 0..1.

    ``segment_latents`` [S, 14, 4, h, w]; ``num_frames`` the clip length N (or its ClipPlan). Output
    frames ``start_frame .. N-1`` are produced in chunks of ``chunk_frames``; each is decoded alone
    (``decoding_t = 1``, the released setting), several frames per VAE call. A frame at a shared
    keyframe is the mean of clamp((x+1)/2, 0, 1) of both segments' decodes (``merge_overlapping_segments``).
    ``dtype``: the dtype latents are fed to the VAE in (None: the VAE's weight dtype); the merge is
    always computed in float32. ``start_frame`` skips the frames before it (resume).

    ``chunk_frames`` is the most frames per call: :func:`decode_chunk_frames` lowers it to what
    ``free_memory`` bytes hold (ComfyUI passes its memory manager's figure; None: the device's own,
    :func:`free_device_memory`, which on the CPU keeps ``chunk_frames``).
    ``segment_latents`` may also be a function ``s -> [14, 4, h, w]`` (segment ``s``'s latents), called
    in increasing ``s``: :mod:`keyface.jobs` streams the segments from disk this way, never holding all.
    """
    plan = _plan_of(num_frames)
    if callable(segment_latents):  # streamed from a job folder, whose blocks were checked when stored
        segment_of = segment_latents
        latent_hw = tuple(segment_of(plan.frame_sources(min(int(start_frame), plan.num_frames - 1))[0][0]).shape[-2:])
    else:
        segment_of = _segment_lookup(finite("segment latents", torch.as_tensor(segment_latents),
                                            "interpolate the segments again"), plan)
        latent_hw = tuple(segment_latents.shape[-2:])
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk_frames = int(chunk_frames)
    if not 0 <= int(start_frame) <= plan.num_frames:
        raise ValueError(f"start_frame {start_frame} is outside 0..{plan.num_frames}")
    device = _target_device(device, vae)
    dtype = dtype or _vae_dtype(vae)
    if free_memory is None:
        free_memory = free_device_memory(device)
    chunk_frames = decode_chunk_frames(vae, latent_hw, dtype, free_memory, most=chunk_frames)
    starts = list(range(int(start_frame), plan.num_frames, chunk_frames))
    for c, t0 in enumerate(starts):
        t1 = min(t0 + chunk_frames, plan.num_frames)
        sources = [plan.frame_sources(t) for t in range(t0, t1)]
        flat = [src for srcs in sources for src in srcs]
        z = torch.stack([segment_of(s)[i] for s, i in flat])
        pix = _decode_rows(vae, z, device, dtype)
        frames = []
        k = 0
        for srcs in sources:
            if len(srcs) == 1:
                frames.append(pix[k])
            else:
                frames.append(pix[k:k + len(srcs)].mean(dim=0))
            k += len(srcs)
        chunk = torch.stack(frames).permute(0, 2, 3, 1).float().cpu().contiguous()
        del pix, z, frames
        _emit(callback, ProgressEvent(STAGE_DECODE, c + 1, len(starts), c, len(starts)))
        yield chunk


@torch.no_grad()
def decode_keyframe_preview(vae, latents, *, chunk_frames: int = DEFAULT_CHUNK_FRAMES, device=None,
                            callback: Callable | None = None, free_memory: int | None = None) -> torch.Tensor:
    """Decode keyframe latents [K, 4, h, w] -> CPU float32 [K, H, W, 3] in 0..1 (for previews only).

    ``chunk_frames`` keyframes per VAE call at most (sized to ``free_memory`` as in
    :func:`decode_segments`); ``callback(ProgressEvent("decode", ...))`` after every chunk (an
    exception it raises, e.g. a cancel, stops the decode).
    """
    lat = torch.as_tensor(latents)
    if lat.dim() == 3:
        lat = lat[None]
    if lat.dim() != 4 or lat.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"keyframe latents: expected [K, {LATENT_CHANNELS}, h, w], got {tuple(lat.shape)}")
    finite("keyframe latents", lat, "sample the keyframes again")
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk_frames = int(chunk_frames)
    device = _target_device(device, vae)
    dtype = _vae_dtype(vae)
    if free_memory is None:
        free_memory = free_device_memory(device)
    chunk_frames = decode_chunk_frames(vae, lat.shape[-2:], dtype, free_memory, most=chunk_frames,
                                       rows_for=lambda c: c)
    starts = range(0, lat.shape[0], chunk_frames)
    out = []
    for c, i in enumerate(starts):
        out.append(_decode_rows(vae, lat[i:i + chunk_frames], device, dtype).permute(0, 2, 3, 1).float().cpu())
        _emit(callback, ProgressEvent(STAGE_DECODE, c + 1, len(starts), c, len(starts)))
    return torch.cat(out).contiguous()


# --------------------------------------------------------------------------------------------------
# Whole clip
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Speed settings: attention backend, torch.compile
# --------------------------------------------------------------------------------------------------

# what torch says when the chosen backend cannot run these inputs (CPU / CUDA wording)
_NO_KERNEL = ("No viable backend for scaled_dot_product_attention", "No available kernel")


@contextlib.contextmanager
def attention_backend(name: str = "auto"):
    """Run the block's ``F.scaled_dot_product_attention`` calls (UNets and VAE) on one SDPA backend.

    ``"auto"`` leaves the choice to torch. A backend that cannot run on this device / dtype / head
    size raises ValueError naming the setting instead of torch's generic "no kernel" error.
    """
    member = ATTENTION_BACKENDS[check_attention(name)]
    if member is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(getattr(SDPBackend, member)):
            yield
    except RuntimeError as err:
        if not any(text in str(err) for text in _NO_KERNEL):
            raise
        raise ValueError(f"attention={name!r}: torch has no {name} attention kernel for these inputs on this "
                         f"device (dtype, head size or GPU); use 'auto' or another backend ({err})") from err


@contextlib.contextmanager
def compiled_unets(networks, enabled: bool = True):
    """Inside the block, each network's ``diffusion_model`` is ``torch.compile(body, dynamic=False)``;
    the original bodies are put back afterwards, so the caller's modules are unchanged.

    The first call of each call shape compiles (minutes on a CPU with a cold inductor cache); later
    blocks reuse torch's cache of compiled code, which is keyed by the code, not by the wrapper.
    """
    swapped = []
    try:
        if enabled:
            for net in dict.fromkeys(n for n in networks if n is not None):  # a network passed twice is compiled once
                body = net.diffusion_model
                net.diffusion_model = torch.compile(body, dynamic=False)
                swapped.append((net, body))
        yield
    finally:
        for net, body in swapped:
            net.diffusion_model = body


def _features_parts(features):
    kf = getattr(features, "keyframe", None)
    it = getattr(features, "interpolation", None)
    if kf is None or it is None:
        if isinstance(features, (tuple, list)) and len(features) == 2:
            kf, it = features
        else:
            raise ValueError("features: expected an AudioFeatures (.keyframe, .interpolation) or a (keyframe, "
                             "interpolation) pair of [N, 2, F] tensors")
    if kf.shape[0] != it.shape[0]:
        raise ValueError(f"keyframe features have {kf.shape[0]} frames but interpolation features {it.shape[0]}")
    return kf, it


def _render_settings(settings: RenderSettings | None, overrides: dict) -> RenderSettings:
    s = settings or RenderSettings()
    if overrides:
        unknown = [k for k in overrides if not hasattr(s, k)]
        if unknown:
            raise TypeError(f"unknown render settings: {unknown}")
        s = RenderSettings(**{**s.__dict__, **overrides})
    return s


def keyframes_with_settings(network, identity_latent, keyframe_audio, valence, arousal, plan, settings: RenderSettings,
                            *, device=None, dtype=None, callback: Callable | None = None,
                            batch_indices: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`sample_keyframes` with the render's settings (the uninterrupted render and the job blocks)."""
    s = settings
    return sample_keyframes(network, identity_latent, keyframe_audio, valence, arousal, plan, seed=s.seed,
                            steps=s.keyframe_steps, ref_ratio=s.ref_ratio, audio_ratio=s.audio_ratio,
                            guidance_min_sigma=s.guidance_min_sigma, branches_per_call=s.branches_per_call,
                            device=device, dtype=dtype, callback=callback, batch_indices=batch_indices)


def interpolation_with_settings(good, bad, keyframe_latents, interpolation_audio, plan, settings: RenderSettings, *,
                                device=None, dtype=None, callback: Callable | None = None,
                                segment_indices: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`interpolate_segments` with the render's settings (the uninterrupted render and the job blocks)."""
    s = settings
    return interpolate_segments(good, bad, keyframe_latents, interpolation_audio, plan, seed=s.seed,
                                steps=s.interpolation_steps, scale=s.scale, segments_per_call=s.segments_per_call,
                                autoguidance=s.autoguidance, guidance_min_sigma=s.guidance_min_sigma,
                                device=device, dtype=dtype, callback=callback, segment_indices=segment_indices)


def sample_clip(keyframe_network, interpolation_network, bad_network, identity_latent, features, *, valence=None,
                arousal=None, settings: RenderSettings | None = None, device=None, dtype=None,
                callback: Callable | None = None, **overrides) -> tuple[torch.Tensor, torch.Tensor, ClipPlan]:
    """Stages 1 and 2 for one clip -> (keyframe latents [K, 4, h, w], segment latents [S, 14, 4, h, w],
    plan), on the CPU; arguments as in :func:`iter_render`. The attention backend and torch.compile
    of the settings apply to both stages."""
    s = _render_settings(settings, overrides)
    kf_audio, it_audio = _features_parts(features)
    plan = plan_clip(int(kf_audio.shape[0]))
    z_id = check_identity_latent(identity_latent, interpolation_network)
    with attention_backend(s.attention), compiled_unets(
            (keyframe_network, interpolation_network, bad_network), enabled=s.compile):
        kf = keyframes_with_settings(keyframe_network, z_id, kf_audio, valence, arousal, plan, s, device=device,
                                     dtype=dtype, callback=callback)
        seg = interpolation_with_settings(interpolation_network, bad_network, kf, it_audio, plan, s, device=device,
                                          dtype=dtype, callback=callback)
    return kf, seg, plan


def iter_render(keyframe_network, interpolation_network, bad_network, vae, identity_latent, features, *,
                valence=None, arousal=None, settings: RenderSettings | None = None, device=None, dtype=None,
                callback: Callable | None = None, **overrides) -> Iterator[torch.Tensor]:
    """Run all stages for one clip and yield decoded CPU chunks [n, H, W, 3] (N frames in total).

    ``features``: AudioFeatures (``.keyframe``, ``.interpolation`` [N, 2, F]); ``valence`` /
    ``arousal`` [N] or None (neutral). Settings come from ``settings`` and keyword overrides
    (``seed=``, ``segments_per_call=``, ...; see :class:`RenderSettings`). The attention backend
    and torch.compile apply only while this generator runs its own code, not across its yields.
    """
    s = _render_settings(settings, overrides)
    kf_audio, it_audio = _features_parts(features)
    plan = plan_clip(int(kf_audio.shape[0]))
    z_id = check_identity_latent(identity_latent, interpolation_network)
    networks = (keyframe_network, interpolation_network, bad_network)
    with attention_backend(s.attention), compiled_unets(networks[:1], enabled=s.compile):
        kf = keyframes_with_settings(keyframe_network, z_id, kf_audio, valence, arousal, plan, s, device=device,
                                     dtype=dtype, callback=callback)
    segments = _SegmentsOnDemand(networks, kf, it_audio, plan, s, device, dtype, callback)
    yield from decode_with_settings(vae, segments, plan, s, device=device, callback=callback)


class _SegmentsOnDemand:
    """``s -> segment s's latents`` for :func:`decode_segments`, interpolating group by group when the
    decode first asks for a segment of the group (it asks in increasing order), and forgetting the
    segments the decode has passed. So the frames of a group are decoded and written while the next
    group is not yet sampled (the mp4 writer encodes in its own thread meanwhile), and a clip of any
    length holds one group of latents, not all of them (an hour is ~6,900 segments of 0.9 MB).
    Segment j's noise depends only on j, so the result equals :func:`interpolate_segments` at once."""

    def __init__(self, networks, keyframes, interpolation_audio, plan, settings, device, dtype, callback):
        self._networks, self._kf, self._audio, self._plan = networks, keyframes, interpolation_audio, plan
        self._settings, self._device, self._dtype, self._callback = settings, device, dtype, callback
        per_call = int(settings.segments_per_call)  # RenderSettings checked it (>= 1)
        count = plan.num_segments
        self._groups = [list(range(i, min(i + per_call, count))) for i in range(0, count, per_call)]
        self._done = 0  # groups interpolated so far
        self._held: dict[int, torch.Tensor] = {}

    def __call__(self, segment: int) -> torch.Tensor:
        while segment not in self._held:
            self._interpolate_next_group()
        for old in [k for k in self._held if k < segment - 1]:  # a shared keyframe frame needs segment - 1
            del self._held[old]
        return self._held[segment]

    def _interpolate_next_group(self):
        g, s = self._done, self._settings
        if g >= len(self._groups):
            raise IndexError("the decode asked for a segment the clip plan does not have")
        with attention_backend(s.attention), compiled_unets(self._networks[1:], enabled=s.compile):
            latents = interpolation_with_settings(self._networks[1], self._networks[2], self._kf, self._audio,
                                                  self._plan, s, device=self._device, dtype=self._dtype,
                                                  callback=self._group_callback(g), segment_indices=self._groups[g])
        self._held.update(zip(self._groups[g], latents))
        self._done += 1

    def _group_callback(self, g: int):
        """The group's own events (steps 1..nfe of 1 group) as events of the whole stage."""
        if self._callback is None:
            return None
        groups = len(self._groups)

        def forward(ev: ProgressEvent):
            self._callback(ev._replace(step=g * ev.total + ev.step, total=groups * ev.total, item=g, items=groups))

        return forward


def decode_with_settings(vae, segment_latents, plan: ClipPlan, settings: RenderSettings, *, device=None,
                         callback: Callable | None = None) -> Iterator[torch.Tensor]:
    """:func:`decode_segments` with the render's chunk size and attention backend (the decode of
    :func:`iter_render`; :mod:`keyface.jobs` decodes stored segments through it too)."""
    s = settings
    chunks = decode_segments(vae, segment_latents, plan, chunk_frames=s.chunk_frames, device=device, callback=callback)
    while True:
        # the backend is set per chunk: a context held across a yield would leak into the caller's code
        with attention_backend(s.attention):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def render(keyframe_network, interpolation_network, bad_network, vae, identity_latent, features,
           **kwargs) -> torch.Tensor:
    """:func:`iter_render` collected into one CPU tensor [N, H, W, 3] (float32, 0..1).

    The output is allocated once, when the first chunk shows the frame size, and filled chunk by
    chunk, so peak memory is the frames themselves plus one chunk (not the frames twice).
    """
    num_frames = _features_parts(features)[0].shape[0]
    out, done = None, 0
    for chunk in iter_render(keyframe_network, interpolation_network, bad_network, vae, identity_latent, features,
                             **kwargs):
        if out is None:
            out = torch.empty((num_frames, *chunk.shape[1:]), dtype=chunk.dtype)
        out[done:done + chunk.shape[0]] = chunk
        done += chunk.shape[0]
    return out


def render_to_file(keyframe_network, interpolation_network, bad_network, vae, identity_latent, features, path, *,
                   audio=None, sample_rate=None, crf: int = DEFAULT_CRF, paste_back=None, **kwargs) -> str:
    """Render one clip straight into an mp4 (H.264 + AAC of ``audio`` [C, S] at ``sample_rate``).

    Always 25 fps: the features have one row per 40 ms frame, so another rate would desync the lips.
    The clip has N frames (the features' rows); the audio track is ``audio`` cut, or padded with
    silence, to exactly N / 25 s (:func:`keyface.video_io.fit_audio_to_frames`). Chunks are encoded
    as they are decoded; the file appears (atomically) only when every frame was written; on an
    error or a cancel (exception from the callback) no file is left behind.
    ``paste_back``: a :class:`keyface.face.paste.FacePaster`; each chunk is pasted back into its
    picture, and the video has the picture's size (see :func:`write_mp4`).
    Returns the path. Other keyword arguments go to :func:`iter_render`.
    """
    kf_audio, _ = _features_parts(features)
    n = int(kf_audio.shape[0])
    check_output(path, audio, sample_rate)  # before the sampling, not after it
    chunks = iter_render(keyframe_network, interpolation_network, bad_network, vae, identity_latent, features,
                         **kwargs)
    return write_mp4(chunks, path, n, audio=audio, sample_rate=sample_rate, crf=crf, paste_back=paste_back)


def check_output(path, audio=None, sample_rate=None):
    """MediaError now if ``path``'s folder is missing or the audio has no rate: Mp4Writer checks these
    too, but only once the first chunk exists, i.e. after the sampling."""
    from .video_io import MediaError

    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise MediaError(f"output folder does not exist: {folder}")
    if audio is not None and (sample_rate is None or int(sample_rate) <= 0):
        raise MediaError(f"audio needs a positive sample_rate, got {sample_rate!r}")


def write_mp4(chunks, path, num_frames: int, *, audio=None, sample_rate=None, crf: int = DEFAULT_CRF,
              paste_back=None) -> str:
    """Encode the frame ``chunks`` ([n, H, W, 3] in 0..1, ``num_frames`` in all) into the mp4 ``path``
    with ``audio`` fitted to exactly num_frames / 25 s; atomic, and nothing is left on an error.
    ``paste_back``: a :class:`keyface.face.paste.FacePaster` (``width`` x ``height`` picture); the
    writer's thread pastes each chunk before encoding it, off the render's thread."""
    from .video_io import MediaError, fit_audio_to_frames

    n = int(num_frames)
    check_output(path, audio, sample_rate)
    if audio is not None:
        audio = fit_audio_to_frames(audio, int(sample_rate), n)
    writer = None
    try:
        for chunk in chunks:
            if writer is None:  # the frame size is the decoder's (or the picture's), known from the first chunk
                writer = mp4_writer(path, chunk.shape[2], chunk.shape[1], paste_back=paste_back, fps=FPS, audio=audio,
                                    sample_rate=sample_rate, num_frames=n, crf=crf)
            writer.write(chunk)
        if writer is None:
            raise MediaError("nothing was rendered")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return os.fspath(path)


def mp4_writer(path, frame_width: int, frame_height: int, *, paste_back=None, **kwargs):
    """A :class:`keyface.video_io.Mp4Writer` for decoded frames of ``frame_width`` x ``frame_height``;
    with ``paste_back`` (a FacePaster), for its picture's size, the writer's thread pasting each
    chunk before encoding it. Other keyword arguments go to the writer."""
    from .video_io import Mp4Writer

    if paste_back is None:
        return Mp4Writer(path, frame_width, frame_height, **kwargs)
    return Mp4Writer(path, paste_back.width, paste_back.height,
                     frame_filter=functools.partial(paste_back.paste_uint8, reuse=True), **kwargs)


__all__ = [
    "ATTENTION_BACKENDS",
    "ProgressEvent",
    "RenderSettings",
    "attention_backend",
    "compiled_unets",
    "check_identity_latent",
    "check_output",
    "decode_keyframe_preview",
    "decode_segments",
    "decode_with_settings",
    "encode_identity",
    "interpolate_segments",
    "interpolation_with_settings",
    "iter_render",
    "keyframes_with_settings",
    "model_latent_size",
    "model_resolution",
    "mp4_writer",
    "prepare_identity",
    "render",
    "render_to_file",
    "sample_clip",
    "sample_keyframes",
    "stage_noise",
    "stage_seed",
    "write_mp4",
]
