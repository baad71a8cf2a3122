"""MTCNN face detection (keyface.face.mtcnn): network maths and the whole cascade against
facenet-pytorch's own code (from the same wheel as the weights), with random and real weights, and
real-photo results (two faces, no face, tiny, rotated, 4000x3000)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import face_fixtures as ff
from keyface.checkpoints import CheckpointError
from keyface.face import framing
from keyface.face import mtcnn as M
from keyface.face.mtcnn import (FaceDetectionError, MTCNN, detect_faces, detect_faces_raw, load_mtcnn,
                                locate_detector, nms, pick_face)


@pytest.fixture(scope="module")
def real():
    return load_mtcnn(ff.require_weights())


def _random_mtcnn(seed=0, face_bias=0.0) -> MTCNN:
    """Real architecture, random weights (std 0.1); ``face_bias`` pushes every stage towards "face" so
    that many windows survive all three stages and the cascade's box arithmetic is exercised."""
    g = torch.Generator().manual_seed(seed)
    model = MTCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in (model.pnet.conv4_1, model.rnet.dense5_1, model.onet.dense6_1):
            layer.bias.copy_(torch.tensor([-face_bias, face_bias]))
    return model.eval()


def _reference_nets(ours: MTCNN):
    ref_mtcnn, _ = ff.reference()
    nets = []
    for cls, mine in ((ref_mtcnn.PNet, ours.pnet), (ref_mtcnn.RNet, ours.rnet), (ref_mtcnn.ONet, ours.onet)):
        net = cls(pretrained=False)
        net.load_state_dict(mine.state_dict())  # same keys: our modules mirror the checkpoint
        nets.append(net.eval())
    return nets


def test_network_maths_match_reference_random_weights():
    ours = _random_mtcnn(seed=1)
    pnet, rnet, onet = _reference_nets(ours)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        x = torch.randn(2, 3, 37, 51, generator=g)
        for a, b in zip(ours.pnet(x), pnet(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        x = torch.randn(5, 3, 24, 24, generator=g)
        for a, b in zip(ours.rnet(x), rnet(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        x = torch.randn(5, 3, 48, 48, generator=g)
        for a, b in zip(ours.onet(x), onet(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _reference_detect(model, pixels_u8):
    _, ref_detect = ff.reference()
    with torch.no_grad():
        boxes, points = ref_detect.detect_face(pixels_u8, 20, *_reference_nets(model), [0.6, 0.7, 0.7], 0.709, "cpu")
    b = np.asarray(boxes[0], dtype=np.float64).reshape(-1, 5)
    p = np.asarray(points[0], dtype=np.float64).reshape(-1, 5, 2)
    return b, p


def _sorted(boxes, points):
    order = np.lexsort((boxes[:, 1], boxes[:, 0]))
    return boxes[order], points[order]


def _assert_same_detections(model, pixels_u8, atol=1e-3):
    ref_b, ref_p = _sorted(*_reference_detect(model, pixels_u8))
    b, p = detect_faces_raw(model, torch.from_numpy(pixels_u8).float())
    b, p = _sorted(b.double().numpy(), p.double().numpy())
    assert b.shape == ref_b.shape, (b.shape, ref_b.shape)
    np.testing.assert_allclose(b, ref_b, rtol=0, atol=atol)
    np.testing.assert_allclose(p, ref_p, rtol=0, atol=atol)
    return b


def test_cascade_matches_reference_random_weights():
    """Random weights biased towards "face": dozens of windows pass every stage, so pyramid, NMS,
    box regression, squaring, crops and landmark arithmetic are all compared."""
    model = _random_mtcnn(seed=3, face_bias=3.0)
    pixels = np.random.default_rng(4).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    boxes = _assert_same_detections(model, pixels)
    assert len(boxes) >= 3


@pytest.mark.parametrize("name", ["face_astronaut.png", "face_grace_hopper.jpg", "two_faces"])
def test_cascade_matches_reference_real_weights(real, name):
    pixels = ff.two_faces()[0] if name == "two_faces" else ff.load_rgb(name)
    boxes = _assert_same_detections(real, pixels)
    assert len(boxes) == (2 if name == "two_faces" else 1)


def test_nms_union_and_min():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [2, 2, 6, 6.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # union: box 1 overlaps box 0 by IoU 81/119 = 0.68 (kept at 0.7, dropped at 0.5); box 3 is inside box 0 (IoU 0.16)
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    # min: box 3 lies inside box 0, so intersection / smaller area = 1: box 0 goes
    assert nms(boxes, scores, 0.7, overlap="min").tolist() == [3, 2]


# ------------------------------------------------------------------------------------ loading
def test_load_from_safetensors_and_refuse_wrong_files(real, tmp_path):
    for name in ("pnet", "rnet", "onet"):
        save_file({k: v.contiguous() for k, v in getattr(real, name).state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
    again = load_mtcnn(tmp_path)
    x = torch.rand(1, 3, 48, 48)
    torch.testing.assert_close(again.onet(x), real.onet(x), rtol=0, atol=0)
    assert locate_detector(tmp_path) == tmp_path

    (tmp_path / "onet.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"lacks onet\.pt"):
        load_mtcnn(tmp_path)
    save_file({k: v.contiguous() for k, v in real.rnet.state_dict().items()}, str(tmp_path / "onet.safetensors"))
    with pytest.raises(CheckpointError, match="not an MTCNN ONet checkpoint"):
        load_mtcnn(tmp_path)
    with pytest.raises(CheckpointError, match="face detector not found"):
        locate_detector(tmp_path / "nowhere")


def test_non_finite_weights_refused(real, tmp_path):
    for name in ("pnet", "rnet", "onet"):
        sd = {k: v.clone() for k, v in getattr(real, name).state_dict().items()}
        if name == "rnet":
            sd["dense4.weight"][0, 0] = float("nan")
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_mtcnn(tmp_path)


# -------------------------------------------------------------------------------- real photos
def _centre(box):
    x, y, w, h = box
    return x + w / 2, y + h / 2


def test_two_faces_largest_first_and_index(real):
    pic, big, small = ff.two_faces()
    faces = detect_faces(real, torch.from_numpy(pic))
    assert len(faces) == 2 and faces[0].size > faces[1].size
    for face, portrait in zip(faces, (big, small)):
        x1, y1, x2, y2 = face.box
        px, py, pw, ph = portrait
        assert px <= (x1 + x2) / 2 <= px + pw and py <= (y1 + y2) / 2 <= py + ph, (face.box, portrait)
    assert pick_face(faces, 1) is faces[1]
    with pytest.raises(FaceDetectionError, match=r"face_index 2 does not exist: 2 face\(s\) found"):
        pick_face(faces, 2, what="photo.png")


def test_no_face_error_names_image_and_suggests_manual(real):
    faces = detect_faces(real, torch.from_numpy(ff.no_face()))
    assert faces == []
    with pytest.raises(FaceDetectionError) as e:
        framing.frame_face(torch.from_numpy(ff.no_face()), detector=real, what="image 'landscape.png'")
    msg = str(e.value)
    assert "landscape.png" in msg and "no face found" in msg and "manual" in msg


def test_tiny_faces(real):
    # a 40 px wide portrait: the face is ~15 px, still found, in the right place
    faces = detect_faces(real, torch.from_numpy(ff.tiny_face(40)))
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 300 <= (x1 + x2) / 2 <= 340 and 100 <= (y1 + y2) / 2 <= 147
    # a 16 px portrait has a ~6 px face: below the detector's reach, so the clear error
    assert detect_faces(real, torch.from_numpy(ff.tiny_face(16))) == []


def test_quarter_turns_map_back():
    """Points found in torch.rot90(img, k) map back to the same pixel of the image."""
    h, w = 5, 7
    img = torch.arange(h * w).reshape(h, w)
    for k in range(4):
        turned = torch.rot90(img, k, dims=(0, 1))
        for r in range(turned.shape[0]):
            for c in range(turned.shape[1]):
                x, y = M._unrotate(torch.tensor([float(c), float(r)]), k, h, w).tolist()
                assert img[int(y), int(x)] == turned[r, c]


@pytest.mark.parametrize("degrees", [0, 30, 90, 180, 270])
def test_rotated_face_crop_is_level(real, degrees):
    """The eye line is measured from the landmarks and the crop rotates it level: detecting again in
    the crop finds the eyes level (within the landmarks' own accuracy) and the face centred. 90, 180
    and 270 degrees (a photo stored sideways or upside down) are beyond MTCNN itself: found in the
    picture turned back by quarter turns."""
    crop, face_crop, faces = framing.frame_face(torch.from_numpy(ff.rotated_face(degrees)), detector=real)
    assert len(faces) == 1
    angle = (math.degrees(face_crop.transform.angle) + degrees + 180) % 360 - 180  # 0 when it undoes the turn
    assert abs(angle) < 9, math.degrees(face_crop.transform.angle)
    again = detect_faces(real, crop)
    assert len(again) == 1
    (lx, ly), (rx, ry) = again[0].landmarks[:2]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 6
    x1, y1, x2, y2 = again[0].box
    assert abs((x1 + x2) / 2 - 256) < 40 and abs((y1 + y2) / 2 - 256) < 60


def test_huge_photo_is_bounded(real, monkeypatch):
    """4000x3000: detection runs on a copy at most 1024 px long; boxes come back in full-size pixels."""
    seen = []
    real_raw = M.detect_faces_raw

    def spy(model, pixels, *a, **k):
        seen.append(tuple(pixels.shape))
        return real_raw(model, pixels, *a, **k)

    monkeypatch.setattr(M, "detect_faces_raw", spy)
    faces = detect_faces(real, torch.from_numpy(ff.huge_photo()))
    assert seen == [(768, 1024, 3)]  # the cascade's cost is that of a 1024 x 768 photo
    assert len(faces) == 1
    x1, y1, x2, y2 = faces[0].box
    assert 1800 < (x1 + x2) / 2 < 3200 and 700 < (y1 + y2) / 2 < 2341 and x2 - x1 > 300


def test_detect_and_crop_under_a_second_per_portrait(real):
    """Issue 10's budget: detection + crop < 1 s per portrait on the CPU (one torch thread, which runs
    on this thread). Measured as this thread's CPU time, best of three, so that other processes on a
    shared 2-core machine do not decide it (wall time on an idle machine: ~0.4 s)."""
    pic = torch.from_numpy(ff.load_rgb("face_grace_hopper.jpg"))
    framing.frame_face(pic, detector=real)  # warm-up (first-call allocations)
    times = []
    for _ in range(3):
        t0 = time.thread_time()
        framing.frame_face(pic, detector=real)
        times.append(time.thread_time() - t0)
    assert min(times) < 1.0, times


def test_bad_images_refused(real):
    with pytest.raises(ValueError, match=r"photo: expected an image \[H, W, 3\]"):
        detect_faces(real, torch.zeros(10, 10), what="photo")
    bad = torch.rand(32, 32, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        detect_faces(real, bad)
