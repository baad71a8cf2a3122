"""Aligned crop and paste-back (keyface.face.align / paste): geometry, borders, seams, streaming.
No detector weights needed: landmarks and boxes are given."""

from __future__ import annotations

import math

import pytest
import torch

from keyface.face import DEFAULT_FEATHER
from keyface.face.align import (FACE_CENTRE, FACE_FRACTION, CropTransform, FaceCrop, FaceCropError, crop_face,
                                to_uint8_image, transform_from_box, transform_from_landmarks)
from keyface.face.framing import frame_face
from keyface.face.mtcnn import FaceDetectionError
from keyface.face.paste import FacePaster, PasteError, crop_mask


def _landmarks(cx, cy, eye_dist, angle_deg):
    """5 landmarks of a face whose eye centre is (cx, cy), rotated by angle_deg (eyes-to-mouth = eye_dist)."""
    a = math.radians(angle_deg)
    ux, uy = math.cos(a), math.sin(a)  # along the eyes
    vx, vy = -uy, ux  # down the face
    d = eye_dist

    def p(u, v):
        return (cx + u * ux + v * vx - 0.5, cy + u * uy + v * vy - 0.5)  # pixel-index coordinates
    return [p(-d / 2, 0), p(d / 2, 0), p(0, d / 2), p(-d * 0.4, d), p(d * 0.4, d)]


def _coordinate_image(w, h):
    """R = x / w, G = y / h at pixel centres: sampling it reads back image coordinates."""
    xs = (torch.arange(w) + 0.5) / w
    ys = (torch.arange(h) + 0.5) / h
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w), torch.full((h, w), 0.5)], dim=-1)


@pytest.mark.parametrize("angle", [0.0, 25.0, -40.0])
def test_landmark_framing(angle):
    marks = _landmarks(300.0, 200.0, 50.0, angle)
    t = transform_from_landmarks(marks, size=512)
    assert math.degrees(t.angle) == pytest.approx(angle, abs=1e-9)
    assert t.side == pytest.approx(50.0 / FACE_FRACTION)
    pts = torch.tensor(marks, dtype=torch.float64) + 0.5
    crop_pts = t.image_to_crop(pts)
    # eyes level in the crop, face length = FACE_FRACTION of the side, anchor at FACE_CENTRE
    assert crop_pts[0, 1] == pytest.approx(float(crop_pts[1, 1]), abs=1e-6)
    assert float(crop_pts[1, 0] - crop_pts[0, 0]) == pytest.approx(512 * FACE_FRACTION, abs=1e-6)
    anchor = ((crop_pts[0] + crop_pts[1]) / 2 + (crop_pts[3] + crop_pts[4]) / 2) / 2
    assert anchor.tolist() == pytest.approx([FACE_CENTRE[0] * 512, FACE_CENTRE[1] * 512], abs=1e-6)
    torch.testing.assert_close(t.crop_to_image(crop_pts), pts)


def test_scale_and_offset():
    marks = _landmarks(300.0, 200.0, 50.0, 0.0)
    base = transform_from_landmarks(marks)
    zoom = transform_from_landmarks(marks, scale=2.0)
    assert zoom.side == pytest.approx(base.side / 2)
    moved = transform_from_landmarks(marks, offset_x=0.1, offset_y=-0.2)
    assert moved.center[0] - base.center[0] == pytest.approx(0.1 * base.side)
    assert moved.center[1] - base.center[1] == pytest.approx(-0.2 * base.side)
    with pytest.raises(FaceCropError, match="scale"):
        transform_from_landmarks(marks, scale=0)
    with pytest.raises(FaceCropError, match="offset"):
        transform_from_landmarks(marks, offset_x=float("nan"))


def test_crop_samples_the_right_pixels():
    """A 1:1 crop (side == size) of a coordinate image reads back exactly the mapped coordinates."""
    w, h = 400, 300
    img = _coordinate_image(w, h)
    t = CropTransform(center=(180.0, 140.0), side=64.0, angle=0.0, size=64)
    crop = crop_face(img, t)
    uv = torch.stack(torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="xy"), dim=-1)
    xy = t.crop_to_image(uv.double())
    torch.testing.assert_close(crop[..., 0].double(), xy[..., 0] / w, rtol=0, atol=1e-5)
    torch.testing.assert_close(crop[..., 1].double(), xy[..., 1] / h, rtol=0, atol=1e-5)
    # rotated and scaled: still the mapped coordinates (bilinear interpolation of a linear ramp is exact)
    t = CropTransform(center=(200.0, 150.0), side=90.0, angle=math.radians(30), size=128)
    crop = crop_face(img, t)
    uv = torch.stack(torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="xy"), dim=-1)
    xy = t.crop_to_image(uv.double())
    torch.testing.assert_close(crop[..., 0].double(), xy[..., 0] / w, rtol=0, atol=1e-4)


def test_border_outside_the_picture_is_mirrored_then_blurred():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(200, 200, 3, generator=g)
    t = CropTransform(center=(10.0, 100.0), side=200.0, angle=0.0, size=200)  # left half outside
    crop = crop_face(img, t)
    assert torch.isfinite(crop).all() and crop.min() >= 0 and crop.max() <= 1
    inside = crop[:, 100:]
    torch.testing.assert_close(inside, img[:, 10:110], rtol=0, atol=1e-4)
    # half a pixel outside the left edge: the edge column mirrored (the blur has barely begun)
    torch.testing.assert_close(crop[:, 89], img[:, 0], rtol=0, atol=0.05)
    far = crop[:, :40]  # far outside: blurred, no black, no noise-level detail
    assert far.mean() > 0.3 and far.std() < img.std() / 3


def test_manual_box_framing_and_errors():
    t = transform_from_box(100, 50, 80, 120, size=256, image_size=(640, 480))
    assert t.center == (140.0, 110.0) and t.side == 120.0 and t.angle == 0.0 and t.size == 256
    with pytest.raises(FaceCropError, match="outside the 640x480 image"):
        transform_from_box(700, 50, 80, 120, image_size=(640, 480))
    with pytest.raises(FaceCropError, match="positive width and height"):
        transform_from_box(10, 10, 0, 10)
    img = torch.rand(480, 640, 3)
    crop, face_crop, faces = frame_face(img, box=(100, 50, 80, 120), size=128)
    assert crop.shape == (128, 128, 3) and faces == [] and face_crop.source.startswith("manual box")
    assert face_crop.image.dtype == torch.uint8 and face_crop.image.shape == (480, 640, 3)
    with pytest.raises(FaceDetectionError, match="needs the MTCNN detector"):
        frame_face(img)


# --------------------------------------------------------------------------------- paste-back
def _scene(w=333, h=251, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(h // 8 + 1, w // 8 + 1, 3, generator=g).permute(2, 0, 1)[None]
    smooth = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return to_uint8_image(smooth[0].permute(1, 2, 0))


def test_paste_changes_only_the_face_region_and_keeps_the_size():
    img = _scene()
    crop = FaceCrop(CropTransform(center=(200.0, 120.0), side=90.0, angle=math.radians(15), size=64), img)
    p = FacePaster(crop, color_match=False)
    frames = torch.rand(3, 64, 64, 3)
    out = p.paste_uint8(frames)
    assert out.shape == (3, 251, 333, 3) and out.dtype == torch.uint8
    x0, y0, x1, y1 = p.region
    outside = torch.ones(251, 333, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (out[:, outside] == img[outside]).all()  # bit-exact outside the square
    assert (out[:, 120, 200] != img[120, 200]).any()  # the face centre is the generated frame's
    # odd sizes: even=True drops the last row and column (H.264)
    p_even = FacePaster(crop, color_match=False, even=True)
    assert (p_even.width, p_even.height) == (332, 250)
    assert p_even.paste_uint8(frames).shape == (3, 250, 332, 3)
    # float path (the IMAGE node) agrees with the uint8 path
    f = p.paste(frames)
    assert f.dtype == torch.float32 and ((f * 255 - out.float()).abs() <= 0.51).all()


def test_paste_of_the_crop_itself_restores_the_picture():
    """Crop at 1:1 and paste the crop back unchanged: the picture comes back (to rounding)."""
    img = _scene(400, 300)
    t = CropTransform(center=(180.0, 150.0), side=128.0, angle=0.0, size=128)
    crop = crop_face(img, t)
    out = FacePaster(FaceCrop(t, img), color_match=False).paste_uint8(crop[None])[0]
    assert (out.int() - img.int()).abs().max() <= 1


def test_feathered_seam_is_soft_and_hard_without_feather():
    mask = crop_mask(100, 0.1)
    assert mask[50, 50] == 1 and mask[50, 0] < 0.01 and 0.2 < mask[50, 5] < 0.8
    assert (crop_mask(100, 0.0) == 1).all()
    img = torch.zeros(200, 200, 3, dtype=torch.uint8)
    t = CropTransform(center=(100.0, 100.0), side=100.0, angle=0.0, size=100)
    white = torch.ones(1, 100, 100, 3)
    soft = FacePaster(FaceCrop(t, img), feather=0.2, color_match=False).paste_uint8(white)[0, 100, :, 0].float()
    hard = FacePaster(FaceCrop(t, img), feather=0.0, color_match=False).paste_uint8(white)[0, 100, :, 0].float()
    # across the left edge of the square (x = 50): hard jumps 0 -> 255 in a pixel, soft ramps over ~20 px
    assert hard[49] == 0 and hard[51] == 255
    ramp = soft[50:71]
    assert (ramp[1:] >= ramp[:-1]).all() and soft[52] < 60 and soft[75] == 255
    with pytest.raises(PasteError, match="feather"):
        FacePaster(FaceCrop(t, img), feather=0.9)


def test_colour_match_removes_a_tint_at_the_seam():
    img = _scene(300, 300)
    t = CropTransform(center=(150.0, 150.0), side=128.0, angle=0.0, size=128)
    crop = crop_face(img, t)
    tinted = (crop + torch.tensor([0.15, -0.1, 0.05])).clamp(0, 1)[None]
    matched = FacePaster(FaceCrop(t, img), color_match=True).paste_uint8(tinted)[0].float()
    plain = FacePaster(FaceCrop(t, img), color_match=False).paste_uint8(tinted)[0].float()
    face = (slice(100, 200), slice(100, 200))
    err_matched = (matched[face] - img[face].float()).abs().mean()
    err_plain = (plain[face] - img[face].float()).abs().mean()
    assert err_plain > 15 and err_matched < 4, (err_plain, err_matched)


def test_streaming_is_lazy_and_chunking_invariant():
    img = _scene()
    crop = FaceCrop(CropTransform(center=(150.0, 120.0), side=80.0, angle=0.3, size=32), img)
    p = FacePaster(crop)
    frames = torch.rand(10, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    pulled = []

    def chunks(size):
        for i in range(0, 10, size):
            pulled.append(i)
            yield frames[i:i + size]

    stream = p.stream(chunks(3))
    first = next(stream).clone()
    assert pulled == [0] and first.shape[0] == 3  # one chunk in, one chunk out: memory flat in clip length
    rest = [c.clone() for c in stream]  # the chunks share one buffer: consumed one by one, like the writer does
    assert pulled == [0, 3, 6, 9]
    assert (torch.cat([first, *rest]) == p.paste_uint8(frames)).all()  # same as one call without the buffer


def test_paste_refuses_bad_frames():
    img = _scene()
    p = FacePaster(FaceCrop(CropTransform(center=(150.0, 120.0), side=80.0, angle=0.0, size=32), img))
    with pytest.raises(PasteError, match=r"square KeyFace frames"):
        p.paste(torch.rand(2, 32, 48, 3))
    bad = torch.rand(1, 32, 32, 3)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(PasteError, match="NaN or infinite"):
        p.paste(bad)
    with pytest.raises(PasteError, match="KEYFACE_CROP"):
        FacePaster("not a crop")
    assert DEFAULT_FEATHER == p.feather
