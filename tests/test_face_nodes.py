"""The face nodes under the ComfyUI stubs: Detect & Crop Face (auto / manual, several faces, no face),
Paste Back, KeyFace Save Video with a face_crop (full-size mp4, streamed), and the CLI's --face."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

import comfy_stubs
import face_fixtures as ff
import test_cli
from test_cli import models_dir  # noqa: F401  (fixture)
from test_nodes import N, _stub_state, clip, models, pack, smoke_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def detector_installed(smoke_dir):  # noqa: F811
    ff.require_weights()
    ff.install_detector(smoke_dir)
    return smoke_dir / "mtcnn"


def _batch(pic):
    return (torch.from_numpy(pic).float() / 255.0)[None]


def test_detector_folder_listed(N, detector_installed):  # noqa: F811
    spec = N["KeyFaceDetectCropFace"].INPUT_TYPES()["required"]["detector"]
    assert spec[0][0] == "mtcnn"


def test_auto_mode_two_faces_notice_and_index(N, detector_installed, caplog):  # noqa: F811
    node = N["KeyFaceDetectCropFace"]()
    pic, big, small = ff.two_faces()
    args = dict(mode="auto", scale=1.0, offset_x=0.0, offset_y=0.0, size=256, detector="mtcnn", box_x=0, box_y=0,
                box_width=512, box_height=512)
    face, crop, count = node.crop(_batch(pic), face_index=0, **args)
    assert face.shape == (1, 256, 256, 3) and count == 2
    assert crop.image.shape == (720, 1280, 3) and crop.image.dtype == torch.uint8
    cx, cy = crop.transform.center
    assert big[0] < cx < big[0] + big[2]  # the larger face by default
    (event, data, sid), = comfy_stubs.STATE.messages
    assert event == "keyface.notice" and "2 faces found" in data["detail"] and "face 0 of 2" in data["detail"]
    assert "face_index" in data["detail"]
    _, crop1, _ = node.crop(_batch(pic), face_index=1, **args)
    assert small[0] < crop1.transform.center[0] < small[0] + small[2]
    with pytest.raises(ValueError, match="face_index 2 does not exist"):
        node.crop(_batch(pic), face_index=2, **args)


def test_no_face_is_a_clear_error(N, detector_installed):  # noqa: F811
    node = N["KeyFaceDetectCropFace"]()
    with pytest.raises(ValueError) as e:
        node.crop(_batch(ff.no_face()), "auto", 0, 1.0, 0.0, 0.0, 512, "mtcnn", 0, 0, 512, 512)
    assert "image: no face found" in str(e.value) and "manual" in str(e.value)


def test_manual_mode_needs_no_detector(N, smoke_dir, monkeypatch):  # noqa: F811
    face_mod = __import__(N["KeyFaceDetectCropFace"].__module__, fromlist=["load_detector"])
    monkeypatch.setattr(face_mod, "load_detector", lambda name: pytest.fail("manual mode loaded the detector"))
    pic = ff.no_face()
    face, crop, count = N["KeyFaceDetectCropFace"]().crop(_batch(pic), "manual", 0, 1.0, 0.0, 0.0, 128, "missing",
                                                          100, 50, 200, 220)
    assert face.shape == (1, 128, 128, 3) and count == 0
    assert crop.transform.center == (200.0, 160.0) and crop.transform.side == 220.0
    with pytest.raises(ValueError, match="outside the 800x600 image"):
        N["KeyFaceDetectCropFace"]().crop(_batch(pic), "manual", 0, 1.0, 0.0, 0.0, 128, "missing", 900, 50, 20, 20)


def test_missing_detector_names_the_folder(N, smoke_dir):  # noqa: F811
    with pytest.raises(ValueError, match="no MTCNN weights .* models/keyface/elsewhere.*manual"):
        N["KeyFaceDetectCropFace"]().crop(_batch(ff.no_face()), "auto", 0, 1.0, 0.0, 0.0, 128, "elsewhere",
                                          0, 0, 8, 8)


def test_paste_back_node_and_save_video_stream_full_size(N, models, clip, smoke_dir, tmp_path):  # noqa: F811
    import folder_paths

    from keyface.video_io import probe_mp4

    pic = ff.no_face()[:, :799]  # 600 x 799: odd width
    _, crop, _ = N["KeyFaceDetectCropFace"]().crop(_batch(pic), "manual", 0, 1.0, 0.0, 0.0, 64, "mtcnn",
                                                   300, 200, 160, 160)
    lat, = N["KeyFaceInterpolate"]().interpolate(models["it"], clip["kfs"], clip["feats"], 5, 10, 2.0, True, 2)
    frames, = N["KeyFaceDecode"]().decode(models["vae"], lat, 16)
    pasted, = N["KeyFacePasteBack"]().paste(frames, crop, 0.1, True)
    assert pasted.shape == (clip["n"], 600, 799, 3) and pasted.dtype == torch.float32
    untouched = torch.from_numpy(pic[:100, :100]).float() / 255
    assert torch.allclose(pasted[:, :100, :100], untouched.expand(clip["n"], -1, -1, -1), atol=1e-6)
    assert (pasted[:, 280, 380] - torch.from_numpy(pic[280, 380]).float() / 255).abs().max() > 0.01

    # a batch at the photo's size that does not fit in free memory is refused, naming Save Video's way
    comfy_stubs.STATE.free_memory = clip["n"] * 600 * 799 * 3 * 4 - 1
    with pytest.raises(MemoryError, match=rf"KeyFace Paste Back: {clip['n']} frames of 799x600 .* IMAGE batch.*"
                                          "give the face_crop to KeyFace Save Video"):
        N["KeyFacePasteBack"]().paste(frames, crop, 0.1, True)
    comfy_stubs.STATE.free_memory = 64 << 30

    folder_paths.output_directory = str(tmp_path)
    out = N["KeyFaceSaveVideo"]().save(models["vae"], lat, clip["audio"], "kf/face", 4, 23, face_crop=crop,
                                       feather=0.1, color_match=True)
    info = probe_mp4(out["result"][0])
    assert (info["width"], info["height"], info["frames"]) == (798, 600, clip["n"])  # even width for H.264
    import av
    with av.open(out["result"][0]) as c:
        first = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    # the far corner is the photo, the face square the generated frame (compared as 10x10 block means:
    # H.264 4:2:0 blurs the photo's pixel noise in colour)
    def blocks(a):
        a = torch.as_tensor(a, dtype=torch.float32)
        return torch.nn.functional.avg_pool2d(a.permute(2, 0, 1)[None], 10)[0]

    assert (blocks(first[:100, :100]) - blocks(pic[:100, :100])).abs().mean() < 2
    expected = pasted[0, 200:360, 300:460] * 255
    assert (blocks(first[200:360, 300:460]) - blocks(expected)).abs().mean() < 3
    assert (blocks(expected) - blocks(pic[200:360, 300:460])).abs().mean() > 10  # and that differs from the photo
    # without a face_crop: the model's size, as before
    plain = N["KeyFaceSaveVideo"]().save(models["vae"], lat, clip["audio"], "kf/plain", 16, 23)
    assert probe_mp4(plain["result"][0])["width"] == 64


def _short_inputs(tmp_path):
    """1 s of the speech fixture and the two-faces picture (1280x720) as files."""
    import wave

    from PIL import Image

    wav = tmp_path / "one_second.wav"
    with wave.open(str(test_cli.WAV), "rb") as src, wave.open(str(wav), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(src.getframerate()))
    photo = tmp_path / "two_faces.png"
    Image.fromarray(ff.two_faces()[0]).save(photo)
    return wav, photo


def test_cli_face_modes(models_dir, tmp_path, capsys):  # noqa: F811
    """--face manual / auto on the tiny CLI models: the video has the photo's size."""
    from keyface import cli
    from keyface.video_io import probe_mp4

    wav, photo = _short_inputs(tmp_path)
    base = ["render", "--audio", str(wav), "--image", str(photo), "--models", str(models_dir), "--device", "cpu",
            "--threads", "1", "--no-autoguidance", "--quiet"]
    out = tmp_path / "manual.mp4"
    assert cli.main(base + ["--out", str(out), "--face", "manual", "--face-box", "100,200,300,300"]) == 0, \
        capsys.readouterr().err
    info = probe_mp4(out)
    assert (info["width"], info["height"], info["frames"]) == (1280, 720, 25)
    t0 = time.monotonic()
    assert cli.main(base + ["--out", str(tmp_path / "x.mp4"), "--face", "manual"]) == 2
    assert "--face manual needs --face-box" in capsys.readouterr().err
    assert time.monotonic() - t0 < 5  # refused before the audio encoders and the models load
    for bad in (["--face-box", "1,2,3"], ["--face-offset", "x,1"], ["--feather", "0.9"]):
        with pytest.raises(SystemExit) as e:
            cli.main(base + ["--out", str(tmp_path / "x.mp4"), "--face", "manual", *bad])
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "x.mp4"), "--face", "auto"]) == 2
    assert "face detector not found" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
    ff.require_weights()
    shutil.copytree(ff.WEIGHTS, Path(models_dir) / "mtcnn", dirs_exist_ok=True)
    out = tmp_path / "auto.mp4"
    rc = cli.main(base[:-1] + ["--out", str(out), "--face", "auto", "--face-index", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "face: face 1 of 2" in err and "choose with --face-index" in err
    assert probe_mp4(out)["width"] == 1280


def test_paste_back_names_the_bad_images(N):  # noqa: F811
    """Paste Back's errors name its input and, for values, the frames: a single [H, W, 3] frame is
    refused (chunking it would cut it into rows and report a shape the user never gave), and a NaN in
    frame 20 names the chunk it is in."""
    _, crop, _ = N["KeyFaceDetectCropFace"]().crop(_batch(ff.no_face()), "manual", 0, 1.0, 0.0, 0.0, 64, "mtcnn",
                                                   300, 200, 160, 160)
    with pytest.raises(ValueError, match=r"images: expected an IMAGE batch \[n, s, s, 3\] .*got \(64, 64, 3\)"):
        N["KeyFacePasteBack"]().paste(torch.rand(64, 64, 3), crop, 0.1, True)
    frames = torch.rand(24, 64, 64, 3)
    frames[20, 5, 5, 1] = float("nan")
    with pytest.raises(Exception, match=r"images\[16:24\]: hold NaN or infinite values"):
        N["KeyFacePasteBack"]().paste(frames, crop, 0.1, True)
    out, = N["KeyFacePasteBack"]().paste(frames[:20], crop, 0.1, True)
    assert out.shape == (20, 600, 800, 3) and torch.isfinite(out).all()
