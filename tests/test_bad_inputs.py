"""Bad inputs (issue 9, items 5-7): non-finite values, integer audio, errors that name the input.

Every case here is listed in docs/BAD_INPUTS.md with the error the user gets. Library cases use the
tiny models of test_pipeline; node cases run the nodes under the ComfyUI stubs (scripts/comfy_stubs.py)
with the smoke models; CLI cases run ``python -m keyface`` in a subprocess (exit status, one line on
stderr, no traceback, no output file).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import test_pipeline as tp
from keyface import emotion as E
from keyface import model_files as mf
from keyface import pipeline as P
from keyface import validate
from keyface.config import UNetConfig
from keyface.planner import WINDOW, plan_clip
from keyface.video_io import MediaError, Mp4Writer, fit_audio_to_frames, read_audio_file
from test_nodes import _audio, _image, _import_pack

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
NAN, INF = float("nan"), float("inf")


# ============================================================================ 5. non-finite values
@pytest.mark.parametrize("field", ["ref_ratio", "audio_ratio", "scale", "guidance_min_sigma"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_render_settings_refuse_non_finite_guidance(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected a finite number"):
        P.RenderSettings(**{field: value})


@pytest.fixture(scope="module")
def models():
    return tp.build_models()


@pytest.fixture(scope="module")
def identity(models):
    return P.encode_identity(models.vae, P.prepare_identity(torch.rand(40, 52, 3), 8 * tp.HW))


def test_library_entry_points_refuse_non_finite_inputs(models, identity):
    c = tp.clip_inputs(20)
    plan = plan_clip(20)
    with pytest.raises(ValueError, match="^ref_ratio: expected a finite number, got nan"):
        P.sample_keyframes(models.kf, identity, c.keyframe, None, None, plan, ref_ratio=NAN)
    with pytest.raises(ValueError, match="^audio_ratio: .* got inf"):
        P.sample_keyframes(models.kf, identity, c.keyframe, None, None, plan, audio_ratio=INF)
    bad_rows = c.keyframe.clone()
    bad_rows[3, 0, 5] = NAN
    with pytest.raises(ValueError, match="^keyframe audio features: 1 of .* values are not finite \\(1 NaN"):
        P.sample_keyframes(models.kf, identity, bad_rows, None, None, plan)
    with pytest.raises(ValueError, match="^valence: 1 of 20 values are not finite"):
        P.sample_keyframes(models.kf, identity, c.keyframe, torch.tensor([0.0] * 19 + [NAN]), None, plan)
    z = identity.clone()
    z[0, 1, 2, 3] = INF
    with pytest.raises(ValueError, match="^identity latent: 1 of .* \\(0 NaN, 1 infinite\\)"):
        P.sample_keyframes(models.kf, z, c.keyframe, None, None, plan)
    kf = torch.zeros(plan.num_keyframes, 4, tp.HW, tp.HW)
    with pytest.raises(ValueError, match="^scale: expected a finite number, got nan"):
        P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan, scale=NAN)
    bad_kf = kf.clone()
    bad_kf[1, 0, 0, 0] = NAN
    with pytest.raises(ValueError, match="^keyframe latents: 1 of"):
        P.interpolate_segments(models.good, models.bad, bad_kf, c.interpolation, plan)
    with pytest.raises(ValueError, match="^segment latents: .* not finite"):
        next(P.decode_segments(models.vae, torch.full((plan.num_segments, WINDOW, 4, tp.HW, tp.HW), NAN), plan))


def test_nan_pixel_in_the_portrait_is_refused():
    img = torch.rand(40, 52, 3)
    img[7, 9, 1] = NAN
    with pytest.raises(ValueError, match="^identity image: 1 of 6240 values are not finite \\(1 NaN, 0 infinite\\)"):
        P.prepare_identity(img, 32)


@pytest.mark.parametrize("size,message", [
    (float("nan"), r"identity size: expected an integer in 1\.\.8192, got nan"),
    (1e9, r"identity size: expected an integer in 1\.\.8192, got 1000000000"),
    ((32, 32, 3), r"identity size: expected an integer or \(height, width\), got \(32, 32, 3\)"),
    ("512", r"identity size: expected an integer in 1\.\.8192, got '512' \(str\)"),
])
def test_identity_size_is_checked_by_name(size, message):
    """A NaN size was a bare TypeError from indexing a float; a huge one a failed allocation."""
    with pytest.raises(ValueError, match="^" + message):
        P.prepare_identity(torch.rand(40, 52, 3), size)
    assert P.prepare_identity(torch.rand(40, 52, 3), np.int64(16)).shape == (16, 16, 3)


def _poisoned(module, attr_path):
    """A copy of ``module`` whose parameter at ``attr_path`` is all NaN (a broken model file)."""
    m = copy.deepcopy(module)
    p = m
    for part in attr_path.split("."):
        p = p[int(part)] if part.isdigit() else getattr(p, part)
    with torch.no_grad():
        p.fill_(NAN)
    return m


def test_each_stage_output_is_checked(models, identity, tmp_path):
    """Valid inputs, a model that makes NaN: the error names the stage, and no video is written."""
    c = tp.clip_inputs(5)  # 2 keyframes, 1 segment: every stage once
    plan = plan_clip(5)
    kf_net = _poisoned(models.kf, "diffusion_model.out.2.weight")
    with pytest.raises(ValueError, match="^keyframes: the stage produced non-finite values: .* Likely cause: a model"):
        P.sample_keyframes(kf_net, identity, c.keyframe, None, None, plan)
    kf = P.sample_keyframes(models.kf, identity, c.keyframe, None, None, plan)
    good = _poisoned(models.good, "diffusion_model.out.2.weight")
    with pytest.raises(ValueError, match="^interpolation: the stage produced non-finite values"):
        P.interpolate_segments(good, models.bad, kf, c.interpolation, plan)
    seg = P.interpolate_segments(models.good, models.bad, kf, c.interpolation, plan)
    vae = _poisoned(models.vae, "decoder.conv_out.weight")
    with pytest.raises(ValueError, match="^decode: the stage produced non-finite values: .* VAE"):
        next(P.decode_segments(vae, seg, plan))
    out = tmp_path / "clip.mp4"
    with pytest.raises(ValueError, match="^decode: "):
        P.render_to_file(models.kf, models.good, models.bad, vae, identity, c, out)
    assert os.listdir(tmp_path) == []  # no black video, no temporary file


# ================================================================================ 6. integer audio
def _sine(n=16000, amp=0.6):
    t = torch.arange(n) / 16000
    return amp * torch.sin(2 * math.pi * 220 * t)


@pytest.mark.parametrize("dtype,scale,offset", [(torch.int16, 2**15, 0), (torch.int32, 2**31, 0), (torch.int8, 2**7, 0),
                                                (torch.uint8, 2**7, 128), (torch.float64, 1, 0)])
def test_pcm_to_float_scales_every_integer_type(dtype, scale, offset):
    x = _sine(1000)
    pcm = (x * (scale - 1) + offset).round().to(dtype)
    out = validate.pcm_to_float(pcm)
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.float(), atol=2.0 / scale + 1e-6)
    assert np.allclose(validate.pcm_to_float(pcm.numpy()), x.numpy(), atol=2.0 / scale + 1e-6)


def test_mp4_track_of_int16_audio_is_not_a_square_wave(tmp_path):
    """int16 samples used to be cast (not scaled) and clipped to +-1: a square wave in the mp4."""
    x = _sine(16000)
    pcm = (x * 32767).round().to(torch.int16)[None]
    fitted = fit_audio_to_frames(pcm, 16000, 25)
    assert fitted.dtype == np.float32 and abs(float(np.abs(fitted).max()) - 0.6) < 1e-3
    path = tmp_path / "a.mp4"
    with Mp4Writer(path, 16, 16, fps=25, audio=pcm, sample_rate=16000, num_frames=25) as w:
        w.write(torch.zeros(25, 16, 16, 3))
    track, rate = read_audio_file(path)
    assert rate == 16000
    body = track[0, 2000:14000]  # away from the AAC priming / end
    assert 0.5 < float(body.abs().max()) < 0.7  # a cast int16 clip decodes at ~1.0 everywhere
    assert float((body.abs() > 0.95).float().mean()) < 0.01


def test_non_finite_audio_track_is_refused():
    with pytest.raises(MediaError, match="audio waveform: 1 sample\\(s\\) are NaN or infinite"):
        fit_audio_to_frames(torch.tensor([[0.1, NAN, 0.2]]), 16000, 1)


@pytest.mark.parametrize("sampwidth,dtype", [(1, np.uint8), (2, np.int16), (4, np.int32)])
def test_cli_reads_integer_wav_files_scaled(tmp_path, sampwidth, dtype):
    x = _sine(8000).numpy()
    if dtype is np.uint8:
        raw = np.round(x * 127 + 128).astype(np.uint8)
    else:
        raw = np.round(x * (np.iinfo(dtype).max)).astype(dtype)
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(sampwidth)
        f.setframerate(16000)
        f.writeframes(raw.tobytes())
    wav, rate = read_audio_file(path)
    assert rate == 16000 and wav.dtype == torch.float32
    assert np.allclose(wav[0].numpy(), x, atol=1.5 / 127)


# ================================================================================ 7. clear errors
@pytest.mark.parametrize("value,message", [
    ("abc", "model_channels: expected an integer in 1..16384, got 'abc'"),
    (-32, "model_channels: expected an integer in 1..16384, got -32"),
    (10**9, "model_channels: expected an integer in 1..16384, got 1000000000"),
])
def test_unet_config_checks_types_and_ranges(value, message):
    params = dict(tp.UNET, in_channels=8, adm_in_channels=512, model_channels=value)
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_original(params)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    from keyface import smoke

    d = tmp_path_factory.mktemp("smoke")
    smoke.write_smoke_models(d, seed=0)
    return d


def _with_sidecar(smoke_dir, tmp_path, kind, patch):
    for f in smoke_dir.iterdir():
        if f.is_file():
            os.link(f, tmp_path / f.name) if not (tmp_path / f.name).exists() else None
    side = tmp_path / f"{kind}.json"
    cfg = json.loads((smoke_dir / f"{kind}.json").read_text())
    patch(cfg)
    side.unlink()
    side.write_text(json.dumps(cfg))
    return tmp_path / f"{kind}.pt", side


def _params(cfg):
    return cfg["network_config"]["params"]


@pytest.mark.parametrize("kind,patch,message", [
    ("keyframe", lambda c: _params(c).update(model_channels="abc"), "model_channels: expected an integer in 1..16384, got 'abc'"),
    ("keyframe", lambda c: _params(c).update(model_channels=-32), "model_channels: expected an integer in 1..16384, got -32"),
    ("keyframe", lambda c: _params(c).update(model_channels=10**9), "model_channels: expected an integer .* got 1000000000"),
    ("keyframe", lambda c: _params(c).update(num_heads=True), "num_heads \\(or -1\\): expected an integer"),
    ("keyframe", lambda c: _params(c).update(channel_mult="ab"), "channel_mult: expected a list of integers"),
    ("keyframe", lambda c: c.update(resolution=0), "resolution: expected an integer in 8..8192, got 0"),
    ("keyframe", lambda c: c.update(resolution=7), "resolution: expected an integer in 8..8192, got 7"),
    ("keyframe", lambda c: c.update(resolution=100), "resolution: expected a multiple of 8 pixels"),
    ("keyframe", lambda c: c.update(resolution="64"), "resolution: expected an integer number of pixels, got the string '64'"),
    ("keyframe", lambda c: c["conditioner_config"]["params"].update(emb_models=[1]), "emb_models\\[0\\]: expected a JSON object"),
    ("keyframe", lambda c: c["conditioner_config"]["params"]["emb_models"][3]["params"].update(audio_dim="x"),
     "emb_models\\[3\\].params.audio_dim: expected an integer"),
    ("keyframe", lambda c: c.update(conditioner_config=[1]), "conditioner_config: expected a JSON object, got list"),
    ("interpolation", lambda c: c["network_wrapper"]["params"].update(n_channels="abc"), "n_channels: expected an integer in 1..64"),
    ("interpolation", lambda c: c["network_wrapper"]["params"].update(im_size=[64, "64"]), "im_size\\[1\\]: expected an integer"),
])
def test_sidecar_keys_are_checked_at_load(smoke_dir, tmp_path, kind, patch, message):
    from keyface import engines

    path, side = _with_sidecar(smoke_dir, tmp_path, kind, patch)
    with pytest.raises(ValueError, match=f"^sidecar config {str(side)}: .*{message}"):
        if kind == "keyframe":
            engines.load_keyframe_network(path)
        else:
            engines.load_interpolation_networks(path, tmp_path / "interpolation_bad.pt")
    if not message.startswith(("model_channels", "num_heads", "channel_mult")):  # UNet sizes: checked by UNetConfig
        with pytest.raises(ValueError, match=message):
            mf.read_sidecar(path)  # what the loader nodes read the resolution with


def test_resolution_is_never_silently_replaced():
    assert mf.resolution_of({"resolution": 64}) == 64 and mf.resolution_of(None) == mf.DEFAULT_RESOLUTION
    with pytest.raises(ValueError, match="string '64'"):
        mf.resolution_of({"resolution": "64"})


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "expected a JSON object of config values .* got a list"),
    ("[" * 100000 + "]" * 100000, "nests deeper than 32 levels"),
    (None, "is not valid JSON: .*utf-8"),
    ('{"hidden_size": "abc"}', "its wav2vec2 config.json does not describe a usable model"),
])
def test_wav2vec2_config_json_errors_name_the_file(smoke_dir, tmp_path, text, message):
    from keyface.audio import load_wav2vec2
    from keyface.checkpoints import CheckpointError

    folder = tmp_path / "w2v"
    shutil.copytree(smoke_dir / "wav2vec2-base-960h", folder)
    cfg = folder / "config.json"
    if text is None:
        cfg.write_bytes(b'{"a": "\xff"}')
    elif text.startswith('{"hidden_size"'):
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": "abc"}))
    else:
        cfg.write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        load_wav2vec2(folder)
    assert str(folder) in str(err.value)


_LOAD_AND_REPORT_PEAK = """
import json, sys
from keyface.audio import load_wav2vec2
from keyface.checkpoints import CheckpointError
try:
    load_wav2vec2(sys.argv[1])
    outcome = "loaded"
except CheckpointError as e:
    outcome = str(e)
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0] / 1024
print(json.dumps({"outcome": outcome, "peak_mib": peak}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_encoder_config_sizes_cost_no_memory(smoke_dir, tmp_path):
    """A config.json is a few bytes, and its sizes must not decide what is allocated. With
    hidden_size 4096 (intermediate 16384) beside the smoke weights, a loader that builds the encoder
    for real initialises 1.3 GB of weights before it finds that none fits (measured: peak RSS +1280
    MiB). Built on the meta device, only the file's tensors are taken: a shape mismatch naming the
    keys, at the peak memory of a normal load. (In a subprocess, for a clean peak.)"""
    folder = tmp_path / "w2v"
    shutil.copytree(smoke_dir / "wav2vec2-base-960h", folder)
    cfg = folder / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": 4096, "intermediate_size": 16384}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = {}
    for name, path in (("normal", smoke_dir / "wav2vec2-base-960h"), ("huge", folder)):
        run = subprocess.run([sys.executable, "-c", _LOAD_AND_REPORT_PEAK, str(path)], env=env, capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        runs[name] = json.loads(run.stdout.strip().splitlines()[-1])
    assert runs["normal"]["outcome"] == "loaded"
    assert "shape mismatch" in runs["huge"]["outcome"] and "(4096, 32)" in runs["huge"]["outcome"], runs["huge"]
    assert str(folder) in runs["huge"]["outcome"]
    assert runs["huge"]["peak_mib"] < runs["normal"]["peak_mib"] + 200, runs


@pytest.mark.parametrize("text,message", [
    ('{"version":1,"valence":[[0,0],[1e308,1]],"arousal":[[0,0]]}', "valence\\[1\\]: time must be in 0..86400 seconds, got 1e\\+308"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("{" * 100000, "curve is not valid JSON|nested too deeply"),
])
def test_emotion_curve_errors(text, message):
    with pytest.raises(E.EmotionCurveError, match=message):
        E.parse_curve(text)
    with pytest.raises(E.EmotionCurveError, match="time must be in 0..86400"):
        E.curve_from_named("happy@0, sad@1e308")


# ------------------------------------------------------------------------------- nodes (stubs)
@pytest.fixture(scope="module")
def pack():
    return _import_pack()


@pytest.fixture(scope="module")
def N(pack, smoke_dir):
    import folder_paths

    folder_paths.add_model_folder_path("keyface", str(smoke_dir))
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def node_models(N):
    vae, = N["KeyFaceVAELoader"]().load("svd_vae.safetensors")
    enc, = N["KeyFaceAudioEncoderLoader"]().load(
        "WavLM-Base+.pt", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", "wav2vec2-base-960h")
    kf, = N["KeyFaceKeyframeModelLoader"]().load("keyframe.pt")
    it, = N["KeyFaceInterpolationModelLoader"]().load("interpolation.pt", "interpolation_bad.pt")
    feats, n, audio, _ = N["KeyFaceEncodeAudio"]().encode(enc, _audio(1.0))
    return {"vae": vae, "enc": enc, "kf": kf, "it": it, "feats": feats}


@pytest.fixture(scope="module")
def node_clip(N, node_models):
    m = node_models
    kfs, _ = N["KeyFaceSampleKeyframes"]().sample(m["kf"], m["vae"], _image(), m["feats"], 5, 10, 2.0, 5.0, "crop")
    latent, = N["KeyFaceInterpolate"]().interpolate(m["it"], kfs, m["feats"], 5, 10, 2.0, True, 2)
    return {"kfs": kfs, "latent": latent}


@pytest.mark.parametrize("name,value", [("reference_scale", NAN), ("audio_scale", INF), ("seed", NAN), ("preview", "false"),
                                        ("fit", {"a": 1})])
def test_sample_keyframes_node_refuses_bad_widget_values(N, node_models, name, value):
    """JSON NaN passes ComfyUI's min/max comparison; the node itself must refuse it, naming the input."""
    m = node_models
    args = dict(keyframe_model=m["kf"], vae=m["vae"], image=_image(), audio_features=m["feats"], seed=5, steps=10,
                reference_scale=2.0, audio_scale=5.0, fit="crop")
    args[name] = value
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        N["KeyFaceSampleKeyframes"]().sample(**args)


def test_interpolate_node_refuses_nan_guidance(N, node_models, node_clip):
    m = node_models
    with pytest.raises(ValueError, match="^autoguidance_scale: expected a finite number in 0..20, got nan"):
        N["KeyFaceInterpolate"]().interpolate(m["it"], node_clip["kfs"], m["feats"], 5, 10, NAN, True, 2)


def test_nan_pixel_in_the_portrait_node(N, node_models):
    m = node_models
    img = _image()
    img[0, 3, 4, 2] = NAN
    with pytest.raises(ValueError, match="^image: identity image: 1 of .* not finite"):
        N["KeyFaceSampleKeyframes"]().sample(m["kf"], m["vae"], img, m["feats"], 5, 10, 2.0, 5.0, "crop")


def test_huge_float_audio_is_an_error_naming_the_amplitude(N, node_models):
    audio = _audio(1.0)
    audio["waveform"] = audio["waveform"] * 1e15
    with pytest.raises(ValueError, match="^audio: audio features \\(.*\\): the stage produced non-finite values.*peak "
                                         "amplitude is .*e\\+14; float audio is expected in -1..1"):
        N["KeyFaceEncodeAudio"]().encode(node_models["enc"], audio)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.float64])
def test_encode_audio_node_scales_integer_pcm(N, node_models, dtype):
    ref = _audio(1.0)
    scale = {torch.int16: 32767, torch.int32: 2**31 - 1, torch.float64: 1}[dtype]
    pcm = {"waveform": (ref["waveform"].double() * scale).round().to(dtype) if scale > 1 else ref["waveform"].double(),
           "sample_rate": 16000}
    feats, n, audio, _ = N["KeyFaceEncodeAudio"]().encode(node_models["enc"], pcm)
    assert audio["waveform"].dtype == torch.float32
    assert torch.allclose(audio["waveform"], ref["waveform"], atol=1e-4)  # the clip passed on to Save Video
    # the same features as the float clip of the same (quantised) samples: scaled by 2**15 / 2**31 exactly
    as_float = {"waveform": (pcm["waveform"].double() / (scale + 1 if scale > 1 else 1)).float(), "sample_rate": 16000}
    expected, *_ = N["KeyFaceEncodeAudio"]().encode(node_models["enc"], as_float)
    assert torch.allclose(feats.keyframe, expected.keyframe, atol=1e-4)
    assert torch.allclose(feats.interpolation, expected.interpolation, atol=1e-4)


def test_save_video_int16_audio_track(N, node_models, node_clip):
    import folder_paths

    ref = _audio(1.0)
    pcm = {"waveform": (ref["waveform"] * 32767).round().to(torch.int16), "sample_rate": 16000}
    out = N["KeyFaceSaveVideo"]().save(node_models["vae"], node_clip["latent"], pcm, "bad_inputs/int16", 16, 18)
    track, rate = read_audio_file(out["result"][0])
    body = track[0, 2000:14000]
    assert float(body.abs().max()) < 0.75 and float((body.abs() > 0.95).float().mean()) < 0.01, \
        "the int16 clip became a clipped square wave"
    assert Path(out["result"][0]).is_relative_to(folder_paths.get_output_directory())


def test_decode_node_latent_errors(N, node_models, node_clip):
    decode = N["KeyFaceDecode"]()
    with pytest.raises(ValueError, match="^latent: keyface_num_frames: expected an integer >= 1, got 'abc'"):
        decode.decode(node_models["vae"], dict(node_clip["latent"], keyface_num_frames="abc"), 16)
    with pytest.raises(ValueError, match="^chunk_frames: expected an integer in 1..256, got nan"):
        decode.decode(node_models["vae"], node_clip["latent"], NAN)
    nan_latent = dict(node_clip["latent"], samples=torch.full_like(node_clip["latent"]["samples"], NAN))
    with pytest.raises(ValueError, match="^segment latents: .* not finite"):  # a LATENT from another node
        decode.decode(node_models["vae"], nan_latent, 16)


def test_save_video_refuses_nul_in_filename_prefix(N, node_models, node_clip):
    with pytest.raises(ValueError, match="^filename_prefix: contains a NUL character"):
        N["KeyFaceSaveVideo"]().save(node_models["vae"], node_clip["latent"], _audio(1.0), "kf\x00x", 16, 18)


@pytest.mark.parametrize("node", ["encode", "emotion"])
def test_audio_sample_rate_as_text_names_the_input(N, node_models, node):
    audio = dict(_audio(1.0), sample_rate="16k")
    with pytest.raises(ValueError, match="^audio: sample_rate: expected the sample rate as a positive integer in Hz .* '16k'"):
        if node == "encode":
            N["KeyFaceEncodeAudio"]().encode(node_models["enc"], audio)
        else:
            N["KeyFaceEmotion"]().build("happy", "", 1.0, "happy, sad", 0.0, audio)


def test_emotion_node_errors(N):
    node = N["KeyFaceEmotion"]()  # its errors are the pack's own EmotionCurveError class: matched as ValueError
    with pytest.raises(ValueError, match="valence\\[1\\]: time must be in 0..86400"):
        node.build("custom curve", '{"version":1,"valence":[[0,0],[1e308,1]],"arousal":[[0,0]]}', 1.0)
    with pytest.raises(ValueError, match="nested too deeply"):
        node.build("custom curve", "[" * 100000 + "]" * 100000, 1.0)
    with pytest.raises(ValueError, match="^emotion: expected 'custom curve' or an emotion name \\(text\\), got dict"):
        node.build({"a": 1}, "{}", 1.0)
    # VALIDATE_INPUTS names only `curve` (ComfyUI's own checks cover emotion's list); a schedule sent as
    # a JSON object is refused when the node runs, naming the input
    with pytest.raises(ValueError, match="^schedule: expected"):
        node.build("happy", "", 1.0, {"a": 1})
    with pytest.raises(ValueError, match="^duration_hint: expected a finite number in 0..3600, got nan"):
        node.build("happy", "", 1.0, "", NAN)
    # integer audio gives the right duration (2 names spread over 1.0 s)
    pcm = {"waveform": (_audio(1.0)["waveform"] * 32767).to(torch.int16), "sample_rate": 16000}
    assert node.build("happy", "", 1.0, "happy, sad", 0.0, pcm)["ui"]["keyface_emotion"][0]["duration"] == 1.0


def test_per_frame_emotion_checks_intensity_and_fps_without_a_curve():
    with pytest.raises(E.EmotionCurveError, match="intensity must be in \\[0, 2\\], got nan"):
        E.per_frame_emotion(None, 10, intensity=NAN)  # used to be ignored when no curve was given
    with pytest.raises(E.EmotionCurveError, match="fps must be a finite number > 0, got nan"):
        E.per_frame_emotion("happy", 10, fps=NAN)


def test_mp4_writer_refuses_crf_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="^crf: expected an integer in 0..51, got 99"):
        Mp4Writer(tmp_path / "x.mp4", 16, 16, crf=99)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- CLI (subprocess)
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, smoke_dir):
    d = tmp_path_factory.mktemp("cli")
    (d / "folder").mkdir()
    (d / "curve_dir").mkdir()
    (d / "latin1.json").write_bytes(b'{"version": 1, "valence": [[0, 0.5]], "arousal": [[0, 0]], "x": "\xe9"}')
    return d


# option -> the start of the one-line error; the first ones (named in issue 9) run as real subprocesses
SUBPROCESS_CASES = [
    (["--device", "bogus"], "--device: 'bogus' is not a device; expected auto, cpu, cuda, cuda:N or mps"),
    (["--out", "{d}/folder"], "--out: {d}/folder is a folder; give the output file name"),
    (["--emotion-curve", "{d}/curve_dir"], "--emotion-curve: {d}/curve_dir is a folder; expected a UTF-8 text file"),
    (["--emotion-curve", "{d}/latin1.json"], "--emotion-curve: {d}/latin1.json is not UTF-8 text (byte 0xe9"),
]
if not torch.cuda.is_available():
    SUBPROCESS_CASES.append((["--device", "cuda"], "--device: 'cuda' is not available on this machine"))
IN_PROCESS_CASES = [
    (["--ref-ratio", "nan"], "--ref-ratio: expected a finite number, got nan"),
    (["--scale", "inf"], "--scale: expected a finite number, got inf"),
    (["--audio-ratio", "Infinity"], "--audio-ratio: expected a finite number, got inf"),
    (["--intensity", "nan"], "--intensity: expected a finite number in 0..2, got nan"),
    (["--crf", "99"], "--crf: expected an integer in 0..51, got 99"),
    (["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    (["--emotion-curve", "{d}/missing.json"], "--emotion-curve: file not found"),
    (["--emotion-curve", "{d}/deep.json"], "--emotion-curve: curve is nested too deeply"),
    (["--emotion", "happy@0, sad@1e308"], "--emotion: schedule entry 'sad@1e308': time must be in 0..86400 seconds"),
    (["--image", "{d}/folder"], "--image: {d}/folder is a folder; expected a file"),
    (["--audio", "{d}/folder"], "--audio: {d}/folder is a folder; expected a file"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "mps"], "--device: "),
    (["--chunk-frames", "0"], "--chunk-frames: chunk_frames must be an integer >= 1, got 0"),
    (["--steps", "5"], "--steps: keyframe_steps must be an integer >= 10, got 5"),
]


def _cli_args(cli_env, smoke_dir, extra):
    d = str(cli_env)
    args = {"--image": str(MEDIA / "face_grace_hopper.jpg"), "--audio": str(MEDIA / "speech_female_arctic_a0009.wav"),
            "--models": str(smoke_dir), "--out": str(cli_env / "out.mp4"), "--device": "cpu", "--threads": "1"}
    extra = [e.replace("{d}", d) for e in extra]
    args.update(dict(zip(extra[::2], extra[1::2])))
    return ["render", "--quiet"] + [x for kv in args.items() for x in kv]


def test_cli_bad_options_subprocess_one_line_exit_2(cli_env, smoke_dir):
    """``python -m keyface render`` with a bad option: exit 2, one line naming the option, no traceback,
    no output, before any model loads (the processes run side by side: each is mostly torch's import)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "keyface"] + _cli_args(cli_env, smoke_dir, extra), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra, _ in SUBPROCESS_CASES]
    for p, (extra, message) in zip(procs, SUBPROCESS_CASES):
        _, err = p.communicate(timeout=180)
        assert p.returncode == 2, (extra, err[-2000:])
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: " + message.replace("{d}", str(cli_env))), (extra, err)
    assert not (cli_env / "out.mp4").exists()


@pytest.mark.parametrize("extra,message", IN_PROCESS_CASES, ids=[" ".join(c[0]).replace("{d}/", "") for c in IN_PROCESS_CASES])
def test_cli_bad_options_in_process(cli_env, smoke_dir, capsys, extra, message):
    from keyface import cli

    (cli_env / "deep.json").write_text("[" * 100000 + "]" * 100000)
    assert cli.main(_cli_args(cli_env, smoke_dir, extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.replace("{d}", str(cli_env))), lines
    assert not (cli_env / "out.mp4").exists()
