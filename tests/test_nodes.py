"""Node adapters under the ComfyUI stubs (tests/comfy_stubs.py), no server.

Uses tiny smoke models (keyface.smoke) and a short clip so the whole module runs in well under a
minute on two cores.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

import comfy_stubs

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
PACK = "keyface_pack_under_test"


def _import_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pack():
    return _import_pack()


@pytest.fixture(scope="module")
def N(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(autouse=True)
def _stub_state():
    comfy_stubs.reset()
    yield
    comfy_stubs.reset()




@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory, pack):
    import folder_paths

    d = tmp_path_factory.mktemp("kf_models")
    smoke = importlib.import_module(PACK + ".keyface.smoke")
    smoke.write_smoke_models(d, seed=0)
    folder_paths.add_model_folder_path("keyface", str(d))
    return d


@pytest.fixture(scope="module")
def models(N, smoke_dir, one_thread):
    vae, = N["KeyFaceVAELoader"]().load("svd_vae.safetensors")
    enc, = N["KeyFaceAudioEncoderLoader"]().load(
        "WavLM-Base+.pt", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", "wav2vec2-base-960h")
    kf, = N["KeyFaceKeyframeModelLoader"]().load("keyframe.pt")
    it, = N["KeyFaceInterpolationModelLoader"]().load("interpolation.pt", "interpolation_bad.pt")
    return {"vae": vae, "enc": enc, "kf": kf, "it": it}


def run_node(N, class_name, **inputs):
    """Call a node the way ComfyUI does: by input name. Every name must be one of its INPUT_TYPES and
    every required input given, so a renamed or reordered input breaks the test, not its meaning."""
    cls = N[class_name]
    spec = cls.INPUT_TYPES()
    required, optional = spec.get("required", {}), spec.get("optional", {})
    unknown = sorted(set(inputs) - set(required) - set(optional))
    missing = sorted(set(required) - set(inputs))
    assert not unknown and not missing, f"{class_name}: unknown inputs {unknown}, missing {missing}"
    return getattr(cls(), cls.FUNCTION)(**inputs)



def _audio(seconds=1.0, sr=16000, batch=1):
    import torch

    t = torch.arange(int(seconds * sr)) / sr
    wf = 0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t))
    return {"waveform": wf.reshape(1, 1, -1).repeat(batch, 1, 1).float(), "sample_rate": sr}


def _image(batch=1, h=80, w=64):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, h, w, 3, generator=g)


@pytest.fixture(scope="module")
def clip(N, models):
    """Features and keyframes of a 1.0 s clip (25 frames, 2 segments)."""
    feats, n, audio, fps = N["KeyFaceEncodeAudio"]().encode(models["enc"], _audio(1.0))
    kfs, preview = N["KeyFaceSampleKeyframes"]().sample(models["kf"], models["vae"], _image(), feats, 5, 10, 2.0, 5.0,
                                                        "crop")
    assert preview.shape == (1, 64, 64, 3) and not preview.any()  # preview off: a placeholder, nothing decoded
    return {"feats": feats, "n": n, "audio": audio, "fps": fps, "kfs": kfs}


# ---------------------------------------------------------------------------------- declarations
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_declarations_consistent(pack, N):
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(N)
    expected = {"KeyFaceVAELoader", "KeyFaceAudioEncoderLoader", "KeyFaceKeyframeModelLoader",
                "KeyFaceInterpolationModelLoader", "KeyFaceEncodeAudio", "KeyFaceSampleKeyframes",
                "KeyFaceInterpolate", "KeyFaceDecode", "KeyFaceSaveVideo", "KeyFaceEmotion"}
    assert expected <= set(N)
    produced = {"IMAGE", "AUDIO", "LATENT", "INT", "FLOAT", "STRING", "MASK", "VIDEO"}
    for cls in N.values():
        produced |= set(cls.RETURN_TYPES)
    for name, cls in N.items():
        assert cls.CATEGORY == "KeyFace", name
        assert isinstance(cls.RETURN_TYPES, tuple), name
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name
        if hasattr(cls, "OUTPUT_TOOLTIPS"):
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        assert getattr(cls, "DESCRIPTION", ""), name
        spec = cls.INPUT_TYPES()
        fn = getattr(cls, cls.FUNCTION)
        params = inspect.signature(fn).parameters
        required = spec.get("required", {})
        optional = spec.get("optional", {})
        for inp, s in {**required, **optional}.items():
            assert inp in params, (name, inp)
            kind = s[0]
            opts = s[1] if len(s) > 1 else {}
            assert opts.get("tooltip"), (name, inp)
            if isinstance(kind, list):
                assert kind, (name, inp)
                if "default" in opts:
                    assert opts["default"] in kind
            elif kind not in WIDGET_TYPES:
                assert kind in produced, f"{name}.{inp}: nothing produces {kind}"
            if kind in ("INT", "FLOAT") and "default" in opts:
                assert opts.get("min", -math.inf) <= opts["default"] <= opts.get("max", math.inf), (name, inp)
        for p, v in params.items():
            if p == "self" or v.default is not inspect.Parameter.empty:
                continue
            assert p in required, f"{name}: argument {p} is not a required input"
        if not getattr(cls, "OUTPUT_NODE", False):
            assert cls.RETURN_TYPES, name


def test_sampler_defaults(N):
    req = N["KeyFaceSampleKeyframes"].INPUT_TYPES()["required"]
    assert req["reference_scale"][1]["default"] == 2.0 and req["audio_scale"][1]["default"] == 5.0
    assert N["KeyFaceInterpolate"].INPUT_TYPES()["required"]["autoguidance_scale"][1]["default"] == 2.0
    assert req["fit"][0] == ["crop", "pad"]
    assert "emotion" in N["KeyFaceSampleKeyframes"].INPUT_TYPES()["optional"]
    enc = N["KeyFaceEncodeAudio"]
    assert enc.RETURN_TYPES == ("KEYFACE_AUDIO_FEATURES", "INT", "AUDIO", "FLOAT")
    assert N["KeyFaceInterpolate"].RETURN_TYPES == ("LATENT",)


# ------------------------------------------------------------------------------- model folders
def test_folder_registration_merges(pack):
    import folder_paths

    common = importlib.import_module(PACK + ".nodes._common")
    saved = folder_paths.folder_names_and_paths.pop("keyface", None)
    try:
        folder_paths.add_model_folder_path("keyface", "/from/extra_model_paths")  # as the YAML does, ext set empty
        common.register_folders()
        paths, exts = folder_paths.folder_names_and_paths["keyface"]
        assert paths[0] == "/from/extra_model_paths"
        assert os.path.join(folder_paths.models_dir, "keyface") in paths
        assert ".safetensors" in exts and ".pt" in exts and ".json" not in exts
        common.register_folders()  # idempotent
        assert folder_paths.folder_names_and_paths["keyface"][0].count("/from/extra_model_paths") == 1
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["keyface"] = saved


def test_choices_list_released_names_and_folders(N, smoke_dir):
    req = N["KeyFaceAudioEncoderLoader"].INPUT_TYPES()["required"]
    assert req["wav2vec2_name"][0][0] == "wav2vec2-base-960h"
    assert req["wavlm_name"][0][0] == "WavLM-Base+.pt"
    assert not any("model.safetensors" in c for c in req["wav2vec2_name"][0])
    assert N["KeyFaceVAELoader"].INPUT_TYPES()["required"]["vae_name"][0][0] == "svd_vae.safetensors"
    assert N["KeyFaceInterpolationModelLoader"].INPUT_TYPES()["required"]["bad_model_name"][0][0] == "interpolation_bad.pt"


def test_missing_model_names_the_input(N, smoke_dir):
    with pytest.raises(ValueError, match="model_name: model 'nope.pt' was not found.*download keyframe.pt from"):
        N["KeyFaceKeyframeModelLoader"]().load("nope.pt")


def test_loaders_validate_every_model_file_before_running(N, smoke_dir):
    """VALIDATE_INPUTS (run by ComfyUI for every node when a prompt is queued) names each missing file
    of a loader with its download hint, and accepts files that are there."""
    assert N["KeyFaceInterpolationModelLoader"].VALIDATE_INPUTS("interpolation.pt", "interpolation_bad.pt") is True
    msg = N["KeyFaceAudioEncoderLoader"].VALIDATE_INPUTS("WavLM-Base+.pt", "gone.pt", "nowhere")
    assert "wavlm_name" not in msg and "beats_name: model 'gone.pt' was not found" in msg
    assert "wav2vec2_name: model 'nowhere' was not found" in msg and "facebook/wav2vec2-base-960h" in msg
    assert N["KeyFaceVAELoader"].VALIDATE_INPUTS("../keyface/svd_vae.safetensors") is not True


def test_interpolation_checkpoint_in_keyframe_loader(N, smoke_dir):
    with pytest.raises(ValueError) as e:
        N["KeyFaceKeyframeModelLoader"]().load("interpolation.pt")
    assert type(e.value).__name__ == "CheckpointError"
    assert "interpolation" in str(e.value) and "keyframe model was expected" in str(e.value)


def test_keyframe_checkpoint_in_interpolation_loader(N, smoke_dir):
    with pytest.raises(ValueError) as e:
        N["KeyFaceInterpolationModelLoader"]().load("keyframe.pt", "interpolation_bad.pt")
    assert type(e.value).__name__ == "CheckpointError"
    assert "keyframe" in str(e.value) and "interpolation" in str(e.value)


# ------------------------------------------------------------------------------------ running
def test_memory_manager_used(models):
    import comfy.model_patcher

    for key in ("vae", "kf"):
        assert isinstance(models[key].patcher, comfy.model_patcher.ModelPatcher)
    assert len(models["it"].patchers) == 2 and len(models["enc"].patchers) == 3


def test_encode_audio_clip_length(N, models):
    clip = _audio(1.03, sr=44100)  # 25.75 frames: round gives 26 (the original's ceil would too)
    feats, n, audio, fps = N["KeyFaceEncodeAudio"]().encode(models["enc"], clip)
    assert fps == 25.0
    assert n == feats.num_frames == feats.keyframe.shape[0] == feats.interpolation.shape[0] == 26
    # the AUDIO output lasts exactly N / 25 s at its own rate: 26 frames = 45864 samples, the 45423
    # of the clip followed by silence
    wf, src = audio["waveform"], clip["waveform"][0].float()
    assert audio["sample_rate"] == 44100 and wf.shape == (1, 1, 45864)
    assert wf[0, :, :src.shape[-1]].equal(src) and not wf[0, :, src.shape[-1]:].any()
    short = _audio(1.01, sr=44100)  # 25.25 frames: round gives 25 where ceil(640-sample frames) gives 26
    _, n, audio, _ = N["KeyFaceEncodeAudio"]().encode(models["enc"], short)
    assert n == 25 and audio["waveform"][0].equal(short["waveform"][0, :, :44100])  # cut to 1.000 s
    # 24 ms rounds to one frame: encoded as one frame, the AUDIO padded to exactly 40 ms (issue 9 item 8)
    tiny = _audio(0.024, sr=44100)
    feats, n, audio, _ = N["KeyFaceEncodeAudio"]().encode(models["enc"], tiny)
    assert n == feats.num_frames == 1 and audio["waveform"].shape == (1, 1, 1764)


def test_encode_audio_progress_inside_encoders_and_cancel(N, models):
    import comfy.model_management

    N["KeyFaceEncodeAudio"]().encode(models["enc"], _audio(1.0))
    values = [p[1] for p in comfy_stubs.STATE.progress]
    # one bar over the three encoders (100 steps each), moved from inside each encoder's layers
    assert {p[2] for p in comfy_stubs.STATE.progress} == {300} and values == sorted(values) and values[-1] == 300
    assert {v // 100 for v in values[:-1]} == {0, 1, 2}, values
    # the user cancels while BEATs (the second encoder) runs: the node stops there, no result
    comfy_stubs.reset()
    comfy_stubs.STATE.cancel_at_progress = 101
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        N["KeyFaceEncodeAudio"]().encode(models["enc"], _audio(1.0))
    assert 101 <= max(p[1] for p in comfy_stubs.STATE.progress) < 200  # wav2vec2 never reported
    for m in (models["enc"].wavlm, models["enc"].beats, models["enc"].wav2vec2):  # no hooks are left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_audio_encoders_fp32_comfy_ops_full_load(N, models, monkeypatch):
    import comfy.model_management

    # ComfyUI's text-encoder dtype would be fp16 on most GPUs; the encoders stay fp32 (node = CLI)
    monkeypatch.setattr(comfy.model_management, "text_encoder_dtype", lambda device=None: torch.float16)
    enc, = N["KeyFaceAudioEncoderLoader"]().load(
        "WavLM-Base+.pt", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", "wav2vec2-base-960h")
    for m in (enc.wavlm, enc.beats, enc.wav2vec2):
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    # BEATs is built from comfy.ops layers (partial offload works); the transformers models are not
    assert any(hasattr(m, "comfy_cast_weights") for m in enc.beats.modules())
    N["KeyFaceEncodeAudio"]().encode(enc, _audio(1.0))
    call, = comfy_stubs.STATE.load_calls
    assert call["force_full_load"] and len(call["models"]) == 3


def test_first_of_batch_warning(N, models, clip, caplog):
    node = N["KeyFaceSampleKeyframes"]()
    with caplog.at_level(logging.WARNING, logger="keyface"):
        two, _ = node.sample(models["kf"], models["vae"], _image(batch=3), clip["feats"], 5, 10, 2.0, 5.0, "crop")
    assert any("3 images" in r.getMessage() and "first" in r.getMessage() for r in caplog.records)
    # ... and the user is told in the UI: a websocket event to the queuing client (js/keyface_notices.js)
    (event, data, sid), = comfy_stubs.STATE.messages
    assert event == "keyface.notice" and sid == "stub-client" and data["severity"] == "warn"
    assert data["detail"].startswith("image holds 3 images") and "first" in data["detail"]
    # the first image alone gives the same keyframes
    assert (two.latents == clip["kfs"].latents).all()


def test_crop_and_pad_differ_never_squash(N, models, clip):
    pipeline = importlib.import_module(PACK + ".keyface.pipeline")
    img = _image(h=96, w=64)[0]
    crop = pipeline.prepare_identity(img, 64, "crop")
    pad = pipeline.prepare_identity(img, 64, "pad")
    assert crop.shape == pad.shape == (64, 64, 3)
    # crop keeps the centre rows unscaled; pad keeps every row (scaled) with repeated borders
    assert (crop - img[16:80]).abs().max() < 1e-6
    assert (pad[:, :10] - pad[:, 10:11]).abs().max() < 1e-6


def test_progress_bars_and_cancel_at_the_next_step(N, models, clip):
    import comfy.model_management

    inputs = dict(keyframe_model=models["kf"], vae=models["vae"], image=_image(), audio_features=clip["feats"],
                  seed=5, steps=10, reference_scale=2.0, audio_scale=5.0, fit="pad", preview=False)
    run_node(N, "KeyFaceSampleKeyframes", **inputs)
    prog = comfy_stubs.STATE.progress
    assert len(prog) > 1 and prog[-1][1] == prog[-1][2]  # step by step, finished at total
    assert comfy_stubs.STATE.loaded, "load_models_gpu was not called"
    # cancel pressed when the bar shows the first step: the node stops there (no later step reported)
    comfy_stubs.reset()
    comfy_stubs.STATE.cancel_at_progress = 1
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(N, "KeyFaceSampleKeyframes", **inputs)
    assert [p[1] for p in comfy_stubs.STATE.progress] == [1]


def test_features_from_other_clip_rejected(N, models, clip):
    other, _, _, _ = N["KeyFaceEncodeAudio"]().encode(models["enc"], _audio(2.0))
    with pytest.raises(ValueError, match="audio_features"):
        run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=other,
            seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=2)


def test_interpolate_decode_save(N, models, clip, tmp_path):
    import folder_paths

    from keyface.video_io import probe_mp4

    lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=2)
    s = clip["kfs"].plan.num_segments
    assert lat["samples"].shape == (s * 14, 4, 8, 8) and lat["keyface_num_frames"] == clip["n"]
    assert any(p[2] for p in comfy_stubs.STATE.progress)
    imgs, = N["KeyFaceDecode"]().decode(models["vae"], lat, 7)
    assert imgs.shape == (clip["n"], 64, 64, 3) and imgs.device.type == "cpu"
    assert 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    imgs2, = N["KeyFaceDecode"]().decode(models["vae"], lat, 16)
    # per-frame decode: the chunk size changes only float rounding (batched convolutions), not the frames
    assert (imgs - imgs2).abs().max() < 1e-4
    _, prev = N["KeyFaceSampleKeyframes"]().sample(models["kf"], models["vae"], _image(), clip["feats"], 5, 10, 2.0,
                                                   5.0, "crop", preview=True)
    assert prev.shape == (clip["kfs"].latents.shape[0], 64, 64, 3) and prev.std() > 0

    folder_paths.output_directory = str(tmp_path)
    out = N["KeyFaceSaveVideo"]().save(models["vae"], lat, clip["audio"], "kf/t", 16, 23)
    path = Path(out["result"][0])
    assert path.is_file() and out["result"][1] == clip["n"]
    assert out["ui"]["images"][0]["filename"] == path.name
    assert probe_mp4(path)["frames"] == clip["n"]

    with pytest.raises(ValueError, match="latent"):
        N["KeyFaceDecode"]().decode(models["vae"], {"samples": lat["samples"]}, 16)


def test_cancel_mid_decode_leaves_no_file(N, models, clip, tmp_path):
    import comfy.model_management
    import folder_paths

    lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=False, segments_per_call=2)
    folder_paths.output_directory = str(tmp_path)
    comfy_stubs.reset()
    comfy_stubs.STATE.cancel_at_progress = 1  # cancel once the first chunk is written
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        N["KeyFaceSaveVideo"]().save(models["vae"], lat, clip["audio"], "kf/cancel", 4, 23)
    assert [p[1] for p in comfy_stubs.STATE.progress] == [1]  # stopped mid-decode, not at the end
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_cancel_mid_sampling(N, models, clip):
    import comfy.model_management

    comfy_stubs.reset()
    comfy_stubs.STATE.cancel_at_progress = 1
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
            seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=1)
    assert [p[1] for p in comfy_stubs.STATE.progress] == [1]  # no step after the cancel
    assert comfy_stubs.STATE.interrupt is False  # the flag is consumed, as in ComfyUI


@pytest.mark.parametrize("make,message", [
    (lambda: {"waveform": 0.3 * torch.ones(1, 1, 300), "sample_rate": 16000}, "rounds to 0 video frames"),
    (lambda: {"waveform": torch.zeros(1, 2, 16000), "sample_rate": 16000}, "silent"),
    (lambda: {"waveform": torch.cat([0.1 * torch.ones(1, 1, 8000), torch.full((1, 1, 1), float("nan"))], -1),
              "sample_rate": 16000}, "NaN"),
])
def test_encode_audio_rejects_unusable_audio(N, models, make, message):
    """Too short (rounds to 0 frames: < 20 ms), silent or NaN audio: a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message) as err:
        N["KeyFaceEncodeAudio"]().encode(models["enc"], make())
    assert str(err.value).startswith("audio")


# ------------------------------------------------------------------------ dtypes and manual cast
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_manual_cast_computes_in_comfy_compute_dtype(N, smoke_dir, clip, monkeypatch, weight_dtype):
    """--bf16-unet / --fp8_e4m3fn-unet on a CPU: ComfyUI stores the weights in that dtype and picks
    float32 compute (manual cast); every network must then run in float32."""
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "unet_dtype", lambda **kw: weight_dtype)
    monkeypatch.setattr(comfy.model_management, "unet_manual_cast", lambda *a, **kw: torch.float32)
    kf, = N["KeyFaceKeyframeModelLoader"]().load("keyframe.pt")
    it, = N["KeyFaceInterpolationModelLoader"]().load("interpolation.pt", "interpolation_bad.pt")
    nets = [kf.network, it.good, it.bad]
    seen = []
    hooks = [n.diffusion_model.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].dtype),
                                                         with_kwargs=True) for n in nets]
    try:
        for n in nets:
            assert n.compute_dtype == torch.float32
            assert next(n.diffusion_model.parameters()).dtype == weight_dtype  # stored as ComfyUI chose
            if n is not it.bad:  # the bad network's projection is unused (autoguidance shares the good one's tokens)
                assert n.audio_projection.linear.weight.dtype == weight_dtype
                assert n.audio_projection.compute_dtype == torch.float32
        kfs, _ = N["KeyFaceSampleKeyframes"]().sample(kf, clip_vae(N, smoke_dir), _image(), clip["feats"], 5, 10,
                                                      2.0, 5.0, "crop")
        lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=it, keyframes=kfs, audio_features=clip["feats"],
            seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=2)
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {torch.float32}
    assert torch.isfinite(lat["samples"]).all()


def clip_vae(N, smoke_dir):
    return N["KeyFaceVAELoader"]().load("svd_vae.safetensors")[0]


# -------------------------------------------------------------------------------- working memory
def test_memory_required_scales_with_stage_shapes(N, models, clip):
    memory = importlib.import_module(PACK + ".keyface.memory")  # the library owns the estimates
    calls = comfy_stubs.STATE.load_calls

    def memory_of(patcher_owner):
        return [c["memory_required"] for c in calls if patcher_owner in c["models"]]

    # keyframes: one call = 3 guidance branches x 14 frames of 8x8 latents (the smoke model's 64 px)
    run_node(N, "KeyFaceSampleKeyframes", keyframe_model=models["kf"], vae=models["vae"], image=_image(), audio_features=clip["feats"],
        seed=5, steps=10, reference_scale=2.0, audio_scale=5.0, fit="crop", preview=False)
    assert memory_of(models["kf"].patcher) == [memory.unet_call_bytes(42, (8, 8), torch.float32)]
    assert memory.unet_call_bytes(42, (8, 8), torch.float32) == 2 * memory.unet_call_bytes(42, (8, 8), torch.float16)
    assert memory.unet_call_bytes(42, (64, 64), torch.float32) == 64 * memory.unet_call_bytes(42, (8, 8), torch.float32)

    # interpolation: grows with segments_per_call (14 frames each)
    mem = {}
    for spc in (1, 2):
        calls.clear()
        run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
            seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=spc)
        mem[spc], = memory_of(models["it"].patchers[0])
    assert mem[1] == memory.unet_call_bytes(14, (8, 8), torch.float32) > 0 and mem[2] == 2 * mem[1]

    # decode: grows with the chunk (+ the shared keyframes decoded twice), at the output size
    lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=False, segments_per_call=2)
    dec = {}
    for chunk in (4, 16):
        calls.clear()
        N["KeyFaceDecode"]().decode(models["vae"], lat, chunk)
        dec[chunk], = memory_of(models["vae"].patcher)
    vae = models["vae"]
    common = importlib.import_module(PACK + ".nodes._common")
    assert dec[4] == common.decode_memory(vae, 4 + 0 + 1, (8, 8))
    assert dec[16] == common.decode_memory(vae, 16 + 1 + 1, (8, 8)) > dec[4]
    assert common.decode_memory(vae, 1, (64, 64)) == 64 * common.decode_memory(vae, 1, (8, 8))


def test_decode_chunks_fit_the_free_memory_comfyui_reports(N, models, clip):
    """Issue 9 item 9: the decoders ask ComfyUI's memory manager what is free on the VAE's device and
    decode fewer frames per call when the requested chunk would not fit; the frames stay the same."""
    vae_module = importlib.import_module(PACK + ".keyface.vae")
    pipeline = importlib.import_module(PACK + ".keyface.pipeline")
    lat, = N["KeyFaceInterpolate"]().interpolate(models["it"], clip["kfs"], clip["feats"], 5, 10, 2.0, False, 2)
    vae = models["vae"]
    per_row = vae_module.decode_memory(vae.vae.decoder.config, 1, (8, 8), vae.compute_dtype)
    calls = []
    real = vae.vae.decode

    def counting(latents, *a, **k):
        calls.append(latents.shape[0])
        return real(latents, *a, **k)

    vae.vae.decode = counting
    try:
        comfy_stubs.STATE.free_memory = 64 << 30  # plenty: the requested 16 frames (+ 2 shared) per call
        roomy, = N["KeyFaceDecode"]().decode(vae, lat, 16)
        roomy_calls, calls[:] = list(calls), []
        # room for 6 latent rows: 5 frames (+ at most 1 shared keyframe) per call
        comfy_stubs.STATE.free_memory = int(6 * per_row / pipeline.DECODE_MEMORY_FRACTION) + 1
        tight, = N["KeyFaceDecode"]().decode(vae, lat, 16)
        tight_calls = list(calls)
    finally:
        vae.vae.decode = real
    assert comfy_stubs.STATE.free_memory_asked and comfy_stubs.STATE.free_memory_asked[-1] == vae.device
    n = roomy.shape[0]
    assert len(roomy_calls) == -(-n // 16) and len(tight_calls) == -(-n // 5)
    assert max(tight_calls) <= 6
    torch.testing.assert_close(tight, roomy, rtol=0, atol=1e-5)


def test_decoded_batch_that_does_not_fit_is_refused_by_name(N, models, clip):
    """KeyFace Decode fills one IMAGE batch chunk by chunk; where the whole batch (N x H x W x 3 float32)
    exceeds what ComfyUI reports free, it says so and points at KeyFace Save Video, instead of swapping or
    getting the server killed. At exactly the batch's size it decodes."""
    lat, = N["KeyFaceInterpolate"]().interpolate(models["it"], clip["kfs"], clip["feats"], 5, 10, 2.0, False, 2)
    n = clip["n"]
    need = n * 64 * 64 * 3 * 4
    comfy_stubs.STATE.free_memory = need - 1
    with pytest.raises(MemoryError, match=rf"KeyFace Decode: {n} frames of 64x64 are .* GB as an IMAGE batch, "
                                          r"more than the .* GB free \(cpu\)\. For long clips use KeyFace Save Video"):
        N["KeyFaceDecode"]().decode(models["vae"], lat, 16)
    comfy_stubs.STATE.free_memory = need
    frames, = N["KeyFaceDecode"]().decode(models["vae"], lat, 16)
    assert frames.shape == (n, 64, 64, 3) and torch.isfinite(frames).all()


def test_decode_never_returns_unfilled_frames(N, models, clip, monkeypatch):
    """Decode fills a batch allocated uninitialised: a decoder that stops short is an error, not a batch
    whose last frames are whatever the memory held."""
    decode_mod = importlib.import_module(PACK + ".nodes.decode")
    lat, = N["KeyFaceInterpolate"]().interpolate(models["it"], clip["kfs"], clip["feats"], 5, 10, 2.0, False, 2)
    monkeypatch.setattr(decode_mod, "decode_chunks", lambda *a: iter([torch.zeros(3, 64, 64, 3)]))
    with pytest.raises(RuntimeError, match=rf"the decoder gave 3 of the clip's {clip['n']} frames"):
        N["KeyFaceDecode"]().decode(models["vae"], lat, 16)


# ---------------------------------------------------------------------------- LATENT convention
def test_latent_holds_raw_vae_latents(N, models, clip):
    """ComfyUI LATENTs are raw VAE latents (its VAE encode/decode apply no scale factor): Interpolate
    divides the sampler's latents by 0.18215 and Decode multiplies them back."""
    pipeline = importlib.import_module(PACK + ".keyface.pipeline")
    scale = importlib.import_module(PACK + ".keyface.vae").SCALE_FACTOR
    lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=2)
    it = models["it"]
    sampled = pipeline.interpolate_segments(it.good, it.bad, clip["kfs"].latents, clip["feats"].interpolation,
                                            clip["kfs"].plan, seed=5, steps=10, scale=2.0, segments_per_call=2)
    assert torch.allclose(lat["samples"] * scale, sampled.reshape(-1, *sampled.shape[2:]), atol=1e-6)

    imgs, = N["KeyFaceDecode"]().decode(models["vae"], lat, 16)
    segs = (lat["samples"] * scale).reshape(-1, 14, *lat["samples"].shape[1:])
    ref = torch.cat(list(pipeline.decode_segments(models["vae"].vae, segs, clip["n"], chunk_frames=16)))
    assert torch.allclose(imgs, ref, atol=1e-6)


# ------------------------------------------------------------------------- preview progress, cancel
def test_keyframe_preview_progress_and_cancel(pack, models, clip):
    import comfy.model_management

    sampling = importlib.import_module(PACK + ".nodes.sampling")
    k = clip["kfs"].latents.shape[0]
    images = sampling.decode_keyframes(clip["kfs"], models["vae"], chunk_frames=1)
    assert images.shape[0] == k and [p[1:] for p in comfy_stubs.STATE.progress] == [(i, k) for i in range(1, k + 1)]
    comfy_stubs.reset()
    comfy_stubs.STATE.cancel_at_progress = 1  # cancel once the first chunk is shown
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sampling.decode_keyframes(clip["kfs"], models["vae"], chunk_frames=1)
    assert [p[1:] for p in comfy_stubs.STATE.progress] == [(1, k)]  # no chunk decoded after it


def test_save_video_audio_is_exactly_the_video_length(N, models, clip, tmp_path):
    """Audio shorter than the video is padded with silence (longer is cut): both last N / 25 s."""
    import folder_paths

    from keyface.video_io import probe_mp4

    lat, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=False, segments_per_call=2)
    folder_paths.output_directory = str(tmp_path)
    n, sr = clip["n"], 16000
    for seconds in (0.9, 1.3):
        out = N["KeyFaceSaveVideo"]().save(models["vae"], lat, _audio(seconds, sr=sr), f"kf/len{seconds}", 16, 23)
        info = probe_mp4(out["result"][0])
        assert info["frames"] == n
        assert abs(info["audio_seconds"] - n / 25) <= 1024 / sr, (seconds, info)


# ------------------------------------------------------------------------------- attention backend
def test_attention_input_reaches_the_samplers(pack, N, models, clip):
    """The samplers' optional 'attention' input lists exactly the library's backends and is applied:
    'math' gives the 'auto' result up to rounding, and a backend the CPU lacks is an error naming it."""
    import torch

    pipeline = importlib.import_module(PACK + ".keyface.pipeline")
    for name in ("KeyFaceSampleKeyframes", "KeyFaceInterpolate"):
        assert N[name].INPUT_TYPES()["optional"]["attention"][0] == list(pipeline.ATTENTION_BACKENDS)
    args = (models["kf"], models["vae"], _image(), clip["feats"], 5, 10, 2.0, 5.0, "crop")
    math_kfs, _ = N["KeyFaceSampleKeyframes"]().sample(*args, attention="math")
    assert torch.allclose(math_kfs.latents, clip["kfs"].latents, atol=1e-4)
    lat_auto, = run_node(N, "KeyFaceInterpolate", interpolation_model=models["it"], keyframes=clip["kfs"], audio_features=clip["feats"],
        seed=5, steps=10, autoguidance_scale=2.0, autoguidance=True, segments_per_call=2)
    lat_math, = N["KeyFaceInterpolate"]().interpolate(models["it"], clip["kfs"], clip["feats"], 5, 10, 2.0, True, 2,
                                                      attention="math")
    assert torch.allclose(lat_auto["samples"], lat_math["samples"], atol=1e-4)
    if not torch.cuda.is_available():  # the memory-efficient kernel is CUDA-only
        with pytest.raises(ValueError, match="attention='efficient'"):
            N["KeyFaceSampleKeyframes"]().sample(*args, attention="efficient")


# ------------------------------------------------------------------ cancel during Encode Audio (long)
def _cancel_after(delay, work):
    """Run ``work()`` in a thread, press "cancel" (ComfyUI's interrupt flag) after ``delay`` s and
    return the seconds from the press until ``work`` stopped with the interrupt exception.
    Fails when it is still running 10 s after the press (the clip takes minutes to encode)."""
    import threading

    import comfy.model_management

    stopped = {}

    def run():
        try:
            work()
        except comfy.model_management.InterruptProcessingException:
            stopped["at"] = time.perf_counter()
        except BaseException as e:  # noqa: BLE001  (reported below)
            stopped["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(delay)
    pressed = time.perf_counter()
    comfy_stubs.STATE.interrupt = True
    thread.join(timeout=10)
    assert not thread.is_alive(), f"cancel pressed {delay} s in: still encoding 10 s later"
    assert "error" not in stopped, stopped.get("error")
    assert "at" in stopped, "the encode finished instead of stopping"
    return stopped["at"] - pressed


@pytest.mark.parametrize("delay", [0.2, 1.5])
def test_cancel_during_encode_audio_of_a_10_minute_clip_lands_within_a_second(N, models, delay):
    """Issue 9.4: cancel used to wait for the running encoder to finish the whole clip (minutes on a
    10-minute clip). The library reports between small units of encoder work and the node checks
    the interrupt flag at each report. 0.2 s: inside WavLM's feature extractor; 1.5 s: its attention."""
    clip = _audio(600.0)
    comfy_stubs.reset()
    latency = _cancel_after(delay, lambda: N["KeyFaceEncodeAudio"]().encode(models["enc"], clip))
    assert latency < 1.0, f"cancel took {latency:.2f} s to land"
