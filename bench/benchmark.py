"""Benchmark: cost per second of output video, peak memory, speed knobs, pack import time.

``python -m bench [--mode count run knobs import] [--seconds 5 20 60] [--out-dir bench/results]``

Modes (each prints a table and writes ``<out-dir>/<mode>[_<device>].json``):

* **count** (any machine, no weights): runs the real clip pipeline (:func:`keyface.pipeline.iter_render`:
  planner, conditioning, guidance denoisers, Euler sampler, engine wrappers, decode/merge) at the
  RELEASED tensor sizes (64x64 latents, 1536-d features, 1024-d context) with the two UNet bodies and
  the VAE decoder body replaced by shape-correct stubs, and counts what reaches them through forward
  pre-hooks: UNet calls and frame-evaluations (rows) per network, decoder calls and frames, decodes
  during the sampling stages. FLOPs per unit come from ``torch.utils.flop_counter.FlopCounterMode``
  on the real released-size modules built on the ``meta`` device (one call each at the released call
  shape, full size: nothing is scaled), so FLOPs per second = counts x FLOPs per unit. The numbers are
  set next to the original's (spec 8.2).
* **run**: wall time per output second and peak memory, one fresh subprocess per (clip length,
  output kind) so that the process peak RSS (``VmHWM``) belongs to that render only: frames returned
  as one tensor (:func:`keyface.pipeline.render`) and frames streamed into an mp4
  (:func:`keyface.pipeline.render_to_file`). CPU: the tiny random models of :mod:`keyface.smoke`.
  CUDA (when available): full-size random-weight networks in bf16 and fp16 (VAE in fp32, as
  released), plus ``torch.cuda.max_memory_allocated``.
* **knobs**: speed knobs on the tiny models (one clip length): sampling steps, autoguidance off,
  weight dtype, segments per call, SDPA backend, the last-step approximation (see
  ``guidance_min_sigma``), and (``--compile``) ``torch.compile`` of the UNets; for each the
  wall time per output second, the UNet frame-evaluations, and the max abs difference of the
  latents and of the final uint8 frames against the default settings.
* **import**: time to import the pack's root ``__init__.py`` the way ComfyUI does (package under a
  mangled name, torch already imported), and which heavy modules it pulls in.

Audio encoders and the identity encode are not part of the timings (features and the identity
latent are random inputs of the right shapes); spec 8.2 puts them at ~0 of the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # bench/ is a folder of the source checkout

# The original's cost per output second (spec 8.1 / 8.2, steady state).
ORIGINAL = {
    "keyframe_frame_evals_per_s": 68.3,
    "interpolation_frame_evals_per_s": 592.0,
    "unet_frame_evals_per_s": 660.6,
    "keyframe_calls_per_s": 1.63,
    "interpolation_calls_per_s": 21.2,
    "decoder_frames_per_s": 29.0,
    "decoder_frames_wasted_per_s": 2.07,
    "unet_tflop_per_frame_eval": 1.315,
    "decoder_tflop_per_frame": 3.04,
    "pflop_per_s": 0.957,
}
TARGET_FRAME_EVALS_PER_S = 640.0
from keyface.diffusion import UNGUIDED_LAST_STEP_SIGMA as LAST_STEP_SIGMA  # noqa: E402  (the knob's "last step only" value)
from keyface.planner import FPS  # noqa: E402


# ==================================================================================================
# Closed form (the released batching, from the planner)
# ==================================================================================================


def _clip_frames(seconds: float) -> int:
    """Frames of a bench clip of ``seconds`` (at least one)."""
    return max(1, round(seconds * FPS))


def closed_form(num_frames: int, steps: int = 10, autoguidance: bool = True, segments_per_call: int = 2,
                last_step_good_only: bool = False, last_step_full_only: bool = False) -> dict:
    """UNet/decoder counts the pipeline must produce for a clip of ``num_frames``, derived from the plan
    and the documented batching (spec 5.4 / 5.5): keyframe batches of 14 slots x 3 branches in one call
    per step; interpolation ``segments_per_call`` segments per call per network per step; one decode
    per (segment, local frame) that reaches an output frame."""
    from keyface.diffusion import ays_sigmas
    from keyface.planner import WINDOW, plan_clip

    plan = plan_clip(int(num_frames))
    nfe = len(ays_sigmas(steps)) - 1
    b, s = plan.num_batches, plan.num_segments
    kf_rows = b * WINDOW * 3 * nfe
    if last_step_full_only:
        kf_rows -= b * WINDOW * 2
    nets = 2 if autoguidance else 1
    it_rows = s * WINDOW * nets * nfe
    groups = math.ceil(s / segments_per_call)
    it_calls = groups * nets * nfe
    if autoguidance and last_step_good_only:
        it_rows -= s * WINDOW
        it_calls -= groups
    decodes = sum(len(plan.frame_sources(t)) for t in range(plan.num_frames))
    return {
        "num_frames": plan.num_frames,
        "keyframes": plan.num_keyframes,
        "keyframe_batches": b,
        "segments": s,
        "nfe": nfe,
        "keyframe_frame_evals": kf_rows,
        "keyframe_calls": b * nfe,
        "interpolation_frame_evals": it_rows,
        "interpolation_calls": it_calls,
        "unet_frame_evals": kf_rows + it_rows,
        "decoder_frames": decodes,
    }


def steady_state(steps: int = 10, autoguidance: bool = True, last_step_good_only: bool = False,
                 last_step_full_only: bool = False) -> dict:
    """Per output second for an infinitely long clip: 25/13 keyframes and segments per second."""
    from keyface.diffusion import ays_sigmas

    nfe = len(ays_sigmas(steps)) - 1
    per_s = FPS / 13.0
    kf = per_s * 14 / 13 * (3 * nfe - (2 if last_step_full_only else 0))
    it = per_s * 14 * ((2 if autoguidance else 1) * nfe - (1 if autoguidance and last_step_good_only else 0))
    return {
        "keyframe_frame_evals_per_s": kf,
        "interpolation_frame_evals_per_s": it,
        "unet_frame_evals_per_s": kf + it,
        "decoder_frames_per_s": FPS * 14 / 13,  # every output frame + the second decode of shared keyframes
    }


# ==================================================================================================
# Instrumentation
# ==================================================================================================


class Counter:
    """Counts what reaches the UNet bodies and the VAE decoder body (forward pre-hooks)."""

    def __init__(self):
        self.unet = {}  # name -> {"calls", "rows", "max_rows", "rows_hist"}
        self.decoder = {"calls": 0, "rows": 0, "max_rows": 0, "frames_per_video": set()}
        self.decoder_rows_during_keyframes = 0
        self.chunks = {"count": 0, "max_frames": 0, "devices": set()}
        self._handles = []

    def watch_unet(self, module, name: str):
        rec = self.unet.setdefault(name, {"calls": 0, "rows": 0, "max_rows": 0, "rows_hist": {}})

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["x"]
            rows = int(x.shape[0])
            rec["calls"] += 1
            rec["rows"] += rows
            rec["max_rows"] = max(rec["max_rows"], rows)
            rec["rows_hist"][rows] = rec["rows_hist"].get(rows, 0) + 1

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def watch_decoder(self, module):
        rec = self.decoder

        def hook(mod, args, kwargs):
            z = args[0] if args else kwargs["z"]
            t = kwargs.get("timesteps", args[1] if len(args) > 1 else 1)
            rows = int(z.shape[0])
            rec["calls"] += 1
            rec["rows"] += rows
            rec["max_rows"] = max(rec["max_rows"], rows)
            rec["frames_per_video"].add(int(t))

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def progress(self, event):
        """Use as the pipeline callback: remembers how many frames were decoded while the keyframes
        were sampled (a keyframe preview; the interpolation groups and the decode alternate)."""
        from keyface.pipeline import STAGE_KEYFRAMES

        if event.stage == STAGE_KEYFRAMES:
            self.decoder_rows_during_keyframes = self.decoder["rows"]

    def chunk(self, chunk):
        self.chunks["count"] += 1
        self.chunks["max_frames"] = max(self.chunks["max_frames"], int(chunk.shape[0]))
        self.chunks["devices"].add(str(chunk.device))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def unet_total(self, key="rows"):
        return sum(r[key] for r in self.unet.values())

    def summary(self) -> dict:
        return {
            "unet": {k: {**v, "rows_hist": {str(r): n for r, n in sorted(v["rows_hist"].items())}}
                     for k, v in self.unet.items()},
            "decoder": {**self.decoder, "frames_per_video": sorted(self.decoder["frames_per_video"])},
            "decoder_rows_during_keyframes": self.decoder_rows_during_keyframes,
            "chunks": {**self.chunks, "devices": sorted(self.chunks["devices"])},
        }


def _watch_models(counter, kf, good, bad, vae):
    counter.watch_unet(kf.diffusion_model, "keyframe")
    counter.watch_unet(good.diffusion_model, "interpolation_good")
    if bad is not None:
        counter.watch_unet(bad.diffusion_model, "interpolation_bad")
    counter.watch_decoder(vae.decoder)


# ==================================================================================================
# Count mode
# ==================================================================================================


def _stub_models(latent_hw=(64, 64), feature_dim=1536, seed=0):
    """Released-size engine wrappers (audio projection 1536 -> 1024, learned mask 4x64x64) whose
    UNet bodies and VAE decoder body are cheap shape-correct stubs (zeros out)."""
    import torch
    from torch import nn

    from keyface.config import INTERPOLATION_UNET, KEYFRAME_UNET
    from keyface.engines import InterpolationNetwork, KeyframeNetwork
    from keyface.vae import VAE

    class StubUNet(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg

        def forward(self, x, timesteps, context, y=None, num_video_frames=14):
            rows = x.shape[0]
            if x.shape[1] != self.cfg.in_channels:
                raise ValueError(f"stub UNet: {x.shape[1]} input channels, expected {self.cfg.in_channels}")
            if context.shape[0] * num_video_frames != rows or context.shape[-1] != self.cfg.context_dim:
                raise ValueError(f"stub UNet: context {tuple(context.shape)} for {rows} rows")
            if (y is None) != (self.cfg.adm_in_channels == 0):
                raise ValueError("stub UNet: y given/missing against the config")
            return x.new_zeros(rows, self.cfg.out_channels, *x.shape[-2:])

    class StubDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = nn.Conv2d(4, 1, 1)  # VAE._prepare reads conv_in.weight.dtype

        def forward(self, z, timesteps=1):
            if z.shape[0] % timesteps:
                raise ValueError("stub decoder: rows not a multiple of timesteps")
            return z.new_zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1])

    gen = torch.Generator().manual_seed(seed)

    def finish(net, cfg):
        net.diffusion_model = StubUNet(cfg)
        net.to_empty(device="cpu")
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        return net.eval().requires_grad_(False)

    kf = finish(KeyframeNetwork(KEYFRAME_UNET, feature_dim, device="meta"), KEYFRAME_UNET)
    good = finish(InterpolationNetwork(INTERPOLATION_UNET, latent_hw, 4, feature_dim, device="meta"), INTERPOLATION_UNET)
    bad = finish(InterpolationNetwork(INTERPOLATION_UNET, latent_hw, 4, None, device="meta"), INTERPOLATION_UNET)
    vae = VAE(device="meta")
    vae.decoder = StubDecoder()
    vae = vae.eval().requires_grad_(False)
    return kf, good, bad, vae


def count_clip(num_frames: int, *, models=None, **settings) -> dict:
    """Run the real pipeline (stub network bodies, released sizes) on a clip of ``num_frames`` and
    return the instrumented counts plus the closed form for the same settings."""
    import torch

    from keyface import pipeline as P

    kf, good, bad, vae = models or _stub_models()
    counter = Counter()
    _watch_models(counter, kf, good, bad, vae)
    n = int(num_frames)
    features, z_id = random_inputs(n, good, kf)  # the stub bodies make the counts independent of the values
    frames = 0
    try:
        with torch.inference_mode():
            for chunk in P.iter_render(kf, good, bad, vae, z_id, features, callback=counter.progress, **settings):
                counter.chunk(chunk)
                frames += int(chunk.shape[0])
    finally:
        counter.remove()
    s = counter.summary()
    seconds = n / FPS
    kf_rows = s["unet"]["keyframe"]["rows"]
    it_rows = s["unet"]["interpolation_good"]["rows"] + s["unet"].get("interpolation_bad", {}).get("rows", 0)
    it_calls = s["unet"]["interpolation_good"]["calls"] + s["unet"].get("interpolation_bad", {}).get("calls", 0)
    unguided_last_step = settings.get("guidance_min_sigma", 0.0) >= LAST_STEP_SIGMA
    cf = closed_form(n, steps=settings.get("interpolation_steps", 10),
                     autoguidance=settings.get("autoguidance", True),
                     segments_per_call=settings.get("segments_per_call", 2),
                     last_step_good_only=unguided_last_step, last_step_full_only=unguided_last_step)
    needed = cf["decoder_frames"]  # depends on the plan only, not on the sampling settings
    return {
        "seconds": seconds,
        "num_frames": n,
        "frames_out": frames,
        "settings": settings,
        "unguided_last_step": unguided_last_step,
        "measured": {
            "keyframe_calls": s["unet"]["keyframe"]["calls"],
            "keyframe_frame_evals": kf_rows,
            "interpolation_calls": it_calls,
            "interpolation_frame_evals": it_rows,
            "unet_calls": counter.unet_total("calls"),
            "unet_frame_evals": kf_rows + it_rows,
            "unet_max_rows_per_call": {k: v["max_rows"] for k, v in s["unet"].items()},
            "unet_rows_per_call": {k: v["rows_hist"] for k, v in s["unet"].items()},
            "decoder_calls": s["decoder"]["calls"],
            "decoder_frames": s["decoder"]["rows"],
            "decoder_frames_needed": needed,
            "decoder_frames_wasted": s["decoder"]["rows"] - needed,
            "decoder_frames_during_keyframes": s["decoder_rows_during_keyframes"],
            "decoder_max_frames_per_call": s["decoder"]["max_rows"],
            "decoder_frames_per_video": s["decoder"]["frames_per_video"],
            "output_chunks": s["chunks"]["count"],
            "output_chunk_max_frames": s["chunks"]["max_frames"],
            "output_chunk_devices": s["chunks"]["devices"],
        },
        "closed_form": cf,
        "per_second": {
            "keyframe_frame_evals": kf_rows / seconds,
            "interpolation_frame_evals": it_rows / seconds,
            "unet_frame_evals": (kf_rows + it_rows) / seconds,
            "keyframe_calls": s["unet"]["keyframe"]["calls"] / seconds,
            "interpolation_calls": it_calls / seconds,
            "decoder_frames": s["decoder"]["rows"] / seconds,
            "decoder_frames_wasted": (s["decoder"]["rows"] - needed) / seconds,
        },
    }


def measure_flops() -> dict:
    """FLOPs per unit at the released sizes: FlopCounterMode on the real modules built on ``meta``,
    one call each at the released call shape (keyframe 42 rows = 3 branches x 14, interpolation 28
    rows = 2 segments x 14, decoder 1 frame of 64x64 latent -> 512x512). FLOPs = 2 x MAC, attention
    matmuls included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from keyface.engines import build_interpolation_network, build_keyframe_network
    from keyface.vae import VAE

    def count(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
        return fc.get_total_flops(), by_op

    meta = torch.device("meta")
    out = {}
    kf = build_keyframe_network(device=meta).diffusion_model
    total, ops = count(lambda: kf(torch.empty(42, 8, 64, 64, device=meta), torch.empty(42, device=meta),
                                  torch.empty(3, 14, 1024, device=meta), y=torch.empty(42, 512, device=meta),
                                  num_video_frames=14))
    out["keyframe_unet_per_frame_eval"] = {"flops": total / 42, "by_op": {k: v / 42 for k, v in ops.items()}}
    del kf
    it = build_interpolation_network(device=meta).diffusion_model
    total, ops = count(lambda: it(torch.empty(28, 9, 64, 64, device=meta), torch.empty(28, device=meta),
                                  torch.empty(2, 14, 1024, device=meta), y=None, num_video_frames=14))
    out["interpolation_unet_per_frame_eval"] = {"flops": total / 28, "by_op": {k: v / 28 for k, v in ops.items()}}
    del it
    vae = VAE(device=meta)
    total, ops = count(lambda: vae.decoder(torch.empty(1, 4, 64, 64, device=meta), timesteps=1))
    out["decoder_per_frame"] = {"flops": total, "by_op": ops}
    out["method"] = ("torch.utils.flop_counter.FlopCounterMode on the released-size modules built on the meta device, "
                     "one call at the released call shape each, nothing scaled")
    return out


def run_count(seconds_list, out_dir, flops=True) -> dict:
    t0 = time.perf_counter()
    models = _stub_models()
    rows = []
    for sec in seconds_list:
        n = _clip_frames(sec)
        exact = count_clip(n, models=models)
        approx = count_clip(n, models=models, guidance_min_sigma=LAST_STEP_SIGMA)
        rows.append({"exact": exact, "approx_unguided_last_step": approx})
    fl = measure_flops() if flops else None
    result = {
        "mode": "count",
        "machine": machine_info(),
        "what": ("real pipeline (keyface.pipeline.iter_render) at released tensor sizes with stub UNet/decoder "
                 "bodies; counts from forward pre-hooks on the network bodies"),
        "original": ORIGINAL,
        "target_unet_frame_evals_per_s": TARGET_FRAME_EVALS_PER_S,
        "steady_state": {
            "exact_released": steady_state(),
            "approx_interpolation_last_step_good_only": steady_state(last_step_good_only=True),
            "approx_both_last_step": steady_state(last_step_good_only=True, last_step_full_only=True),
        },
        "clips": rows,
        "flops": fl,
        "bench_seconds": time.perf_counter() - t0,
    }
    if fl:
        fu = fl["interpolation_unet_per_frame_eval"]["flops"]
        fk = fl["keyframe_unet_per_frame_eval"]["flops"]
        fd = fl["decoder_per_frame"]["flops"]
        for r in rows:
            for v in r.values():
                p = v["per_second"]
                v["per_second"]["tflop"] = (p["keyframe_frame_evals"] * fk + p["interpolation_frame_evals"] * fu
                                            + p["decoder_frames"] * fd) / 1e12
        ss = result["steady_state"]["exact_released"]
        ss["tflop"] = (ss["keyframe_frame_evals_per_s"] * fk + ss["interpolation_frame_evals_per_s"] * fu
                       + ss["decoder_frames_per_s"] * fd) / 1e12
    _write(out_dir, "count.json", result)
    print(format_count(result))
    return result


def format_count(r) -> str:
    o = r["original"]
    lines = ["", "COUNT MODE: per output second, released sizes (real pipeline code, stub network bodies)", ""]
    hdr = f"{'':34s}{'original':>10s}{'steady':>10s}" + "".join(
        f"{c['exact']['seconds']:>9.0f}s" for c in r["clips"])
    lines.append(hdr)
    ss = r["steady_state"]["exact_released"]

    def row(label, orig, steady, key, fmt="{:>10.1f}"):
        cells = [fmt.format(c["exact"]["per_second"][key]) for c in r["clips"]]
        o_s = f"{orig:>10.2f}" if isinstance(orig, float) else f"{str(orig):>10s}"
        s_s = f"{steady:>10.2f}" if isinstance(steady, float) else f"{str(steady):>10s}"
        lines.append(f"{label:34s}{o_s}{s_s}" + "".join(cells))

    row("keyframe UNet frame-evals/s", o["keyframe_frame_evals_per_s"], ss["keyframe_frame_evals_per_s"],
        "keyframe_frame_evals")
    row("interpolation UNet frame-evals/s", o["interpolation_frame_evals_per_s"],
        ss["interpolation_frame_evals_per_s"], "interpolation_frame_evals")
    row("UNet frame-evals/s (total)", o["unet_frame_evals_per_s"], ss["unet_frame_evals_per_s"], "unet_frame_evals")
    row("keyframe UNet calls/s", o["keyframe_calls_per_s"], FPS / 169 * 11, "keyframe_calls", "{:>10.2f}")
    row("interpolation UNet calls/s", o["interpolation_calls_per_s"], FPS / 13 / 2 * 2 * 11,
        "interpolation_calls", "{:>10.2f}")
    row("VAE decoder frames/s", o["decoder_frames_per_s"], ss["decoder_frames_per_s"], "decoder_frames", "{:>10.2f}")
    row("  of which wasted", o["decoder_frames_wasted_per_s"], 0.0, "decoder_frames_wasted", "{:>10.2f}")
    if "tflop" in ss:
        row("TFLOP/s of video", o["pflop_per_s"] * 1000, ss["tflop"], "tflop")
    ap = r["steady_state"]["approx_both_last_step"]
    cells = "".join(f"{c['approx_unguided_last_step']['per_second']['unet_frame_evals']:>10.1f}" for c in r["clips"])
    lines.append(f"{'APPROX unguided last step, evals/s':34s}{'-':>10s}{ap['unet_frame_evals_per_s']:>10.2f}{cells}")
    lines.append("")
    for c in r["clips"]:
        m, cf = c["exact"]["measured"], c["exact"]["closed_form"]
        lines.append(
            f"{c['exact']['seconds']:.0f} s (N={c['exact']['num_frames']}): {cf['keyframes']} keyframes in "
            f"{cf['keyframe_batches']} batches, {cf['segments']} segments; UNet {m['unet_calls']} calls / "
            f"{m['unet_frame_evals']} frame-evals (closed form {cf['unet_frame_evals']}); rows per call "
            f"{m['unet_rows_per_call']}; decoder {m['decoder_calls']} calls / {m['decoder_frames']} frames "
            f"(needed {m['decoder_frames_needed']}, wasted {m['decoder_frames_wasted']}, during keyframe sampling "
            f"{m['decoder_frames_during_keyframes']}, frames per video {m['decoder_frames_per_video']}, max "
            f"{m['decoder_max_frames_per_call']} per call); {m['output_chunks']} output chunks of <= "
            f"{m['output_chunk_max_frames']} frames on {m['output_chunk_devices']}")
    if r.get("flops"):
        f = r["flops"]
        lines.append(
            f"FLOPs per unit (meta, FlopCounterMode): keyframe UNet {f['keyframe_unet_per_frame_eval']['flops'] / 1e12:.4f} T,"
            f" interpolation UNet {f['interpolation_unet_per_frame_eval']['flops'] / 1e12:.4f} T per frame-eval "
            f"(original {o['unet_tflop_per_frame_eval']} T); decoder {f['decoder_per_frame']['flops'] / 1e12:.3f} T per "
            f"512^2 frame (original {o['decoder_tflop_per_frame']} T)")
    return "\n".join(lines)


# ==================================================================================================
# Machine, memory
# ==================================================================================================


def machine_info() -> dict:
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": load,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def rss_mb() -> float:
    kb = _proc_status_kb("VmRSS")
    return (kb or 0) / 1024.0


def _write(out_dir, name, obj):
    if not out_dir:  # None or '' (the CLI's "--out-dir ''"): print only
        return
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    (p / name).write_text(json.dumps(obj, indent=1, default=_json_default), encoding="utf-8")
    print(f"wrote {p / name}")


def _json_default(o):  # only for what json cannot write itself
    if isinstance(o, set):
        return sorted(o)
    return str(o)


# ==================================================================================================
# Models for run / knobs
# ==================================================================================================


def load_tiny_models(folder, dtype=None, device="cpu"):
    """The keyface.smoke tiny random models from ``folder`` (UNets in ``dtype``; VAE in fp32)."""
    from keyface import model_files as mf

    from keyface.loading import load_diffusion_models

    return load_diffusion_models(mf.find_models(folder), dtype=dtype, device=device)


def build_full_size_models(dtype, device):
    """Released-size networks with random weights (torch default init) for timing on CUDA; VAE fp32."""
    import torch

    from keyface.engines import build_interpolation_network, build_keyframe_network
    from keyface.vae import VAE

    torch.manual_seed(0)
    kf = build_keyframe_network(dtype=dtype, device=device).eval().requires_grad_(False)
    good = build_interpolation_network(dtype=dtype, device=device).eval().requires_grad_(False)
    bad = build_interpolation_network(with_audio_projection=False, dtype=dtype, device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for net in (good, bad):
            net.learned_mask.normal_(0, 0.5)
    vae = VAE(device=device).eval().requires_grad_(False)  # decoder only, fp32 (as released)
    return kf, good, bad, vae


def random_inputs(num_frames, good, kf, seed=1):
    import torch

    from keyface.pipeline import model_latent_size

    h, w = model_latent_size(good)
    feat = kf.audio_projection.linear.weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(num_frames, 2, feat, generator=g), torch.randn(num_frames, 2, feat, generator=g))
    z_id = 0.5 * torch.randn(1, 4, h, w, generator=g)
    return features, z_id


# ==================================================================================================
# Run mode (one fresh subprocess per row)
# ==================================================================================================


class RssSampler:
    """Samples this process's resident set (``/proc/self/statm``) every ``interval`` seconds in a thread
    while the block runs; ``peak_mb`` is the largest value seen (None where /proc is missing).

    Complements the kernel's own peak (VmHWM, reset before the render), which cannot miss a short
    spike but exists only on Linux; the sampled peak can miss spikes shorter than ``interval``.
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval = interval
        self.peak_mb = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            return
        peak = 0
        try:
            while True:
                peak = max(peak, int(os.pread(fd, 128, 0).split()[1]))
                self.samples += 1
                if self._stop.wait(self.interval):
                    peak = max(peak, int(os.pread(fd, 128, 0).split()[1]))
                    break
        finally:
            os.close(fd)
            self.peak_mb = peak * page / 2**20

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def _release_free_heap():
    """Hand glibc's free heap pages back to the OS (malloc_trim), so every row starts its render
    from the same state: what the render needs is then newly mapped and counted, whatever earlier
    code (model load, warm-up) left free in the heap. False where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _node_saver(folder: str, tmp: str):
    """KeyFace Save Video (nodes/video.py, the node that writes the mp4 itself) run the way ComfyUI
    runs it, under the ComfyUI stand-ins of ``scripts/comfy_stubs.py`` (no ComfyUI needed): the pack
    is imported as a package, the VAE comes from the KeyFace VAE loader node. Returns
    ``save(latent, audio) -> path``."""
    import importlib.util

    stubs_dir = REPO_ROOT / "scripts"
    if not (stubs_dir / "comfy_stubs.py").is_file():
        raise RuntimeError("the node rows need the repository's scripts/comfy_stubs.py (a source checkout)")
    sys.path.insert(0, str(stubs_dir))
    try:
        import comfy_stubs
    finally:
        sys.path.remove(str(stubs_dir))
    comfy_stubs.install()
    name = "keyface_pack_bench"
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    import folder_paths

    folder_paths.add_model_folder_path("keyface", folder)
    folder_paths.output_directory = tmp
    vae, = pack.NODE_CLASS_MAPPINGS["KeyFaceVAELoader"]().load("svd_vae.safetensors")
    node = pack.NODE_CLASS_MAPPINGS["KeyFaceSaveVideo"]()

    def save(latent, audio):
        return node.save(vae, latent, audio, "bench/keyface", 16, 18)["result"][0]

    return save


def _row_inputs(output, num, good, kf, seed=2):
    """The inputs of one render (created before the measurement: they are not the render's memory).
    frames / file: features, identity latent (and audio); node: KeyFace Interpolate's LATENT, with
    random segment latents (the node only decodes and encodes), and a ComfyUI AUDIO."""
    import torch

    from keyface.planner import WINDOW, plan_clip

    audio = 0.1 * torch.randn(1, num * 640, generator=torch.Generator().manual_seed(seed))
    if output != "node":
        features, z_id = random_inputs(num, good, kf)
        return {"features": features, "z_id": z_id, "audio": audio}
    from keyface.pipeline import model_latent_size

    h, w = model_latent_size(good)
    segs = plan_clip(num).num_segments
    samples = torch.randn(segs * WINDOW, 4, h, w, generator=torch.Generator().manual_seed(seed))
    return {"latent": {"samples": samples, "keyface_num_frames": num, "keyface_segment_frames": WINDOW},
            "audio": {"waveform": audio[None], "sample_rate": 16000}}


def _worker(spec: dict) -> dict:
    """One measured row in this fresh process: load, warm up on 28 frames, then measure one render.

    Memory: the growth of the resident set DURING the measured render, over its value right before
    it (after gc and malloc_trim), by two methods: the peak sampled every 2 ms, and the kernel's
    peak VmHWM reset right before the render. ``ru_maxrss`` (lifetime peak, cannot be reset) is
    reported as well; it is about this render only when it grew during it.
    """
    import gc

    import torch

    from keyface import pipeline as P

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    t_load = time.perf_counter()
    if spec["models"] == "tiny":
        kf, good, bad, vae = load_tiny_models(spec["folder"], dtype=dtype, device=device)
    else:
        kf, good, bad, vae = build_full_size_models(dtype, device)
    save_node = _node_saver(spec["folder"], spec["tmp"]) if spec["output"] == "node" else None
    t_load = time.perf_counter() - t_load
    n = int(spec["num_frames"])
    path = os.path.join(spec["tmp"], f"bench_{n}.mp4")

    def render(x):
        """Returns (frames held by the caller or None, output bytes)."""
        if spec["output"] == "node":
            out = save_node(x["latent"], x["audio"])
            size = os.path.getsize(out)
            os.remove(out)
            return None, size
        if spec["output"] == "file":
            P.render_to_file(kf, good, bad, vae, x["z_id"], x["features"], path, audio=x["audio"], sample_rate=16000,
                             device=device)
            size = os.path.getsize(path)
            os.remove(path)
            return None, size
        frames = P.render(kf, good, bad, vae, x["z_id"], x["features"], device=device)
        return frames, frames.numel() * frames.element_size()

    render(_row_inputs(spec["output"], 28, good, kf))  # warm-up: one-time allocations, kernel selection
    inputs = _row_inputs(spec["output"], n, good, kf)
    counter = Counter()
    _watch_models(counter, kf, good, bad, vae)
    gc.collect()
    trimmed = _release_free_heap()
    rss0 = rss_mb()
    ru0 = _ru_maxrss_mb()
    reset_ok = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        frames, out_bytes = render(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    hwm = peak_rss_mb() if reset_ok else None
    ru1 = _ru_maxrss_mb()
    held = out_bytes / 2**20 if frames is not None else 0.0  # what the caller holds after the render
    growth = sampler.peak_mb - rss0 if sampler.peak_mb is not None else None
    res = {
        **spec,
        "seconds": n / FPS,
        "load_s": t_load,
        "wall_s": wall,
        "wall_per_output_s": wall / (n / FPS),
        "rss_before_mb": rss0,
        "malloc_trim": trimmed,
        "rss_peak_sampled_mb": sampler.peak_mb,
        "rss_samples": sampler.samples,
        "rss_growth_sampled_mb": growth,
        "vmhwm_reset": reset_ok,
        "vmhwm_peak_mb": hwm,
        "rss_growth_vmhwm_mb": hwm - rss0 if hwm is not None else None,
        "ru_maxrss_before_mb": ru0,
        "ru_maxrss_after_mb": ru1,
        "ru_maxrss_growth_mb": ru1 - rss0 if ru1 > ru0 else None,  # None: the render set no new lifetime peak
        "output_held_mb": held,
        "output_file_mb": out_bytes / 2**20 if frames is None else None,
        "unet_frame_evals": counter.unet_total("rows"),
        "decoder_frames": counter.decoder["rows"],
        "loadavg_1": os.getloadavg()[0],
    }
    best = res["rss_growth_vmhwm_mb"] if res["rss_growth_vmhwm_mb"] is not None else growth
    res["rss_growth_mb"] = best
    res["rss_growth_minus_output_mb"] = best - held if best is not None else None
    if device.type == "cuda":
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["cuda_allocated_before_mb"] = cuda0 / 2**20
        res["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
    del frames
    return res


# glibc adapts its mmap threshold to the sizes freed so far, so whether a large buffer is mmapped (and
# returned to the OS when freed) or carved from the heap depends on the process's history: measured
# render-to-render spread of the RSS growth was 8..68 MB with it, 0.2 MB with a fixed threshold.
# The fixed threshold makes every buffer over 64 KiB a fresh mmap (page faults on each use): a 5 s
# render measured 1.59 s per output second with it, 0.70 without. So each run row is rendered
# twice, in two fresh workers: memory with the fixed threshold, wall time with the default allocator.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _spawn_worker(spec, timeout=3600, fixed_mmap_threshold=True) -> dict:
    env = {**os.environ, **(WORKER_ENV if fixed_mmap_threshold else {})}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", "bench", "--worker", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    if out.returncode != 0:
        return {**spec, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


RUN_OUTPUTS = ("frames", "file", "node")


def run_run(seconds_list, out_dir, threads=1, outputs=RUN_OUTPUTS, smoke_dir=None) -> dict:
    import torch

    from keyface.smoke import write_smoke_models

    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="keyface_bench_") as tmp:
        folder = smoke_dir or os.path.join(tmp, "models")
        if not os.path.isdir(folder) or not os.listdir(folder):
            write_smoke_models(folder)
        configs = [("cpu", "tiny", "fp32")]
        if torch.cuda.is_available():
            configs += [("cuda", "full", "bf16"), ("cuda", "full", "fp16")]
        print("\n" + RUN_HEADER, flush=True)
        for device, models, dt in configs:
            for sec in seconds_list:
                for output in outputs:
                    if output == "node" and models != "tiny":
                        continue  # the node rows measure host memory of the streaming path, not speed
                    spec = {"device": device, "models": models, "dtype": dt, "num_frames": _clip_frames(sec),
                            "output": output, "threads": threads, "folder": folder, "tmp": tmp}
                    r = _spawn_worker(spec)  # memory row
                    timed = _spawn_worker(spec, fixed_mmap_threshold=False)
                    if "error" in timed:
                        r.setdefault("error", timed["error"])
                    elif "error" not in r:
                        r["wall_s_fixed_mmap_threshold"] = r["wall_s"]
                        r["wall_s"], r["wall_per_output_s"] = timed["wall_s"], timed["wall_per_output_s"]
                    r.pop("folder", None)
                    r.pop("tmp", None)
                    results.append(r)
                    print(format_run_row(r), flush=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"mode": "run", "machine": machine_info(), "gpu_note": _gpu_note(), "results": results,
              "what": ("two renders per row, each in a fresh subprocess with the same setup (models loaded, a 28-frame "
                       "warm-up render, inputs created, gc + malloc_trim): wall time from a worker with the default "
                       "allocator, memory from one with MALLOC_MMAP_THRESHOLD_=65536 (its own wall time is kept as "
                       "wall_s_fixed_mmap_threshold); memory = growth of the resident set during "
                       "the render over its value right before it: kernel peak VmHWM (reset before the render) and a "
                       "2 ms sampled peak; 'frames' = pipeline.render (the caller then holds the output tensor), "
                       "'file' = pipeline.render_to_file, 'node' = KeyFace Save Video under the ComfyUI stand-ins "
                       "(decode + mp4 only, random latents); CPU rows use the keyface.smoke tiny random models "
                       "(latent 8x8, 64x64 px)"),
              "bench_seconds": time.perf_counter() - t_start}
    _write(out_dir, f"run_{dev}.json", result)
    print(format_run(result))
    return result


def _gpu_note() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA device: {torch.cuda.get_device_name(0)}"
    return "no CUDA device here: only the CPU rows were measured (the CUDA bf16/fp16 full-size code path did not run)"


RUN_HEADER = (f"{'dev':5s}{'model':6s}{'dtype':6s}{'clip':>6s}  {'output':7s}{'wall s':>8s}{'s/out s':>8s}"
              f"{'RSS0':>7s}{'growth':>8s}{'sampled':>8s}{'held':>7s}{'g-held':>8s}{'file MB':>8s}{'UNet fe':>8s}"
              f"{'dec':>6s}{'load':>6s}")


def _mb(v, width=8, fmt=".1f"):
    return f"{'-':>{width}s}" if v is None else f"{v:>{width}{fmt}}"


def format_run_row(r) -> str:
    if "error" in r:
        return f"{r['device']} {r['models']} {r['dtype']} N={r['num_frames']} {r['output']}: ERROR {r['error'][-300:]}"
    s = (f"{r['device']:5s}{r['models']:6s}{r['dtype']:6s}{r['seconds']:5.0f}s  {r['output']:7s}"
         f"{r['wall_s']:8.1f}{r['wall_per_output_s']:8.2f}{r['rss_before_mb']:7.0f}{_mb(r['rss_growth_mb'])}"
         f"{_mb(r['rss_growth_sampled_mb'])}{r['output_held_mb']:7.1f}{_mb(r['rss_growth_minus_output_mb'])}"
         f"{_mb(r['output_file_mb'])}{r['unet_frame_evals']:8d}{r['decoder_frames']:6d}{r['loadavg_1']:6.1f}")
    if "cuda_peak_allocated_mb" in r:
        s += f"  cuda peak {r['cuda_peak_allocated_mb']:.0f} MB (+{r['cuda_peak_growth_mb']:.0f})"
    return s


def format_run(result) -> str:
    lines = ["", "RUN MODE (" + result["gpu_note"] + ")",
             "growth = peak RSS during the render - RSS right before it (kernel VmHWM; 'sampled': 2 ms samples); "
             "held = output tensor the caller keeps; g-held = growth - held", RUN_HEADER]
    lines += [format_run_row(r) for r in result["results"]]
    return "\n".join(lines)


# ==================================================================================================
# Knobs mode (in-process, tiny models)
# ==================================================================================================


def _stages(kf, good, bad, vae, z_id, features, settings):
    """:func:`keyface.pipeline.sample_clip` then the decode, as :func:`keyface.pipeline.iter_render`
    runs them (same settings path), keeping the latents so that they can be compared."""
    import torch

    from keyface import pipeline as P

    kfl, seg, plan = P.sample_clip(kf, good, bad, z_id, features, settings=settings)
    with P.attention_backend(settings.attention):
        frames = torch.cat(list(P.decode_segments(vae, seg, plan, chunk_frames=settings.chunk_frames)))
    return kfl, seg, frames


def run_knobs(seconds, out_dir, folder=None, threads=1, compile_unet=False) -> dict:
    import torch

    from keyface.pipeline import RenderSettings
    from keyface.smoke import write_smoke_models
    from keyface.video_io import frames_to_uint8

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    tmp = None
    if folder is None or not os.path.isdir(folder):
        tmp = tempfile.TemporaryDirectory(prefix="keyface_knobs_")
        folder = tmp.name
        write_smoke_models(folder)
    n = _clip_frames(seconds)
    base_models = load_tiny_models(folder)
    features, z_id = random_inputs(n, base_models[1], base_models[0])

    # (label, RenderSettings overrides, UNet weight dtype): every knob goes through RenderSettings, the
    # path users take (python API, CLI), except the weight dtype, which is chosen when the models load
    variants = [
        ("default (10 steps = 11 evals, autoguidance, fp32, SDPA auto, 2 seg/call)", {}, None),
        ("segments_per_call=1", {"segments_per_call": 1}, None),
        ("segments_per_call=4", {"segments_per_call": 4}, None),
        ("segments_per_call=4 again (timing noise check)", {"segments_per_call": 4}, None),
        ("branches_per_call=1 (keyframe guidance)", {"branches_per_call": 1}, None),
        ("steps=12 (AYS, 12 evals)", {"keyframe_steps": 12, "interpolation_steps": 12}, None),
        ("steps=16 (AYS, 16 evals)", {"keyframe_steps": 16, "interpolation_steps": 16}, None),
        ("autoguidance off (interpolation)", {"autoguidance": False}, None),
        ("APPROX guidance_min_sigma=0.0025 (unguided last step)", {"guidance_min_sigma": LAST_STEP_SIGMA}, None),
        ("weights bf16", {}, torch.bfloat16),
        ("weights fp16", {}, torch.float16),
        ("attention=math (SDPA math backend)", {"attention": "math"}, None),
        ("attention=flash (SDPA flash backend)", {"attention": "flash"}, None),
        ("default again (timing noise check)", {}, None),
    ]
    if compile_unet:
        variants.append(("compile=True (torch.compile UNets) [2nd run; compile separately]", {"compile": True}, None))
    rows, ref = [], None
    for label, overrides, weight_dtype in variants:
        row = {"knob": label, "settings": overrides, "weight_dtype": str(weight_dtype or torch.float32)}
        try:
            settings = RenderSettings(**overrides)
            models = base_models if weight_dtype is None else load_tiny_models(folder, dtype=weight_dtype)
            counter = Counter()
            _watch_models(counter, *models)
            with torch.inference_mode():
                if settings.compile:  # the first run compiles; the timed second run reuses torch's cache
                    t0 = time.perf_counter()
                    _stages(*models, z_id, features, settings)
                    first = time.perf_counter() - t0
                    counter.remove()
                    counter = Counter()
                    _watch_models(counter, *models)
                t0 = time.perf_counter()
                kfl, seg, frames = _stages(*models, z_id, features, settings)
                wall = time.perf_counter() - t0
            counter.remove()
            row.update(wall_s=wall, wall_per_output_s=wall / (n / FPS), unet_frame_evals=counter.unet_total("rows"),
                       unet_calls=counter.unet_total("calls"), unet_frame_evals_per_s=counter.unet_total("rows") / (n / FPS),
                       finite=bool(torch.isfinite(seg).all()))
            if settings.compile:
                row["first_run_s"] = first
                row["compile_s_estimate"] = first - wall
            u8 = torch.from_numpy(frames_to_uint8(frames)).int()
            if ref is None:  # the first row: the default settings
                ref = (kfl, seg, u8)
            u8_diff = u8 - ref[2]
            row.update(
                keyframe_latent_max_abs_diff=float((kfl - ref[0]).abs().max()),
                latent_max_abs_diff=float((seg - ref[1]).abs().max()),
                latent_ref_abs_max=float(ref[1].abs().max()),
                uint8_max_abs_diff=int(u8_diff.abs().max()),
                uint8_mean_abs_diff=float(u8_diff.abs().float().mean()),
                uint8_frac_changed=float((u8_diff != 0).float().mean()),
            )
        except Exception as err:  # a knob that does not work here is a result too
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        rows.append(row)
        print(format_knob_row(row), flush=True)
    result = {"mode": "knobs", "machine": machine_info(), "gpu_note": _gpu_note(), "num_frames": n, "seconds": n / FPS,
              "models": "keyface.smoke tiny random models (latent 8x8, 64x64 px), CPU", "rows": rows,
              "bench_seconds": time.perf_counter() - t_start}
    if tmp is not None:
        tmp.cleanup()
    _write(out_dir, "knobs_cpu.json" if not torch.cuda.is_available() else "knobs_cuda.json", result)
    print(format_knobs(result))
    return result


def format_knob_row(r) -> str:
    if "error" in r:
        return f"{r['knob'][:52]:52s} ERROR {r['error']}"
    s = (f"{r['knob'][:52]:52s}{r['wall_per_output_s']:8.2f}{r['unet_frame_evals_per_s']:8.0f}"
         f"{r['keyframe_latent_max_abs_diff']:10.2e}{r['latent_max_abs_diff']:10.2e}{r['uint8_max_abs_diff']:6d}"
         f"{r['uint8_mean_abs_diff']:9.4f}")
    if "compile_s_estimate" in r:
        s += f"  (first run {r['first_run_s']:.1f} s, compile ~{r['compile_s_estimate']:.1f} s)"
    return s


def format_knobs(result) -> str:
    hdr = f"{'knob':52s}{'s/out s':>8s}{'fe/s':>8s}{'kf lat Δ':>10s}{'lat Δ':>10s}{'u8 Δ':>6s}{'u8 meanΔ':>9s}"
    lines = ["", f"KNOBS on {result['models']}, {result['seconds']:.0f} s clip", hdr]
    lines += [format_knob_row(r) for r in result["rows"]]
    return "\n".join(lines)


# ==================================================================================================
# Import mode
# ==================================================================================================

_IMPORT_PROBE = r"""
import importlib.util, json, os, sys, time, types
t0 = time.perf_counter()
import torch
t_torch = time.perf_counter() - t0
root, stubs_dir = sys.argv[1], sys.argv[2]
if os.path.isfile(os.path.join(stubs_dir, "comfy_stubs.py")):
    sys.path.insert(0, stubs_dir)
    import comfy_stubs
    comfy_stubs.install()
    sys.path.remove(stubs_dir)
else:  # a minimal folder_paths, as ComfyUI has it loaded before custom nodes
    fp = types.ModuleType("folder_paths")
    fp.models_dir = "/tmp/models"; fp.folder_names_and_paths = {}; fp.filename_list_cache = {}
    fp.supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".sft"}
    def add_model_folder_path(name, path, is_default=False):
        paths, exts = fp.folder_names_and_paths.get(name, ([], set()))
        if path not in paths: paths.append(path)
        fp.folder_names_and_paths[name] = (paths, exts)
    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    sys.modules["folder_paths"] = fp
before = set(sys.modules)
name = root.replace(".", "_x_")  # ComfyUI's load_custom_node: sys_module_name = module_path.replace(".", "_x_")
t0 = time.perf_counter()
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
mod = importlib.util.module_from_spec(spec)
sys.modules[name] = mod
spec.loader.exec_module(mod)
dt = time.perf_counter() - t0
new = sorted(set(sys.modules) - before)
print(json.dumps({"seconds": dt, "torch_import_s": t_torch, "modules": new, "package": name,
                  "nodes": len(getattr(mod, "NODE_CLASS_MAPPINGS", {}))}))
"""

HEAVY_TOP = ("transformers", "torchaudio", "torchvision", "safetensors", "av", "numpy", "scipy", "PIL", "cv2",
             "librosa", "soundfile", "huggingface_hub", "tokenizers")
HEAVY_OWN = ("keyface.unet", "keyface.engines", "keyface.networks", "keyface.engine_config", "keyface.loading", "keyface.vae", "keyface.pipeline", "keyface.diffusion",
             "keyface.conditioning", "keyface.audio", "keyface.checkpoints", "keyface.video_io", "keyface.smoke",
             "keyface.emotion")


def measure_import(repeats=3, root=None) -> dict:
    root = str(root or REPO_ROOT)
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, root, os.path.join(root, "scripts")],
                             capture_output=True, text=True, timeout=300, cwd="/")
        if out.returncode != 0:
            return {"error": out.stderr[-2000:]}
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mods = runs[-1]["modules"]
    pkg = runs[-1]["package"]
    heavy = [m for m in mods if m.split(".")[0] in HEAVY_TOP]
    own = [m for m in mods if m.startswith(pkg + ".") and any(
        m[len(pkg) + 1:] == h or m[len(pkg) + 1:].startswith(h + ".") for h in HEAVY_OWN)]
    torch_new = [m for m in mods if m.startswith("torch.")]
    secs = sorted(r["seconds"] for r in runs)
    return {
        "seconds_median": secs[len(secs) // 2],
        "seconds_all": [r["seconds"] for r in runs],
        "torch_import_s_median": sorted(r["torch_import_s"] for r in runs)[len(runs) // 2],
        "target_s": 0.5,
        "new_modules": len(mods),
        "pack_modules": [m for m in mods if m == pkg or m.startswith(pkg + ".")],
        "heavy_third_party": heavy,
        "heavy_own": own,
        "new_torch_submodules": torch_new,
        "nodes": runs[-1]["nodes"],
        "method": ("fresh interpreter; import torch first (as ComfyUI), ComfyUI stubs (scripts/comfy_stubs.py) or a "
                   "minimal folder_paths installed; the repo root imported as a package named "
                   "module_path.replace('.', '_x_') via importlib spec_from_file_location(submodule_search_locations)"),
    }


def run_import(out_dir) -> dict:
    r = measure_import()
    r = {"mode": "import", "machine": machine_info(), **r}
    _write(out_dir, "import.json", r)
    if "error" in r:
        print("IMPORT: ERROR", r["error"])
    else:
        print(f"\nPACK IMPORT (torch already imported): median {r['seconds_median'] * 1000:.1f} ms "
              f"(runs {[round(s * 1000, 1) for s in r['seconds_all']]} ms, target < 500 ms); "
              f"{r['new_modules']} new modules, {len(r['pack_modules'])} of the pack; heavy third-party "
              f"{r['heavy_third_party'] or 'none'}; heavy pack modules {r['heavy_own'] or 'none'}; new torch "
              f"submodules {len(r['new_torch_submodules'])}; torch itself took {r['torch_import_s_median']:.2f} s")
    return r


# ==================================================================================================
# CLI
# ==================================================================================================


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", nargs="+", default=["count", "import"], choices=["count", "run", "knobs", "import", "all"])
    p.add_argument("--seconds", nargs="+", type=float, default=[5, 20, 60], help="clip lengths (count, run)")
    p.add_argument("--knob-seconds", type=float, default=5.0, help="clip length of the knobs table")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for run/knobs (1: the tiny models are faster without thread contention)")
    p.add_argument("--outputs", nargs="+", default=list(RUN_OUTPUTS), choices=RUN_OUTPUTS,
                   help="run: frames = pipeline.render, file = pipeline.render_to_file, node = KeyFace Save Video "
                        "under the ComfyUI stand-ins (decode + mp4 only)")
    p.add_argument("--compile", action="store_true", help="knobs: also torch.compile the UNets (slow to compile)")
    p.add_argument("--no-flops", action="store_true", help="count: skip the meta-device FLOP count")
    p.add_argument("--smoke-dir", help="reuse a keyface.smoke models folder (written if missing)")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "results"), help="JSON folder ('' = none)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(a.worker)), default=_json_default))
        return 0
    out_dir = a.out_dir or None
    modes = ["count", "run", "knobs", "import"] if "all" in a.mode else a.mode
    if "count" in modes:
        run_count(a.seconds, out_dir, flops=not a.no_flops)
    if "import" in modes:
        run_import(out_dir)
    if "knobs" in modes:
        run_knobs(a.knob_seconds, out_dir, folder=a.smoke_dir, threads=a.threads, compile_unet=a.compile)
    if "run" in modes:
        run_run(a.seconds, out_dir, threads=a.threads, outputs=a.outputs, smoke_dir=a.smoke_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
