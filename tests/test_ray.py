"""Ray fan-out (keyface.ray_render): 2 CPU actors on a private local Ray give exactly the single-process
output; a worker killed mid-render is replaced and loses no finished block; the CLI's --ray; the
ComfyUI pack never imports ray. One Ray for the module (start-up takes ~10-30 s here), shut down after."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keyface import jobs as J
from keyface import model_files as mf
from keyface import pipeline as P
from test_jobs import identity, make_clip, models, smoke_dir  # noqa: F401 - shared fixtures

ray = pytest.importorskip("ray")  # requirements-test.txt installs it; the pack itself never needs it
from keyface import ray_render as R  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = 60  # 1 keyframe batch, 3 segment groups of 2
SETTINGS = dict(seed=3, chunk_frames=7, segments_per_call=2)


@pytest.fixture(scope="module")
def runner(smoke_dir):
    r = R.files_runner(mf.find_models(smoke_dir), num_workers=2, num_cpus=2)
    yield r
    r.close()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def clip():
    return make_clip(N, seed=4)


@pytest.fixture(scope="module")
def reference(models, identity, clip, tmp_path_factory):  # noqa: F811
    """The single-process render (no job folder) on one thread, like each 1-CPU actor."""
    path = tmp_path_factory.mktemp("ref") / "ref.mp4"
    P.render_to_file(models.kf, models.good, models.bad, models.vae, identity, clip, path, audio=clip.audio,
                     sample_rate=16000, valence=clip.valence, arousal=clip.arousal, **SETTINGS)
    return path.read_bytes()


def _ray_job(runner, models, identity, clip, folder, path, callback=None):  # noqa: F811
    return J.render_job(folder, models.vae, identity, clip, path, runner=runner, valence=clip.valence,
                        arousal=clip.arousal, audio=clip.audio, sample_rate=16000, callback=callback, **SETTINGS)


def test_ray_output_equals_single_process(runner, models, identity, clip, reference, tmp_path):  # noqa: F811
    assert runner.num_workers == 2 and len(set(runner.worker_pids())) == 2
    assert runner.model_digests() == J.LocalRunner((models.kf, models.good, models.bad)).model_digests()
    events = []
    report = _ray_job(runner, models, identity, clip, tmp_path / "job", tmp_path / "ray.mp4", events.append)
    assert report.computed == {"keyframes": 1, "interpolation": 3}
    assert (tmp_path / "ray.mp4").read_bytes() == reference
    assert [e.step for e in events if e.stage == "interpolation"] == [11, 22, 33]  # one event per block, in order
    # the same job resumes in one process (same digests, same compute description): nothing to recompute
    report = J.render_job(tmp_path / "job", models.vae, identity, clip, tmp_path / "local.mp4",
                          networks=(models.kf, models.good, models.bad), valence=clip.valence, arousal=clip.arousal,
                          audio=clip.audio, sample_rate=16000, **SETTINGS)
    assert report.computed == {"keyframes": 0, "interpolation": 0}
    assert (tmp_path / "local.mp4").read_bytes() == reference


def test_killed_worker_loses_no_finished_block(runner, models, identity, clip, reference, tmp_path):  # noqa: F811
    folder = tmp_path / "job"
    pids = runner.worker_pids()
    killed = []
    saved_before_kill = []

    def kill_one_worker(ev):
        if ev.stage == "interpolation" and not killed:  # block 0 is stored; blocks 1 and 2 are in flight
            saved_before_kill.extend(sorted(os.listdir(folder / "interpolation")))
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    report = _ray_job(runner, models, identity, clip, folder, tmp_path / "ray.mp4", kill_one_worker)
    assert killed and saved_before_kill == ["group_000000.safetensors"]
    assert report.computed == {"keyframes": 1, "interpolation": 3}  # every block stored exactly once
    assert (tmp_path / "ray.mp4").read_bytes() == reference
    new_pids = runner.worker_pids()  # Ray restarted the killed actor (it reloaded the models)
    assert pids[0] not in new_pids and len(new_pids) == 2

    # a driver that stops (crash / Ctrl-C) after the first block: the rerun reuses it
    def stop(ev):
        if ev.stage == "interpolation":
            raise KeyboardInterrupt

    folder2 = tmp_path / "job2"
    with pytest.raises(KeyboardInterrupt):
        _ray_job(runner, models, identity, clip, folder2, tmp_path / "ray2.mp4", stop)
    assert not (tmp_path / "ray2.mp4").exists()
    report = _ray_job(runner, models, identity, clip, folder2, tmp_path / "ray2.mp4")
    assert report.reused == {"keyframes": 1, "interpolation": 1} and report.computed["interpolation"] == 2
    assert (tmp_path / "ray2.mp4").read_bytes() == reference


def test_pack_works_without_ray():
    """Importing every node module and the job code with ray made unimportable works, and importing
    them normally never imports ray."""
    probe = (
        "import sys, importlib, importlib.util, pkgutil\n"
        f"root = {str(ROOT)!r}\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import comfy_stubs; comfy_stubs.install()\n"
        "if sys.argv[1] == 'blocked': sys.modules['ray'] = None\n"
        "spec = importlib.util.spec_from_file_location('keyface_pack', root + '/__init__.py',\n"
        "                                              submodule_search_locations=[root])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['keyface_pack'] = pack; spec.loader.exec_module(pack)\n"
        "for m in pkgutil.iter_modules([root + '/nodes']): importlib.import_module('keyface_pack.nodes.' + m.name)\n"
        "for m in ('jobs', 'pipeline', 'ray_render'): importlib.import_module('keyface_pack.keyface.' + m)\n"
        "assert sys.modules.get('ray') is None, 'ray was imported'\n"
        "if sys.argv[1] == 'blocked':\n"
        "    try:\n"
        "        sys.modules['keyface_pack.keyface.ray_render'].import_ray()\n"
        "    except ImportError as e:\n"
        "        assert 'pip install' in str(e); print('hint ok')\n"
    )
    for mode in ("blocked", "installed"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=300, cwd="/")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "hint ok" in subprocess.run([sys.executable, "-c", probe, "blocked"], capture_output=True, text=True,
                                       timeout=300, cwd="/").stdout
