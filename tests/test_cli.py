"""``python -m keyface``: end-to-end render of a real image + speech clip with tiny random models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import test_pipeline as tp
from keyface import cli
from keyface import model_files as mf
from keyface import pipeline as P
from keyface.engines import INTERPOLATION_AUDIO_EMBEDDER, KEYFRAME_AUDIO_EMBEDDER
from keyface.video_io import probe_mp4

ROOT = Path(__file__).resolve().parent.parent
MEDIA = Path(__file__).parent / "fixtures" / "media"
FACE = MEDIA / "face_grace_hopper.jpg"  # 512 x 600: exercises the centre crop
WAV = MEDIA / "speech_female_arctic_a0009.wav"  # 49520 samples at 16 kHz = 3.095 s




@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models folder in the released names: the tiny audio encoders of keyface.smoke (unilm pickles,
    HF folder), and the tiny (32 px) engines / VAE of test_pipeline as safetensors + sidecar configs."""
    import json

    from keyface import smoke

    folder = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(0)
    torch.save(smoke.build_wavlm_unilm(gen), folder / mf.DEFAULT_NAMES[mf.WAVLM])
    torch.save(smoke.build_beats_unilm(gen), folder / mf.DEFAULT_NAMES[mf.BEATS])
    w2v = folder / mf.DEFAULT_NAMES[mf.WAV2VEC2]
    w2v.mkdir()
    cfg, sd = smoke.build_wav2vec2_hf(gen)
    (w2v / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    save_file(sd, str(w2v / "model.safetensors"), metadata={"format": "pt"})
    m = tp.build_models()
    for name, net, embedder, config in (("keyframe", m.kf, KEYFRAME_AUDIO_EMBEDDER, tp.KEYFRAME_CFG),
                                        ("interpolation", m.good, INTERPOLATION_AUDIO_EMBEDDER, tp.INTERP_CFG),
                                        ("interpolation_bad", m.bad, INTERPOLATION_AUDIO_EMBEDDER, tp.INTERP_CFG)):
        sd = smoke.engine_state_dict(net, embedder)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{name}.safetensors"))
        mf.write_sidecar(folder / f"{name}.safetensors", config)
    save_file({k: v.contiguous() for k, v in m.vae.state_dict().items()}, str(folder / "svd_vae.safetensors"))
    assert not mf.missing(mf.find_models(folder))
    return folder


def test_render_end_to_end(models_dir, tmp_path, monkeypatch, capsys):
    seen = {}
    real_prepare = P.prepare_identity

    def spy(image, size, mode="crop"):
        seen.update(shape=tuple(image.shape), size=size, mode=mode)
        return real_prepare(image, size, mode)

    monkeypatch.setattr(P, "prepare_identity", spy)
    real_render_to_file = P.render_to_file

    def spy_render(*args, **kwargs):
        seen["settings"] = kwargs["settings"]
        return real_render_to_file(*args, **kwargs)

    monkeypatch.setattr(P, "render_to_file", spy_render)
    out = tmp_path / "out.mp4"
    rc = cli.main(["render", "--image", str(FACE), "--audio", str(WAV), "--models", str(models_dir),
                   "--out", str(out), "--device", "cpu", "--seed", "5", "--emotion", "happy",
                   "--segments-per-call", "3", "--branches-per-call", "2", "--attention", "math",
                   "--chunk-frames", "20", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    s = seen.pop("settings")
    assert (s.seed, s.segments_per_call, s.branches_per_call, s.attention, s.compile, s.chunk_frames) == \
        (5, 3, 2, "math", False, 20)
    assert seen == {"shape": (600, 512, 3), "size": (32, 32), "mode": "crop"}
    info = probe_mp4(out)
    n = round(49520 / 16000 * 25)
    assert info["frames"] == n == 77  # round(3.095 s x 25); the original would render ceil(49520 / 640) = 78
    assert (info["width"], info["height"], info["fps"]) == (32, 32, 25.0)
    # the audio track lasts exactly N / 25 s (the input, 3.095 s, is cut to 3.08 s); the requirement is
    # "within one AAC frame", the writer's edit list makes it exact
    assert info["audio_seconds"] == pytest.approx(n / 25, abs=1024 / 16000)
    assert info["audio_seconds"] == n / 25 == info["video_seconds"]
    assert info["audio_rate"] == 16000 and info["audio_channels"] == 1
    assert [p for p in os.listdir(tmp_path)] == ["out.mp4"]
    err = capsys.readouterr().err
    assert "77 frames" in err and "7 keyframes" in err and "6 segments" in err


def test_render_errors(models_dir, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    base = ["render", "--image", str(FACE), "--audio", str(WAV), "--out", str(out), "--device", "cpu"]
    assert cli.main(base + ["--models", str(tmp_path / "nope")]) == 2
    assert "models folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(base + ["--models", str(empty)]) == 2
    assert "lacks keyframe, interpolation" in capsys.readouterr().err
    assert cli.main(["render", "--image", str(FACE), "--audio", str(tmp_path / "missing.wav"), "--models",
                     str(models_dir), "--out", str(out)]) == 2
    assert "audio file not found" in capsys.readouterr().err
    assert cli.main(base[:-2] + ["--models", str(models_dir), "--device", "cpu", "--out",
                                 str(tmp_path / "no_dir" / "x.mp4")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert not out.exists()


def _write_wav(path, samples: torch.Tensor, rate: int):
    import wave

    pcm = (samples.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def test_one_frame_clip_renders_one_frame(models_dir, tmp_path, capsys):
    """A 24 ms clip: N = round(0.024 x 25) = 1 frame by the README's contract, so it renders one frame
    (issue 9 item 8: it used to be refused as "too short"); 16 ms rounds to 0 and is refused."""
    t = torch.arange(1058) / 44100  # 24.0 ms
    _write_wav(tmp_path / "tiny.wav", 0.3 * torch.sin(2 * torch.pi * 220 * t), 44100)
    out = tmp_path / "tiny.mp4"
    rc = cli.main(["render", "--image", str(FACE), "--audio", str(tmp_path / "tiny.wav"), "--models",
                   str(models_dir), "--out", str(out), "--device", "cpu", "--steps", "10", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    info = probe_mp4(out)
    assert info["frames"] == 1 and info["video_seconds"] == 0.04
    _write_wav(tmp_path / "too_short.wav", 0.3 * torch.sin(2 * torch.pi * 220 * t[:705]), 44100)  # 16 ms
    rc = cli.main(["render", "--image", str(FACE), "--audio", str(tmp_path / "too_short.wav"), "--models",
                   str(models_dir), "--out", str(tmp_path / "none.mp4"), "--device", "cpu"])
    assert rc == 2 and "rounds to 0 video frames" in capsys.readouterr().err
    assert not (tmp_path / "none.mp4").exists()


def test_plan_command_subprocess():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "keyface", "plan", "--frames", "28", "--verbose"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "28 frames (1.12 s): 4 keyframes in 1 batch(es) of 14 slots, 3 segments" in r.stdout
    assert "segment 2: keyframes (2,3) frames 26..39 rows 26..27" in r.stdout
    r = subprocess.run([sys.executable, "-m", "keyface", "plan", "--audio", str(WAV)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("77 frames (3.08 s)")


def test_speed_flags_defaults_and_errors(tmp_path, capsys):
    parser = cli._build_parser()
    args = parser.parse_args(["render", "--image", "i", "--audio", "a", "--models", "m", "--out", "o.mp4"])
    # the command line's defaults are the library's (one set of defaults)
    assert cli._settings(args) == P.RenderSettings()
    for name in P.ATTENTION_BACKENDS:  # every library backend is accepted
        assert parser.parse_args(["render", "--image", "i", "--audio", "a", "--models", "m", "--out", "o.mp4",
                                  "--attention", name]).attention == name
    compiled = parser.parse_args(["render", "--image", "i", "--audio", "a", "--models", "m", "--out", "o.mp4",
                                  "--compile", "--attention", "flash"])
    assert cli._settings(compiled).compile is True and cli._settings(compiled).attention == "flash"

    with pytest.raises(SystemExit) as err:  # an unknown backend: argparse names the choices
        cli.main(["render", "--image", "i", "--audio", "a", "--models", "m", "--out", "o.mp4", "--attention", "fast"])
    assert err.value.code == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    # a bad value fails before the models folder is even looked at
    base = ["render", "--image", str(FACE), "--audio", str(WAV), "--models", str(tmp_path / "nope"),
            "--out", str(tmp_path / "x.mp4")]
    assert cli.main(base + ["--segments-per-call", "0"]) == 2
    assert "segments_per_call must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "5"]) == 2
    assert "keyframe_steps must be an integer >= 10, got 5" in capsys.readouterr().err
