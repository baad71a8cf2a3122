"""End to end in a real ComfyUI 0.3.75: the third shipped workflow,
``workflows/KeyFace - Full-size photo.json`` (a 1920x1080 photo -> KeyFace Detect & Crop
Face with the real MTCNN weights -> sampling with the smoke models -> KeyFace Save Video pasting every
chunk back into the photo -> a 1920x1080 mp4 with sound).

It also writes ``test-artifacts/face_before_after.jpg`` (the photo | a frame of the video), the
picture in the README. Where the MTCNN weights are missing it skips, and under ``CI=true`` fails.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

import face_fixtures as ff
import workflow_files
from comfy_server import ROOT, SPEECH, comfy_server  # noqa: F401  (session fixture)
from test_e2e_comfyui import WsListener, _node_id, _outputs, _speech_seconds
from workflow_to_api import convert

pytestmark = pytest.mark.e2e
WORKFLOW = workflow_files.workflow_path(workflow_files.FULL_SIZE_PHOTO)
FPS = 25


def _blocks(a, k=20):
    a = np.asarray(a, dtype=np.float64)
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def _before_after(photo, frame, path):
    from PIL import Image, ImageDraw

    w, h = 960, 540
    pic = Image.new("RGB", (2 * w + 10, h + 30), (255, 255, 255))
    pic.paste(Image.fromarray(photo).resize((w, h), Image.LANCZOS), (0, 30))
    pic.paste(Image.fromarray(frame).resize((w, h), Image.LANCZOS), (w + 10, 30))
    draw = ImageDraw.Draw(pic)
    draw.text((8, 8), "input photo 1920x1080", fill=(0, 0, 0))
    draw.text((w + 18, 8), "KeyFace video frame 1920x1080 (smoke weights: the face is noise)", fill=(0, 0, 0))
    pic.save(path, quality=85, optimize=True)  # JPEG: the README shows this file (docs/images/)


def test_photo_workflow_full_resolution(comfy_server, record_property):  # noqa: F811
    import av

    from keyface.video_io import probe_mp4

    ff.require_weights()
    server = comfy_server
    wf = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    prompt = convert(wf, server.object_info())
    detect = _node_id(prompt, "KeyFaceDetectCropFace")
    assert prompt[detect]["inputs"]["mode"] == "auto" and prompt[detect]["inputs"]["detector"] == "mtcnn"
    save = _node_id(prompt, "KeyFaceSaveVideo")
    assert prompt[save]["inputs"]["face_crop"] == [detect, 1]
    prompt[save]["inputs"]["filename_prefix"] = "e2e/face/KeyFace"
    client_id = uuid.uuid4().hex
    ws = WsListener(server.url, client_id)
    try:
        t0 = time.monotonic()
        entry = server.wait(server.submit(prompt, client_id), timeout=600)
        wall = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        ws.close()
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]

    videos = [p for p in _outputs(server, entry, "images") if p.suffix == ".mp4"]
    assert len(videos) == 1, videos
    info = probe_mp4(videos[0])
    seconds, _ = _speech_seconds(SPEECH)
    n = round(seconds * FPS)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (1920, 1080, n, FPS), info
    assert info["audio_seconds"] == pytest.approx(n / FPS, abs=1024 / info["audio_rate"])
    assert "face crop from face 0 of 1" in server.log_text()

    photo = ff.load_rgb(ff.PHOTO_WIDE)
    with av.open(str(videos[0])) as c:
        frames = [f.to_ndarray(format="rgb24") for i, f in zip(range(n // 2 + 1), c.decode(video=0))]
    frame = frames[-1]
    diff = np.abs(_blocks(frame) - _blocks(photo)).mean(axis=-1)  # [54, 96] blocks of 20 px
    # the face (detected at about x 1335..1564, y 341..612) is generated; the rest is the photo
    face_blocks = diff[341 // 20:612 // 20, 1335 // 20:1564 // 20]
    left_half = diff[:, :40]
    assert face_blocks.mean() > 15, face_blocks.mean()
    assert left_half.max() < 4, left_half.max()
    changed = np.argwhere(diff > 8)
    y0, x0 = changed.min(axis=0) * 20
    y1, x1 = (changed.max(axis=0) + 1) * 20
    assert 1100 < x0 and x1 < 1800 and 100 < y0 and y1 < 900, (x0, y0, x1, y1)  # only around the face

    art = ROOT / "test-artifacts"
    art.mkdir(exist_ok=True)
    _before_after(photo, frame, art / "face_before_after.jpg")
    record_property("e2e_face_wall_seconds", round(wall, 1))
    print(f"\nKeyFace e2e photo workflow: {n} frames 1920x1080 in {wall:.1f} s; changed region x {x0}..{x1}, "
          f"y {y0}..{y1}; before/after in test-artifacts/face_before_after.jpg")


def test_photo_workflow_served_as_template(comfy_server):  # noqa: F811
    listing = comfy_server.get("/api/workflow_templates")
    names = [n for v in listing.values() for n in v] if isinstance(listing, dict) else listing
    assert workflow_files.FULL_SIZE_PHOTO in names, listing
