"""The README's "From Python" snippet runs as written, on the tiny smoke models (random weights in
the released file formats, with their sidecar configs), and writes an mp4 of the expected length."""

import re
import wave
from pathlib import Path

import pytest

from keyface.planner import video_frame_count
from keyface.smoke import write_smoke_models
from keyface.video_io import probe_mp4

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
SECONDS = 1.2  # of the speech clip: enough for two keyframes and a segment, fast on a laptop CPU


def readme_python_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the From Python section should hold one python block"
    return blocks[0]


def _cut_wav(src: Path, dst: Path, seconds: float) -> tuple[int, int]:
    with wave.open(str(src), "rb") as r:
        params = r.getparams()
        n = min(r.getnframes(), int(seconds * r.getframerate()))
        frames = r.readframes(n)
    with wave.open(str(dst), "wb") as w:
        w.setparams(params)
        w.writeframes(frames)
    return n, params.framerate


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    snippet = readme_python_snippet()
    for name in ('"models/keyface"', '"speech.wav"', '"face.png"', '"out.mp4"'):
        assert name in snippet  # the test stages exactly these paths
    models = tmp_path / "models"
    write_smoke_models(models / "keyface")
    # the ComfyUI layout the README's Models section downloads into: encoders and VAE beside keyface/
    for name, folder in (("WavLM-Base+.pt", "audio_encoders"), ("BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt",
                         "audio_encoders"), ("wav2vec2-base-960h", "audio_encoders"), ("svd_vae.safetensors", "vae")):
        (models / folder).mkdir(exist_ok=True)
        (models / "keyface" / name).rename(models / folder / name)
    samples, rate = _cut_wav(MEDIA / "speech_female_arctic_a0009.wav", tmp_path / "speech.wav", SECONDS)
    (tmp_path / "face.png").write_bytes((MEDIA / "face_astronaut.png").read_bytes())
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(compile(snippet, "README.md (From Python)", "exec"), namespace)  # noqa: S102 - our own README

    expected = video_frame_count(samples, rate)
    assert namespace["features"].num_frames == expected
    info = probe_mp4(tmp_path / "out.mp4")
    assert info["frames"] == expected
    assert (info["width"], info["height"]) == (64, 64)  # the smoke models' resolution, from their sidecar
    assert info["audio_seconds"] == pytest.approx(expected / 25, abs=0.03)
