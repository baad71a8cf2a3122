"""Render jobs on disk: a render that stops for any reason resumes where it stopped.

A job folder holds everything the sampling stages produced, block by block::

    DIR/job.json                          what the job renders: clip length, settings, input digests
    DIR/keyframes/batch_000000.safetensors        the keyframes of keyframe batch 0 ([k, 4, h, w])
    DIR/interpolation/group_000000.safetensors    segments 0 .. segments_per_call-1 ([g, 14, 4, h, w])
    DIR/.lock                             held (flock) while a render uses the folder

A *block* is one sampler run of the uninterrupted pipeline: one 14-slot keyframe batch, or one group
of ``segments_per_call`` consecutive interpolation segments. Its noise is seeded by its index
(:func:`keyface.pipeline.stage_noise`) and its inputs are only the identity, its keyframes and its audio
rows, so computing the blocks one at a time, in another process, or after a restart gives the very
tensors the uninterrupted :func:`keyface.pipeline.render_to_file` computes, and the same mp4 bytes
(the writer is deterministic: no timestamps in the container). Every block file is written
atomically (temporary file, fsync, rename, fsync of the folder), so a crash leaves either the whole
block or none of it. The decode is not stored: a resumed render decodes (cheap next to sampling) and
encodes the whole mp4 again, straight from the block files, never holding all segments in memory.

Resuming checks ``job.json`` against the new render and refuses, naming what changed, when the
inputs (identity latent, audio features, emotion), the diffusion models (weights digests), the
sampling settings or the compute dtype / device type differ: mixing blocks of two renders would give
a video neither render would make. The decode settings (``chunk_frames``, ``crf``) and the VAE may
change between runs: they only act on the decode, which is always redone.

:func:`render_job` runs the blocks in this process (:class:`LocalRunner`) or on a Ray cluster
(:class:`keyface.ray_render.RayRunner`, optional ``keyface[ray]`` extra); the job folder is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import pipeline as P
from ._files import create_temp_beside
from .planner import WINDOW, ClipPlan, plan_clip

JOB_FILE = "job.json"
JOB_FORMAT = 1
LOCK_FILE = ".lock"
STAGE_DIRS = {P.STAGE_KEYFRAMES: "keyframes", P.STAGE_INTERPOLATION: "interpolation"}
BLOCK_NAMES = {P.STAGE_KEYFRAMES: "batch", P.STAGE_INTERPOLATION: "group"}
# RenderSettings fields that act only on the decode: free to change when a job resumes
DECODE_ONLY_SETTINGS = ("chunk_frames",)
MODEL_NAMES = ("keyframe_model", "interpolation_model", "interpolation_bad_model")


class JobError(ValueError):
    """A job folder that cannot be used for this render (other inputs, in use, damaged)."""


# --------------------------------------------------------------------------------------------------
# Digests: what a job's blocks were computed from
# --------------------------------------------------------------------------------------------------


def _update_with_tensor(h, t: torch.Tensor):
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def digest_tensor(tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    _update_with_tensor(h, torch.as_tensor(tensor))
    return h.hexdigest()


def digest_module(module) -> str:
    """sha256 of a network's state dict (names, dtypes, shapes, bytes): same weights, same digest,
    wherever they were loaded from. ``None`` (e.g. no bad network) digests as "none"."""
    if module is None:
        return "none"
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        _update_with_tensor(h, t)
    return h.hexdigest()


def digest_file(path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 of a model file's bytes and of its sidecar config, if any (both decide the network)."""
    from .model_files import sidecar_path

    h = hashlib.sha256()
    for p in (path, sidecar_path(path)):
        if p is None or not os.path.isfile(p):
            continue
        with open(p, "rb") as f:
            while block := f.read(chunk_bytes):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# The clip a job renders
# --------------------------------------------------------------------------------------------------


@dataclass
class ClipInputs:
    """Everything a block is computed from besides the networks and the settings (CPU tensors)."""

    identity: torch.Tensor  # [1, 4, h, w] scaled latent
    keyframe_audio: torch.Tensor  # [N, 2, F]
    interpolation_audio: torch.Tensor  # [N, 2, F]
    valence: torch.Tensor  # [N] (zeros = neutral)
    arousal: torch.Tensor  # [N]

    @property
    def num_frames(self) -> int:
        return int(self.keyframe_audio.shape[0])

    def digests(self) -> dict:
        return {"identity": digest_tensor(self.identity), "keyframe_features": digest_tensor(self.keyframe_audio),
                "interpolation_features": digest_tensor(self.interpolation_audio),
                "valence": digest_tensor(self.valence), "arousal": digest_tensor(self.arousal)}


def clip_inputs(identity_latent, features, valence=None, arousal=None) -> ClipInputs:
    """Check and gather a render's inputs (same rules as :func:`keyface.pipeline.sample_clip`)."""
    kf_audio, it_audio = P._features_parts(features)
    plan = plan_clip(int(kf_audio.shape[0]))
    P._check_rows("keyframe audio features", kf_audio, plan, dims=3)
    P._check_rows("interpolation audio features", it_audio, plan, dims=3)
    return ClipInputs(identity=P._identity_latent(identity_latent).float().cpu(),
                      keyframe_audio=kf_audio.cpu(), interpolation_audio=it_audio.cpu(),
                      valence=P._emotion(valence, plan, "valence"), arousal=P._emotion(arousal, plan, "arousal"))


def block_members(plan: ClipPlan, segments_per_call: int) -> dict:
    """{stage: [block -> list of batch / segment indices]}: the sampler runs of the uninterrupted
    pipeline, one keyframe batch each, and ``segments_per_call`` consecutive segments per group."""
    segs = list(range(plan.num_segments))
    return {P.STAGE_KEYFRAMES: [[b] for b in range(plan.num_batches)],
            P.STAGE_INTERPOLATION: [segs[i:i + segments_per_call] for i in range(0, len(segs), segments_per_call)]}


def job_settings(settings: P.RenderSettings) -> dict:
    """The settings a job's blocks depend on (everything but the decode's)."""
    return {k: v for k, v in sorted(vars(settings).items()) if k not in DECODE_ONLY_SETTINGS}


# --------------------------------------------------------------------------------------------------
# The job folder
# --------------------------------------------------------------------------------------------------


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its rename is durable enough there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, data: bytes):
    """Write ``data`` to ``path``: temporary file beside it, fsync, rename over it, fsync the folder.
    A crash at any point leaves the old file (or none) and at most a hidden ``.*.tmp`` file."""
    tmp = create_temp_beside(path, ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _describe_changes(old: dict, new: dict) -> list:
    changes = []
    for section in ("num_frames", "latent_size", "inputs", "settings", "compute"):
        a, b = old.get(section), new.get(section)
        if isinstance(b, dict) and isinstance(a, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    if section == "inputs":
                        changes.append(f"{key} (input digest differs)")
                    else:
                        changes.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b:
            changes.append(f"{section}: {a!r} -> {b!r}")
    return changes


class RenderJob:
    """An open job folder (see the module docstring). Use as a context manager: it holds the folder's
    lock so that two renders never write the same job."""

    def __init__(self, folder, description: dict):
        self.folder = os.fspath(folder)
        self.description = description
        canonical = json.dumps(description, sort_keys=True).encode()
        self.job_id = hashlib.sha256(canonical).hexdigest()[:16]
        self._lock_fd = None

    # ---- open / lock ---------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, description: dict) -> "RenderJob":
        """Create the job in ``folder`` (made if missing), or reopen it if it holds the same job.
        JobError naming every difference if it holds another render's job."""
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise JobError(f"job folder {folder} is a file, not a folder")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, JOB_FILE)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError) as err:
                raise JobError(f"job folder {folder}: {JOB_FILE} is unreadable ({err}); delete the folder to "
                               "start over") from err
            if old.get("format") != JOB_FORMAT:
                raise JobError(f"job folder {folder} has job format {old.get('format')!r}, this KeyFace writes "
                               f"{JOB_FORMAT}: use a new folder")
            changes = _describe_changes(old, description)
            if changes:
                raise JobError(f"job folder {folder} holds another render; changed since it started: "
                               f"{'; '.join(changes)}. Run with the same inputs, models and settings to resume it, "
                               "or use a new job folder")
        elif os.listdir(folder) and not set(os.listdir(folder)) <= {LOCK_FILE}:
            raise JobError(f"job folder {folder} is not empty and holds no {JOB_FILE}: give a new or empty folder")
        job = cls(folder, description)
        job._lock()
        try:
            if not os.path.exists(path):
                write_atomically(path, json.dumps(description, indent=1, sort_keys=True).encode())
            for stage_dir in STAGE_DIRS.values():
                os.makedirs(os.path.join(folder, stage_dir), exist_ok=True)
                job._remove_stale_temporaries(os.path.join(folder, stage_dir))
        except BaseException:
            job.close()
            raise
        return job

    def _lock(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; one render per folder is the user's rule
            return
        fd = os.open(os.path.join(self.folder, LOCK_FILE), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JobError(f"job folder {self.folder} is in use by another render (its {LOCK_FILE} is locked)") from None
        self._lock_fd = fd

    @staticmethod
    def _remove_stale_temporaries(folder):
        """Temporary block files of a render that crashed mid-write (we hold the lock: nobody else writes)."""
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- blocks --------------------------------------------------------------------------------
    def block_path(self, stage: str, index: int) -> str:
        return os.path.join(self.folder, STAGE_DIRS[stage], f"{BLOCK_NAMES[stage]}_{int(index):06d}.safetensors")

    def has(self, stage: str, index: int) -> bool:
        return os.path.isfile(self.block_path(stage, index))

    def save(self, stage: str, index: int, latents: torch.Tensor):
        """Store block ``index`` of ``stage`` atomically; JobError (nothing stored) if it is not finite,
        so a NaN block (e.g. a half-precision overflow) is never reused as a finished one."""
        from safetensors.torch import save

        latents = latents.detach().float().cpu().contiguous()
        if not bool(torch.isfinite(latents).all()):
            raise JobError(f"{stage} block {index} has non-finite latents (NaN/inf): the models or the dtype "
                           "overflowed; nothing was stored (try --dtype fp32 or bf16)")
        meta = {"keyface_job": self.job_id, "stage": stage, "index": str(int(index))}
        write_atomically(self.block_path(stage, index), save({"latents": latents}, metadata=meta))

    def load(self, stage: str, index: int, expected_shape: tuple) -> torch.Tensor:
        """Block ``index`` of ``stage``, checked to belong to this job and to have ``expected_shape``."""
        from safetensors import safe_open

        path = self.block_path(stage, index)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                latents = f.get_tensor("latents")
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise JobError(f"job block {path} is unreadable ({err}); delete it and run again to recompute it") from err
        if meta.get("keyface_job") != self.job_id or meta.get("stage") != stage or meta.get("index") != str(index):
            raise JobError(f"job block {path} belongs to another job or block ({meta}); delete it and run again")
        if tuple(latents.shape) != tuple(expected_shape) or latents.dtype != torch.float32:
            raise JobError(f"job block {path} holds {latents.dtype} {tuple(latents.shape)}, expected float32 "
                           f"{tuple(expected_shape)}; delete it and run again")
        return latents


# --------------------------------------------------------------------------------------------------
# Running blocks in this process
# --------------------------------------------------------------------------------------------------


def compute_keyframe_block(networks, clip: ClipInputs, plan: ClipPlan, settings: P.RenderSettings, batch: int, *,
                           device=None, dtype=None, callback=None) -> torch.Tensor:
    """The keyframes of ``batch`` ([k, 4, h, w]), exactly as the uninterrupted render computes them."""
    return P.keyframes_with_settings(networks[0], clip.identity, clip.keyframe_audio, clip.valence, clip.arousal, plan,
                                     settings, device=device, dtype=dtype, callback=callback, batch_indices=[batch])


def compute_segment_block(networks, clip: ClipInputs, keyframes: torch.Tensor, plan: ClipPlan,
                          settings: P.RenderSettings, segments: list, *, device=None, dtype=None,
                          callback=None) -> torch.Tensor:
    """Segments ``segments`` (one group, [g, 14, 4, h, w]) from all keyframes [K, 4, h, w]."""
    return P.interpolation_with_settings(networks[1], networks[2], keyframes, clip.interpolation_audio, plan, settings,
                                         device=device, dtype=dtype, callback=callback, segment_indices=segments)


class LocalRunner:
    """Runs a job's blocks one after the other in this process, on ``networks`` =
    (keyframe, interpolation, bad). ``callback`` gets the sampler's per-step events of each block."""

    reports_steps = True  # run() calls step_callback(block position, event) after every sampler step

    def __init__(self, networks, device=None, dtype=None):
        self.networks = tuple(networks)
        self.device, self.dtype = device, dtype

    def compute_description(self) -> dict:
        device = P._target_device(self.device, self.networks[0])
        weights = next((p.dtype for p in self.networks[0].parameters()), torch.float32)
        return {"device": device.type, "weights": str(weights).replace("torch.", ""),
                "state": str(P._state_dtype(self.dtype)).replace("torch.", "")}

    def model_digests(self) -> dict:
        return {name: digest_module(net) for name, net in zip(MODEL_NAMES, self.networks)}

    def run(self, stage: str, blocks: list, clip: ClipInputs, plan: ClipPlan, settings: P.RenderSettings,
            keyframes=None, step_callback=None) -> Iterator[tuple]:
        """Yield (position in ``blocks``, latents) for each (block index, members) of ``blocks``, in order."""
        with P.attention_backend(settings.attention), P.compiled_unets(self.networks, enabled=settings.compile):
            for pos, (_, members) in enumerate(blocks):
                cb = None if step_callback is None else (lambda ev, pos=pos: step_callback(pos, ev))
                if stage == P.STAGE_KEYFRAMES:
                    out = compute_keyframe_block(self.networks, clip, plan, settings, members[0], device=self.device,
                                                 dtype=self.dtype, callback=cb)
                else:
                    out = compute_segment_block(self.networks, clip, keyframes, plan, settings, members,
                                                device=self.device, dtype=self.dtype, callback=cb)
                yield pos, out

    def close(self):
        pass


# --------------------------------------------------------------------------------------------------
# A whole render through a job folder
# --------------------------------------------------------------------------------------------------


@dataclass
class JobReport:
    """What a :func:`render_job` call did: blocks computed now and blocks reused from the folder."""

    path: str
    job_folder: str
    computed: dict = field(default_factory=dict)  # stage -> blocks computed by this call
    reused: dict = field(default_factory=dict)  # stage -> blocks found finished in the folder

    def summary(self) -> str:
        parts = [f"{stage}: {self.computed.get(stage, 0)} computed, {self.reused.get(stage, 0)} reused"
                 for stage in STAGE_DIRS]
        return "; ".join(parts)


def _stage_events(stage: str, callback, todo: int, nfe: int):
    """Map a runner's per-block events onto one progress bar for the stage (units: sampler steps)."""
    if callback is None:
        return None, (lambda done: None)

    def step(pos, ev):
        callback(P.ProgressEvent(stage, pos * nfe + ev.step, todo * nfe, pos, todo))

    def block_done(done):
        callback(P.ProgressEvent(stage, done * nfe, todo * nfe, done - 1, todo))

    return step, block_done


def _run_stage(job: RenderJob, runner, stage: str, blocks: list, shape_of: Callable, clip, plan, settings, nfe,
               callback, report: JobReport, keyframes=None):
    todo = [(i, members) for i, members in enumerate(blocks) if not job.has(stage, i)]
    report.reused[stage] = len(blocks) - len(todo)
    report.computed[stage] = 0
    # per-step events where they are cheap to get (this process); a remote runner's are per block
    step, block_done = _stage_events(stage, callback, len(todo), nfe)
    local = runner.reports_steps
    for pos, latents in runner.run(stage, todo, clip, plan, settings, keyframes=keyframes,
                                   step_callback=step if local else None):
        index, members = todo[pos]
        if tuple(latents.shape) != shape_of(members):
            raise JobError(f"{stage} block {index}: the runner returned {tuple(latents.shape)}, expected "
                           f"{shape_of(members)}")
        job.save(stage, index, latents)
        report.computed[stage] += 1
        if not local:
            block_done(pos + 1)


def _all_keyframes(job: RenderJob, plan: ClipPlan, blocks: list, hw) -> torch.Tensor:
    parts = [job.load(P.STAGE_KEYFRAMES, i, (len(plan.batch_keyframes(members[0])), P.LATENT_CHANNELS, *hw))
             for i, members in enumerate(blocks)]
    return torch.cat(parts)


def _segment_reader(job: RenderJob, groups: list, hw):
    """``s -> [14, 4, h, w]`` read from the group files; keeps one group in memory (decode asks in order)."""
    group_of = {s: g for g, members in enumerate(groups) for s in members}
    cache = {}

    def segment(s):
        g = group_of[s]
        if g not in cache:
            cache.clear()
            cache[g] = job.load(P.STAGE_INTERPOLATION, g, (len(groups[g]), WINDOW, P.LATENT_CHANNELS, *hw))
        return cache[g][groups[g].index(s)]

    return segment


def job_description(clip: ClipInputs, settings: P.RenderSettings, model_digests: dict, compute: dict) -> dict:
    return {"format": JOB_FORMAT, "num_frames": clip.num_frames, "latent_size": list(clip.identity.shape[-2:]),
            "inputs": {**clip.digests(), **model_digests}, "settings": job_settings(settings), "compute": compute}


def render_job(folder, vae, identity_latent, features, path, *, networks=None, runner=None, model_digests=None,
               valence=None, arousal=None, settings: P.RenderSettings | None = None, device=None, dtype=None,
               audio=None, sample_rate=None, crf: int = P.DEFAULT_CRF, callback: Callable | None = None,
               paste_back=None, **overrides) -> JobReport:
    """Render one clip into the mp4 ``path`` through the job folder ``folder``: the blocks already in
    the folder are reused, the others computed (and stored as they finish), then the mp4 is decoded
    and encoded from the stored blocks. Same result, byte for byte, as
    :func:`keyface.pipeline.render_to_file` with the same arguments, however often it was interrupted.

    ``networks`` (keyframe, interpolation, bad) run the blocks here (``device`` / ``dtype`` as in
    :func:`keyface.pipeline.sample_keyframes`); or give a ``runner`` (:class:`keyface.ray_render.RayRunner`).
    ``model_digests``: {"keyframe_model", "interpolation_model", "interpolation_bad_model"} -> digest
    (default: :func:`digest_module` of ``networks``; the CLI uses :func:`digest_file`). The ``vae``
    decodes on ``device``. ``callback(ProgressEvent)``: as in render_to_file; an exception from it
    stops the render, keeps the finished blocks and leaves no mp4. ``paste_back``: a FacePaster, as in
    render_to_file (not part of the job's identity). JobError if the folder holds
    another render (naming what changed) or is in use.
    """
    s = P._render_settings(settings, overrides)
    clip = clip_inputs(identity_latent, features, valence, arousal)
    plan = plan_clip(clip.num_frames)
    P.check_output(path, audio, sample_rate)
    if runner is None:
        if networks is None:
            raise ValueError("render_job needs the networks (keyframe, interpolation, bad) or a runner")
        runner = LocalRunner(networks, device=device, dtype=dtype)
        P.check_identity_latent(clip.identity, networks[1])
    if model_digests is None:
        model_digests = runner.model_digests()
    description = job_description(clip, s, model_digests, runner.compute_description())
    hw = tuple(clip.identity.shape[-2:])
    blocks = block_members(plan, s.segments_per_call)
    report = JobReport(path=os.fspath(path), job_folder=os.fspath(folder))
    with RenderJob.open(folder, description) as job:
        nfe_kf = len(P.ays_sigmas(s.keyframe_steps)) - 1
        nfe_it = len(P.ays_sigmas(s.interpolation_steps)) - 1
        _run_stage(job, runner, P.STAGE_KEYFRAMES, blocks[P.STAGE_KEYFRAMES],
                   lambda m: (len(plan.batch_keyframes(m[0])), P.LATENT_CHANNELS, *hw), clip, plan, s, nfe_kf,
                   callback, report)
        keyframes = _all_keyframes(job, plan, blocks[P.STAGE_KEYFRAMES], hw)
        _run_stage(job, runner, P.STAGE_INTERPOLATION, blocks[P.STAGE_INTERPOLATION],
                   lambda m: (len(m), WINDOW, P.LATENT_CHANNELS, *hw), clip, plan, s, nfe_it, callback, report,
                   keyframes=keyframes)
        del keyframes
        segments = _segment_reader(job, blocks[P.STAGE_INTERPOLATION], hw)
        chunks = P.decode_with_settings(vae, segments, plan, s, device=device, callback=callback)
        P.write_mp4(chunks, path, plan.num_frames, audio=audio, sample_rate=sample_rate, crf=crf,
                    paste_back=paste_back)
    return report


__all__ = [
    "ClipInputs",
    "JobError",
    "JobReport",
    "LocalRunner",
    "RenderJob",
    "block_members",
    "clip_inputs",
    "compute_keyframe_block",
    "compute_segment_block",
    "digest_file",
    "digest_module",
    "digest_tensor",
    "render_job",
    "write_atomically",
]
