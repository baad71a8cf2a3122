"""``python -m keyface render --job DIR`` (resume by running the same command) and ``--ray`` without
ray installed, with the 64 px smoke models on a real portrait and speech clip (3.095 s: 77 frames,
6 segments, 3 interpolation groups)."""

import os
import sys

from keyface import cli
from test_cli import FACE, WAV
from test_jobs import smoke_dir  # noqa: F401 - shared fixtures


def _render(smoke_dir, out, *extra):  # noqa: F811
    return cli.main(["render", "--image", str(FACE), "--audio", str(WAV), "--models", str(smoke_dir), "--out",
                     str(out), "--device", "cpu", "--threads", "1", *extra])


def test_cli_job_resumes_and_refuses_changes(smoke_dir, tmp_path, capsys):  # noqa: F811
    assert _render(smoke_dir, tmp_path / "plain.mp4") == 0
    plain = (tmp_path / "plain.mp4").read_bytes()
    job = tmp_path / "talk.job"
    assert _render(smoke_dir, tmp_path / "job.mp4", "--job", str(job)) == 0
    assert (tmp_path / "job.mp4").read_bytes() == plain
    assert "keyframes: 1 computed, 0 reused; interpolation: 3 computed, 0 reused" in capsys.readouterr().err

    # a render that stopped before its last block: the same command computes only that block
    (job / "interpolation" / "group_000002.safetensors").unlink()
    (tmp_path / "job.mp4").unlink()
    assert _render(smoke_dir, tmp_path / "job.mp4", "--job", str(job)) == 0
    assert "keyframes: 0 computed, 1 reused; interpolation: 1 computed, 2 reused" in capsys.readouterr().err
    assert (tmp_path / "job.mp4").read_bytes() == plain

    # other settings or another audio clip: refused, naming what changed, and nothing is written
    assert _render(smoke_dir, tmp_path / "other.mp4", "--job", str(job), "--seed", "5", "--steps", "11") == 2
    err = capsys.readouterr().err
    assert "settings.seed: 23 -> 5" in err and "settings.interpolation_steps: 10 -> 11" in err
    assert not (tmp_path / "other.mp4").exists()


def test_cli_ray_without_ray_names_the_install(smoke_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert _render(smoke_dir, tmp_path / "r.mp4", "--ray") == 2
    assert 'pip install "keyface[ray]"' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # no mp4, and the temporary job folder is gone
