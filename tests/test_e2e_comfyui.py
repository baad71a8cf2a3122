"""End to end against a real ComfyUI 0.3.75 (``.comfyui/``) with the pack and tiny smoke models.

The shipped workflow ``workflows/KeyFace - Talking head.json`` is converted from the UI format to an
API prompt with the server's ``/object_info``, submitted with a client id, followed on the websocket
and checked through ``/history`` and the files it writes. The test adds one SaveImage node on the
decoded frames (PNG, lossless) to compare two runs exactly.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from pathlib import Path

import pytest

import workflow_files
from comfy_server import ROOT, SPEECH, SPEECH_ODD, comfy_server, start_server  # noqa: F401  (session fixture)
from workflow_to_api import convert

pytestmark = pytest.mark.e2e

FPS = 25


def _load(name):
    """A shipped workflow by its name (scripts/workflow_files.py)."""
    return json.loads(workflow_files.workflow_path(name).read_text(encoding="utf-8"))


def _node_id(prompt, class_type):
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


class WsListener:
    """Collects websocket messages of one client id in a thread."""

    def __init__(self, url, client_id):
        import websocket

        self.messages = []
        self.ws = websocket.create_connection(url.replace("http://", "ws://") + f"/ws?clientId={client_id}", timeout=5)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import websocket

        while not self._stop:
            try:
                msg = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # noqa: BLE001 - closed
                break
            if isinstance(msg, str):
                try:
                    self.messages.append(json.loads(msg))
                except ValueError:
                    pass

    def close(self):
        self._stop = True
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(timeout=10)

    def of_type(self, t):
        return [m for m in self.messages if m.get("type") == t]


def _prompt(server, run_tag):
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    prompt[_node_id(prompt, "LoadAudio")]["inputs"]["audio"] = SPEECH_ODD
    decode = _node_id(prompt, "KeyFaceDecode")
    prompt["900"] = {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": f"e2e/{run_tag}/frame"}}
    prompt[_node_id(prompt, "SaveVideo")]["inputs"]["filename_prefix"] = f"e2e/{run_tag}/video"
    return prompt


def _run(server, run_tag):
    client_id = uuid.uuid4().hex
    ws = WsListener(server.url, client_id)
    try:
        t0 = time.monotonic()
        pid = server.submit(_prompt(server, run_tag), client_id)
        entry = server.wait(pid, timeout=400)
        wall = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        ws.close()
    return entry, wall, ws


def _outputs(server, entry, key):
    files = []
    for out in entry["outputs"].values():
        for item in out.get(key, []):
            if item.get("type") != "output":
                continue  # PreviewImage writes to the temp folder
            files.append(Path(server.output_dir) / item.get("subfolder", "") / item["filename"])
    return files


def _speech_seconds(name=SPEECH_ODD):
    import av

    with av.open(str(ROOT / "tests" / "fixtures" / "media" / name)) as c:
        s = c.streams.audio[0]
        n = sum(f.samples for f in c.decode(s))
        return n / s.codec_context.sample_rate, s.codec_context.sample_rate


def _png_frames(files):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in sorted(files)])


@pytest.fixture(scope="module")
def two_runs(comfy_server):
    server = comfy_server
    first = _run(server, "run1")
    server.free()  # drop the execution cache: the second run executes every node again
    time.sleep(1.0)
    second = _run(server, "run2")
    return first, second


def test_talking_head_workflow(comfy_server, two_runs, record_property):
    import av

    from keyface.planner import plan_clip
    from keyface.video_io import probe_mp4

    (entry, wall, ws), _ = two_runs
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]

    seconds, rate = _speech_seconds()
    n_expected = round(seconds * FPS)  # 77 for the 3.095 s clip (the original renders ceil(49520 / 640) = 78)
    assert n_expected != math.ceil(seconds * 16000 / 640) and plan_clip(n_expected).num_frames == n_expected

    videos = [p for p in _outputs(comfy_server, entry, "images") if p.suffix == ".mp4"]
    assert len(videos) == 1, videos
    info = probe_mp4(videos[0])
    assert info["frames"] == n_expected, info
    assert info["fps"] == FPS
    assert info["audio_seconds"] is not None
    # KeyFace Encode Audio's AUDIO is the clip cut or padded to exactly N / 25 s, so the track lasts
    # N / 25 s (to within one AAC frame of 1024 samples), and N = round(seconds x 25) is within half
    # a frame of the input (3.080 s for 3.095 s).
    assert abs(info["audio_seconds"] - n_expected / FPS) <= 1024 / info["audio_rate"] + 1e-6, (info, n_expected)
    assert abs(seconds - n_expected / FPS) <= 0.5 / FPS + 1e-9, (seconds, n_expected)
    with av.open(str(videos[0])) as c:
        assert c.streams.video[0].codec_context.name == "h264"

    pngs = [p for p in _outputs(comfy_server, entry, "images") if p.suffix == ".png"]
    assert len(pngs) == n_expected

    progress = ws.of_type("progress")
    assert progress, [m.get("type") for m in ws.messages]
    nodes_with_progress = {m["data"].get("node") for m in progress}
    prompt = _prompt(comfy_server, "x")
    for cls in ("KeyFaceSampleKeyframes", "KeyFaceInterpolate", "KeyFaceDecode"):
        assert _node_id(prompt, cls) in nodes_with_progress, (cls, nodes_with_progress)

    record_property("e2e_wall_seconds", round(wall, 1))
    record_property("e2e_frames", n_expected)
    art = ROOT / "test-artifacts"
    art.mkdir(exist_ok=True)
    (art / "e2e_comfyui.json").write_text(json.dumps({
        "speech_seconds": seconds, "frames": n_expected, "fps": FPS, "size": [info["width"], info["height"]],
        "audio_seconds": info["audio_seconds"], "workflow_wall_seconds": round(wall, 2),
        "server_start_seconds": round(comfy_server.startup_seconds, 2), "models": "keyface.smoke (random)",
    }, indent=1), encoding="utf-8")
    print(f"\nKeyFace e2e: {seconds:.3f} s of speech -> {n_expected} frames at {FPS} fps, "
          f"{info['width']}x{info['height']}; workflow wall time {wall:.1f} s "
          f"(server start {comfy_server.startup_seconds:.1f} s)")


def test_same_seed_same_frames(comfy_server, two_runs, record_property):
    (e1, w1, _), (e2, w2, ws2) = two_runs
    assert e2["status"]["status_str"] == "success", json.dumps(e2["status"], indent=1)[:4000]
    # the second run really executed (not served from the cache)
    cached = [m for m in ws2.of_type("execution_cached")]
    cached_nodes = {n for m in cached for n in m["data"].get("nodes", [])}
    prompt = _prompt(comfy_server, "x")
    assert _node_id(prompt, "KeyFaceInterpolate") not in cached_nodes
    f1 = _png_frames([p for p in _outputs(comfy_server, e1, "images") if p.suffix == ".png"])
    f2 = _png_frames([p for p in _outputs(comfy_server, e2, "images") if p.suffix == ".png"])
    assert f1.shape == f2.shape
    assert (f1 == f2).all(), f"max abs diff {abs(f1.astype(int) - f2.astype(int)).max()}"
    record_property("e2e_wall_seconds_run2", round(w2, 1))


def test_keyframe_checkpoint_in_interpolation_loader(comfy_server):
    server = comfy_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    loader = _node_id(prompt, "KeyFaceInterpolationModelLoader")
    prompt[loader]["inputs"]["model_name"] = "keyframe.pt"
    pid = server.submit(prompt)
    entry = server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    err = errors[0]
    assert err["node_id"] == loader
    assert "keyframe" in err["exception_message"] and "interpolation" in err["exception_message"], err
    assert err["exception_type"].endswith("CheckpointError"), err


MODEL_INPUTS = {
    "KeyFaceVAELoader": ("vae_name",),
    "KeyFaceAudioEncoderLoader": ("wavlm_name", "beats_name", "wav2vec2_name"),
    "KeyFaceKeyframeModelLoader": ("model_name",),
    "KeyFaceInterpolationModelLoader": ("model_name", "bad_model_name"),
}


def test_every_missing_model_is_reported_when_queued(comfy_server):
    """Issue 11.10: with model files missing, queueing the workflow is refused with one error per
    loader naming every missing file and where to download it, before anything runs (it used to fail
    at run time on the first loader, then on the next one after that was fixed, ...)."""
    server = comfy_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    for class_type, inputs in MODEL_INPUTS.items():
        for name in inputs:
            prompt[_node_id(prompt, class_type)]["inputs"][name] = f"absent_{name}.pt"
    before = set(server.get("/history"))
    r = server.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert r.status_code == 400, r.text[:2000]
    node_errors = r.json()["node_errors"]
    for class_type, inputs in MODEL_INPUTS.items():
        node = _node_id(prompt, class_type)
        assert node in node_errors, (class_type, sorted(node_errors))
        text = " ".join(e["details"] for e in node_errors[node]["errors"])
        for name in inputs:
            assert f"{name}: model 'absent_{name}.pt' was not found" in text, text
        assert text.count("download ") >= len(inputs), text  # each missing file says where it comes from
    keyframe_text = " ".join(e["details"] for e in node_errors[_node_id(prompt, "KeyFaceKeyframeModelLoader")]["errors"])
    assert "download keyframe.pt from Hugging Face toninio19/keyface" in keyframe_text
    assert set(server.get("/history")) == before  # nothing was queued, so nothing ran


def test_workflow_templates_served(comfy_server):
    listing = comfy_server.get("/api/workflow_templates")
    names = [n for v in listing.values() for n in v] if isinstance(listing, dict) else listing
    assert workflow_files.TALKING_HEAD in names and workflow_files.EMOTION_OVER_TIME in names, listing
    pack = next(k for k, v in listing.items() if workflow_files.TALKING_HEAD in v)
    wf = comfy_server.get(f"/api/workflow_templates/{pack}/{workflow_files.EMOTION_OVER_TIME}.json")
    assert wf["version"] == 0.4
    prompt = convert(wf, comfy_server.object_info())
    assert _node_id(prompt, "KeyFaceEmotion")
    emo = prompt[_node_id(prompt, "KeyFaceEmotion")]["inputs"]
    assert emo["emotion"] == "custom curve" and json.loads(emo["curve"])["version"] == 1


def test_emotion_over_time_workflow(comfy_server, two_runs):
    """The second shipped workflow renders too (the emotion curve changes over the clip)."""
    from keyface.video_io import probe_mp4

    server = comfy_server
    prompt = convert(_load(workflow_files.EMOTION_OVER_TIME), server.object_info())
    prompt[_node_id(prompt, "SaveVideo")]["inputs"]["filename_prefix"] = "e2e/emotion/video"
    emo = _node_id(prompt, "KeyFaceEmotion")
    curve = json.loads(prompt[emo]["inputs"]["curve"])
    assert len({v for _, v in curve["valence"]}) > 1 and len({a for _, a in curve["arousal"]}) > 1
    t0 = time.monotonic()
    entry = server.wait(server.submit(prompt), timeout=400)
    wall = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    preview = entry["outputs"][emo]["keyface_emotion"][0]
    assert max(preview["valence"]) - min(preview["valence"]) > 0.5
    videos = [p for p in _outputs(server, entry, "images") if p.suffix == ".mp4"]
    assert len(videos) == 1
    seconds, _ = _speech_seconds(SPEECH)  # this workflow is run as shipped
    assert probe_mp4(videos[0])["frames"] == round(seconds * FPS)
    print(f"\nKeyFace e2e emotion workflow: {wall:.1f} s")


def test_features_of_another_clip_rejected(comfy_server, two_runs):
    """Interpolate given features of a different clip: the error names the input (through the server)."""
    import shutil

    server = comfy_server
    other = SPEECH_ODD  # this prompt is the workflow as shipped, which loads SPEECH
    shutil.copy(ROOT / "tests" / "fixtures" / "media" / other, Path(server.input_dir) / other)
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    enc_loader = _node_id(prompt, "KeyFaceAudioEncoderLoader")
    prompt["901"] = {"class_type": "LoadAudio", "inputs": {"audio": other}}
    prompt["902"] = {"class_type": "KeyFaceEncodeAudio", "inputs": {"audio_encoders": [enc_loader, 0], "audio": ["901", 0]}}
    interp = _node_id(prompt, "KeyFaceInterpolate")
    prompt[interp]["inputs"]["audio_features"] = ["902", 0]
    entry = server.wait(server.submit(prompt), timeout=300)
    assert entry["status"]["status_str"] == "error"
    err = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_id"] == interp and err["exception_type"] == "ValueError", err
    assert err["exception_message"].startswith("audio_features:") and "frames" in err["exception_message"], err


@pytest.fixture(scope="module")
def fp8_server(comfy_server, tmp_path_factory):
    """A second ComfyUI started with --fp8_e4m3fn-unet (weights stored in fp8, computed in fp32 on the
    CPU through comfy.ops.manual_cast), on the first server's smoke models."""
    server = start_server(base=tmp_path_factory.mktemp("comfyui_fp8"), models_dir=comfy_server.models_dir,
                          extra_args=["--fp8_e4m3fn-unet"])
    try:
        yield server
    finally:
        server.stop()


def test_fp8_unet_workflow(fp8_server):
    """Manual cast: the UNets keep fp8 weights and compute in ComfyUI's compute dtype (fp32 here)."""
    from keyface.video_io import probe_mp4

    server = fp8_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    prompt[_node_id(prompt, "LoadAudio")]["inputs"]["audio"] = SPEECH_ODD
    prompt[_node_id(prompt, "SaveVideo")]["inputs"]["filename_prefix"] = "e2e/fp8/video"
    t0 = time.monotonic()
    entry = server.wait(server.submit(prompt), timeout=300)
    wall = time.monotonic() - t0
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    log = server.log_text()
    for model in ("keyframe model", "interpolation models"):
        assert f"KeyFace: {model} weights torch.float8_e4m3fn, compute torch.float32" in log, log[-3000:]
    videos = [p for p in _outputs(server, entry, "images") if p.suffix == ".mp4"]
    seconds, _ = _speech_seconds()
    assert len(videos) == 1 and probe_mp4(videos[0])["frames"] == round(seconds * FPS)
    print(f"\nKeyFace e2e fp8 workflow: {wall:.1f} s (server start {server.startup_seconds:.1f} s)")


def _long_speech(server, seconds):
    """A WAV of the speech fixture repeated to at least ``seconds`` in the server's input folder."""
    import wave

    name = f"speech_long_{seconds}s.wav"
    with wave.open(str(ROOT / "tests" / "fixtures" / "media" / SPEECH_ODD), "rb") as src:
        params, pcm = src.getparams(), src.readframes(src.getnframes())
        repeats = math.ceil(seconds * src.getframerate() / src.getnframes())
    with wave.open(str(Path(server.input_dir) / name), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(pcm * repeats)
    return name


def test_cancel_during_save_video_leaves_no_file(comfy_server):
    """POST /interrupt while KeyFace Save Video streams a clip: the prompt ends interrupted in /history
    and no mp4 (nor a partial file) is left in the output folder."""
    server = comfy_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    for cls in ("SaveVideo", "CreateVideo", "KeyFaceDecode", "PreviewImage"):
        del prompt[_node_id(prompt, cls)]
    prompt[_node_id(prompt, "LoadAudio")]["inputs"]["audio"] = _long_speech(server, 12)
    prompt[_node_id(prompt, "KeyFaceSampleKeyframes")]["inputs"]["preview"] = False
    interp = _node_id(prompt, "KeyFaceInterpolate")
    prompt[interp]["inputs"]["autoguidance"] = False  # half the cost: the test is about the save
    save = "950"
    prompt[save] = {"class_type": "KeyFaceSaveVideo", "inputs": {
        "vae": [_node_id(prompt, "KeyFaceVAELoader"), 0], "latent": [interp, 0],
        "audio": [_node_id(prompt, "KeyFaceEncodeAudio"), 2], "filename_prefix": "e2e/cancel/KeyFace",
        "chunk_frames": 1, "crf": 23}}
    client_id = uuid.uuid4().hex
    ws = WsListener(server.url, client_id)
    try:
        t0 = time.monotonic()
        pid = server.submit(prompt, client_id)
        while not any(m["data"].get("node") == save for m in ws.of_type("progress")):
            assert time.monotonic() - t0 < 120, "KeyFace Save Video never reported progress"
            time.sleep(0.05)
        t_save = time.monotonic() - t0
        assert server.post("/interrupt", {"prompt_id": pid}).status_code == 200
        entry = server.wait(pid, timeout=60)
        wall = time.monotonic() - t0
    finally:
        ws.close()
    assert entry["status"]["status_str"] == "error", entry["status"]
    kinds = {m[0]: m[1] for m in entry["status"]["messages"]}
    assert "execution_interrupted" in kinds and kinds["execution_interrupted"]["node_id"] == save, kinds
    assert "execution_error" not in kinds, kinds["execution_error"]
    folder = Path(server.output_dir) / "e2e" / "cancel"
    assert folder.is_dir()  # the save had started: KeyFace Save Video makes the folder first
    left = [p for p in folder.rglob("*") if p.is_file()]
    assert left == [], left
    print(f"\nKeyFace e2e cancel: save started after {t_save:.1f} s, interrupted prompt ended after {wall:.1f} s")


def test_image_batch_notice_reaches_the_client(comfy_server):
    """Several portraits where one is expected: the first is used, and the queuing client gets a
    ``keyface.notice`` websocket event (js/keyface_notices.js shows it as a toast)."""
    server = comfy_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    for cls in ("SaveVideo", "CreateVideo", "KeyFaceDecode", "KeyFaceInterpolate"):
        del prompt[_node_id(prompt, cls)]
    sample = _node_id(prompt, "KeyFaceSampleKeyframes")
    prompt["960"] = {"class_type": "RepeatImageBatch",
                     "inputs": {"image": [_node_id(prompt, "LoadImage"), 0], "amount": 2}}
    prompt[sample]["inputs"].update(image=["960", 0], preview=True)
    client_id = uuid.uuid4().hex
    ws = WsListener(server.url, client_id)
    try:
        entry = server.wait(server.submit(prompt, client_id), timeout=120)
        time.sleep(0.3)
    finally:
        ws.close()
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    notices = [m["data"] for m in ws.of_type("keyface.notice")]
    assert len(notices) == 1 and "2 images" in notices[0]["detail"] and "first" in notices[0]["detail"], notices


def test_nan_guidance_is_an_error_not_a_black_video(comfy_server):
    """JSON ``NaN`` for a FLOAT input passes ComfyUI's own min/max check (every comparison with NaN is
    false); before issue 9 it sampled NaN latents and saved an all-black mp4 as a success. Now the
    sampler refuses it, naming the input, and nothing is written."""
    import requests

    server = comfy_server
    prompt = convert(_load(workflow_files.TALKING_HEAD), server.object_info())
    sampler = _node_id(prompt, "KeyFaceSampleKeyframes")
    prompt[sampler]["inputs"]["reference_scale"] = float("nan")
    prompt[_node_id(prompt, "SaveVideo")]["inputs"]["filename_prefix"] = "e2e/nan_guidance/video"
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex})  # Python writes the JSON literal NaN
    assert '"reference_scale": NaN' in body
    r = requests.post(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text[:4000]  # ComfyUI's validation lets NaN through
    entry = server.wait(r.json()["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"], indent=1)[:4000]
    err = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_id"] == sampler, err
    assert err["exception_message"].startswith("reference_scale: expected a finite number in 0..20, got nan"), err
    written = Path(server.output_dir) / "e2e" / "nan_guidance"
    assert not written.exists() or not any(written.iterdir())
