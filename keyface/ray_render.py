"""Distributed rendering on Ray (optional extra: ``pip install "keyface[ray]"``).

:class:`RayRunner` plugs into :func:`keyface.jobs.render_job`: the job's blocks (keyframe batches,
then interpolation segment groups) run as Ray actor tasks. Each actor (:class:`BlockWorker`) loads
the three diffusion networks once, on its own GPU (``num_gpus=1``) or CPU cores, and keeps them for
every block it is given. Results come back in block order (``ray.util.ActorPool.map``, at most one
block in flight per actor), are stored in the job folder as they arrive, and the driver decodes the
mp4 from the job folder chunk by chunk: its memory does not grow with the clip beyond the clip-sized
inputs it already holds (features, keyframes).

The clip's inputs go into Ray's object store once per stage (``ray.put``), and every actor fetches
them once (cached by object id), not once per block. A block's result is exactly the tensor
:func:`keyface.jobs.compute_keyframe_block` / ``compute_segment_block`` computes in one process,
given the same device, dtype and thread count, so a Ray render writes the same mp4 bytes.

Faults: actors restart without limit and their tasks are retried (``max_restarts=-1``,
``max_task_retries=-1``): a worker process that dies mid-block is replaced (it reloads the models)
and the block is recomputed; finished blocks are already in the job folder. If the driver itself
stops, run the same command again: the job resumes.

Nothing here imports ray at module import; the ComfyUI pack never imports this module.
"""

from __future__ import annotations

import functools
import os

import torch

from . import jobs as J
from . import pipeline as P

INSTALL_HINT = 'Ray is not installed: pip install "keyface[ray]" (or pip install "ray>=2.40")'


def import_ray():
    """The ``ray`` module, or ImportError with the install command."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return ray


# --------------------------------------------------------------------------------------------------
# Loading the networks inside a worker
# --------------------------------------------------------------------------------------------------


def worker_device(use_gpu: bool) -> torch.device:
    """The device of a worker: its GPU (Ray sets CUDA_VISIBLE_DEVICES to the one it granted) or the CPU."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("this Ray worker was granted a GPU but torch sees no CUDA device")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def load_networks_from_files(found: dict, dtype_name: str | None, device: torch.device):
    """(keyframe, interpolation, bad) from a models folder's paths (``model_files.find_models``), in the
    CLI's dtype policy (``dtype_name`` None: fp16 on CUDA, fp32 elsewhere). The paths must exist on
    every node (a shared or copied models folder)."""
    from .engines import load_interpolation_networks, load_keyframe_network

    dtype = weight_dtype(dtype_name, device)
    keyframe = load_keyframe_network(found["keyframe"], dtype=dtype, device=device)
    good, bad = load_interpolation_networks(found["interpolation"], found["interpolation_bad"], dtype=dtype,
                                            device=device)
    return keyframe, good, bad


def weight_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The UNet weight dtype of a ``--dtype`` name (None: fp16 on CUDA, fp32 elsewhere)."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class BlockWorker:
    """A Ray actor (``ray.remote`` is applied in :class:`RayRunner`, so this module imports without
    ray) holding the three networks; computes one block per call."""

    def __init__(self, load_networks, use_gpu: bool, threads: int, state_dtype=None):
        torch.set_num_threads(max(1, int(threads)))
        self.device = worker_device(use_gpu)
        self.local = J.LocalRunner(load_networks(self.device), device=self.device, dtype=state_dtype)
        self._cache = {}  # object id -> value: the clip / keyframes, fetched once per job stage

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        return {"compute": self.local.compute_description(), "models": self.local.model_digests(),
                "resolution": P.model_resolution(self.local.networks[1])}

    def _get(self, box):
        """The value of the ObjectRef in ``box`` (a list, so Ray does not resolve it per call)."""
        import ray

        ref = box[0]
        key = ref.hex()
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = ray.get(ref)
        return self._cache[key]

    def keyframe_block(self, clip_box, num_frames: int, settings, batch: int) -> torch.Tensor:
        clip = self._get(clip_box)
        return self._in_context(settings, J.compute_keyframe_block, self.local.networks, clip,
                                P.plan_clip(num_frames), settings, batch, device=self.device, dtype=self.local.dtype)

    def segment_block(self, clip_box, keyframes_box, num_frames: int, settings, segments: list) -> torch.Tensor:
        clip, keyframes = self._get(clip_box), self._get(keyframes_box)
        return self._in_context(settings, J.compute_segment_block, self.local.networks, clip, keyframes,
                                P.plan_clip(num_frames), settings, segments, device=self.device,
                                dtype=self.local.dtype)

    def _in_context(self, settings, fn, *args, **kwargs):
        with P.attention_backend(settings.attention), P.compiled_unets(self.local.networks, enabled=settings.compile):
            return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------


def _cluster_gpus(ray) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


class RayRunner:
    """Runs a job's blocks on Ray actors; pass it to :func:`keyface.jobs.render_job` as ``runner``.

    ``load_networks(device) -> (keyframe, interpolation, bad)``: picklable (e.g. a
    ``functools.partial`` of :func:`load_networks_from_files`); runs once in every actor.
    ``address``: None or "local" starts a private Ray on this machine (``ray.init()``, stopped by
    :meth:`close`); "auto" or "HOST:PORT" / "ray://HOST:10001" joins a running cluster (``ray start``).
    ``num_workers``: actors (default: one per GPU of the cluster if it has GPUs, else one per
    ``cpus_per_worker`` CPUs). ``gpus_per_worker``: default 1 if the cluster has GPUs, else 0.
    ``num_cpus``: CPUs of a private local Ray (default: all). ``state_dtype``: sampler state dtype
    (as ``dtype`` of :func:`keyface.pipeline.sample_keyframes`).
    """

    reports_steps = False  # progress comes per finished block

    def __init__(self, load_networks, *, address=None, num_workers: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: int = 1, num_cpus: int | None = None,
                 state_dtype=None, ship_package: bool | None = None):
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            local = address in (None, "local")
            init = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
            if local:
                init["num_cpus"] = num_cpus
            # a remote cluster may not have this package installed: ship it with the job
            if ship_package if ship_package is not None else not local:
                init["runtime_env"] = {"py_modules": [os.path.dirname(os.path.abspath(__file__))]}
            ray.init(address=None if local else address, **init)
            self._started = True
        try:
            gpus = _cluster_gpus(ray)
            if gpus_per_worker is None:
                gpus_per_worker = 1 if gpus else 0
            if num_workers is None:
                cpus = int(ray.cluster_resources().get("CPU", 1))
                num_workers = int(gpus // gpus_per_worker) if gpus_per_worker else max(1, cpus // cpus_per_worker)
            if int(num_workers) < 1:
                raise ValueError(f"Ray workers: need at least 1, got {num_workers} (GPUs in the cluster: {gpus})")
            actor = ray.remote(BlockWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                    max_restarts=-1, max_task_retries=-1)
            self.actors = [actor.remote(load_networks, bool(gpus_per_worker), cpus_per_worker, state_dtype)
                           for _ in range(int(num_workers))]
            # every worker must agree (same models, dtype, device type): a mixed cluster would mix results
            described = ray.get([a.describe.remote() for a in self.actors])
            if any(d != described[0] for d in described[1:]):
                raise ValueError(f"Ray workers differ in models, dtype or device: {described}")
            self._description = described[0]
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    def compute_description(self) -> dict:
        return dict(self._description["compute"])

    def model_digests(self) -> dict:
        return dict(self._description["models"])

    def resolution(self) -> tuple:
        return tuple(self._description["resolution"])

    def worker_pids(self) -> list:
        return self._ray.get([a.pid.remote() for a in self.actors])

    def run(self, stage: str, blocks: list, clip, plan, settings, keyframes=None, step_callback=None):
        """Yield (position in ``blocks``, latents) in block order, computed on the actors."""
        from ray.util import ActorPool

        if not blocks:
            return
        ray = self._ray
        clip_box = [ray.put(clip)]
        if stage == P.STAGE_KEYFRAMES:
            def submit(actor, block):
                return actor.keyframe_block.remote(clip_box, plan.num_frames, settings, block[1][0])
        else:
            keyframes_box = [ray.put(keyframes)]

            def submit(actor, block):
                return actor.segment_block.remote(clip_box, keyframes_box, plan.num_frames, settings, block[1])
        yield from enumerate(ActorPool(self.actors).map(submit, blocks))

    def close(self):
        """Stop the actors (and the private local Ray this runner started)."""
        for a in getattr(self, "actors", []):
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def files_runner(found: dict, dtype_name: str | None = None, **kwargs) -> RayRunner:
    """A :class:`RayRunner` whose workers load the models folder's files (the CLI's ``--ray``)."""
    return RayRunner(functools.partial(load_networks_from_files, dict(found), dtype_name), **kwargs)


__all__ = ["BlockWorker", "INSTALL_HINT", "RayRunner", "files_runner", "import_ray", "load_networks_from_files",
           "weight_dtype", "worker_device"]
