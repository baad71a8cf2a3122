"""Ray fan-out and job-resume timings with the smoke models on CPU.

    .venv/bin/python bench/ray_bench.py --seconds 60 --workers 1 2 --json bench/results/ray_bench.json

For each worker count: a private local Ray with that many CPUs and 1-CPU actors renders a
``--seconds`` clip (random features of the smoke models' width, 64 px) through a fresh job folder;
reported: Ray + actor start-up, render wall time, wall time per output second. Then, with the last
runner: a render stopped after half of the interpolation blocks and resumed (total time against the
uninterrupted one = resume overhead), and a rerun of the finished job (no sampling: read blocks,
decode, encode). Every mp4 is checked to have the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from keyface import jobs as J  # noqa: E402
from keyface import model_files as mf  # noqa: E402
from keyface.loading import load_diffusion_models  # noqa: E402
from keyface import pipeline as P  # noqa: E402
from keyface import ray_render as R  # noqa: E402
from keyface import smoke  # noqa: E402
from keyface.planner import FPS  # noqa: E402


class Stop(Exception):
    pass


def _clip(seconds: float):
    n = round(seconds * FPS)
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(keyframe=torch.randn(n, 2, smoke.FEATURE_DIM, generator=g),
                           interpolation=torch.randn(n, 2, smoke.FEATURE_DIM, generator=g), num_frames=n,
                           audio=0.1 * torch.randn(1, n * 640, generator=g))


def _md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _render(runner, vae, identity, clip, folder, out, callback=None):
    t0 = time.perf_counter()
    report = J.render_job(folder, vae, identity, clip, out, runner=runner, audio=clip.audio, sample_rate=16000,
                          callback=callback)
    return time.perf_counter() - t0, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="keyface-ray-bench-"))
    smoke.write_smoke_models(work / "models")
    found = mf.find_models(work / "models")
    vae = load_diffusion_models(found)[3]
    identity = P.encode_identity(vae, P.prepare_identity(torch.rand(64, 64, 3), smoke.RESOLUTION))
    clip = _clip(args.seconds)
    rows, digests = [], set()
    runner = None
    for w in args.workers:
        t0 = time.perf_counter()
        runner = R.files_runner(found, num_workers=w, num_cpus=w)
        startup = time.perf_counter() - t0
        wall, report = _render(runner, vae, identity, clip, work / f"job{w}", work / f"out{w}.mp4")
        digests.add(_md5(work / f"out{w}.mp4"))
        rows.append({"workers": w, "startup_s": round(startup, 1), "render_s": round(wall, 1),
                     "s_per_output_s": round(wall / args.seconds, 2), "blocks": report.computed})
        print(json.dumps(rows[-1]), flush=True)
        if w != args.workers[-1]:
            runner.close()

    # resume overhead, with the last runner: stop after half of the interpolation blocks, then resume
    half = len(J.block_members(P.plan_clip(clip.num_frames), 2)[P.STAGE_INTERPOLATION]) // 2
    nfe = len(P.ays_sigmas(10)) - 1

    def stop_half(ev):
        if ev.stage == P.STAGE_INTERPOLATION and ev.step >= half * nfe:
            raise Stop

    t0 = time.perf_counter()
    try:
        _render(runner, vae, identity, clip, work / "job_resume", work / "resume.mp4", stop_half)
    except Stop:
        pass
    stopped = time.perf_counter() - t0
    resumed, report = _render(runner, vae, identity, clip, work / "job_resume", work / "resume.mp4")
    digests.add(_md5(work / "resume.mp4"))
    rerun, _ = _render(runner, vae, identity, clip, work / "job_resume", work / "rerun.mp4")
    digests.add(_md5(work / "rerun.mp4"))
    runner.close()
    uninterrupted = rows[-1]["render_s"]
    resume = {"workers": args.workers[-1], "stopped_after_s": round(stopped, 1), "resumed_s": round(resumed, 1),
              "total_s": round(stopped + resumed, 1), "uninterrupted_s": uninterrupted,
              "overhead_s": round(stopped + resumed - uninterrupted, 1), "reused": report.reused,
              "finished_job_rerun_s": round(rerun, 1)}
    print(json.dumps(resume), flush=True)
    result = {"seconds": args.seconds, "frames": clip.num_frames, "rows": rows, "resume": resume,
              "all_mp4_identical": len(digests) == 1, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__, "ray": R.import_ray().__version__}
    print(json.dumps({"all_mp4_identical": result["all_mp4_identical"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0 if result["all_mp4_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
