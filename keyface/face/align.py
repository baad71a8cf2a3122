"""Aligned face crop: a square around the face, eyes level, face a fixed fraction of the side.

A :class:`CropTransform` maps crop pixels to image pixels (a rotation, a uniform scale and a shift);
:class:`FaceCrop` (the nodes' ``KEYFACE_CROP``) carries it together with the original image, so the
generated frames can be pasted back (:mod:`keyface.face.paste`).

Framing (at ``scale`` 1, ``offset`` 0), from the 5 MTCNN landmarks:

* roll: the crop's x axis runs along the line from the left to the right eye (eyes level);
* size: ``FACE_FRACTION`` of the crop side is the face length ``d = max(eye distance, eye-centre to
  mouth-centre distance)`` (the larger of the two, so a turned or tilted head is not over-zoomed);
  with 0.2 the crop is 5 d, which leaves hair, chin and some shoulder like a talking-head dataset
  frame. ``scale`` > 1 zooms in (face larger), < 1 zooms out;
* position: the midpoint between the eye centre and the mouth centre sits at ``FACE_CENTRE``
  (x, y fractions of the side; slightly below the middle to leave room for the head).
  ``offset_x`` / ``offset_y`` move the crop window by that fraction of its side, along its own axes.

Where the square leaves the picture the border is the picture mirrored at its edge, blended into a
strong blur of itself further out (no hard mirrored features, no black bars).
Coordinates: continuous image coordinates, pixel (i, j) covering [i, i + 1) x [j, j + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FACE_FRACTION = 0.2
FACE_CENTRE = (0.5, 0.55)
# Crop pixels over which a mirrored border fades into the blurred one, and the blur's size.
BORDER_FADE_PX = 24
BORDER_BLUR_DIVISOR = 24
MIN_SIDE_PX = 8.0  # a crop smaller than this in the image holds no usable face


class FaceCropError(ValueError):
    """A crop box or framing that cannot give a face crop."""


@dataclass(frozen=True)
class CropTransform:
    """The square crop: ``center`` (x, y) and ``side`` in image pixels, ``angle`` (radians, the crop's
    x axis measured from the image's), ``size`` crop pixels."""

    center: tuple[float, float]
    side: float
    angle: float
    size: int

    def crop_to_image(self, points: torch.Tensor) -> torch.Tensor:
        """Continuous crop coordinates [..., 2] -> image coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.side / self.size
        q = (points.double() - self.size / 2.0) * k
        x = self.center[0] + c * q[..., 0] - s * q[..., 1]
        y = self.center[1] + s * q[..., 0] + c * q[..., 1]
        return torch.stack([x, y], dim=-1)

    def image_to_crop(self, points: torch.Tensor) -> torch.Tensor:
        """Continuous image coordinates [..., 2] -> crop coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.size / self.side
        dx = points[..., 0].double() - self.center[0]
        dy = points[..., 1].double() - self.center[1]
        return torch.stack([(c * dx + s * dy) * k + self.size / 2.0, (-s * dx + c * dy) * k + self.size / 2.0], dim=-1)

    def image_bounds(self, width: int, height: int, margin: int = 2) -> tuple[int, int, int, int]:
        """Integer (x0, y0, x1, y1) of the image region the square covers, clipped to the image."""
        corners = self.crop_to_image(torch.tensor([[0.0, 0.0], [self.size, 0.0], [0.0, self.size],
                                                   [self.size, self.size]]))
        x0 = max(0, math.floor(float(corners[:, 0].min())) - margin)
        y0 = max(0, math.floor(float(corners[:, 1].min())) - margin)
        x1 = min(width, math.ceil(float(corners[:, 0].max())) + margin)
        y1 = min(height, math.ceil(float(corners[:, 1].max())) + margin)
        return x0, y0, x1, y1


@dataclass(frozen=True)
class FaceCrop:
    """``KEYFACE_CROP``: the transform, the original picture (uint8 [H, W, 3], CPU) and how the face
    was chosen (``source``: "detected face i of n" or "manual box")."""

    transform: CropTransform
    image: torch.Tensor
    source: str = ""

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


def _check_controls(scale, offset_x, offset_y, size):
    if not (math.isfinite(scale) and scale > 0):
        raise FaceCropError(f"scale: expected a positive number, got {scale!r}")
    if not (math.isfinite(offset_x) and math.isfinite(offset_y)):
        raise FaceCropError(f"offset: expected finite numbers, got ({offset_x!r}, {offset_y!r})")
    if int(size) < 16:
        raise FaceCropError(f"size: expected at least 16 pixels, got {size!r}")


def _shifted(center, side, angle, offset_x, offset_y):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = offset_x * side, offset_y * side
    return center[0] + c * dx - s * dy, center[1] + s * dx + c * dy


def transform_from_landmarks(landmarks, size: int = 512, scale: float = 1.0, offset_x: float = 0.0,
                             offset_y: float = 0.0) -> CropTransform:
    """The aligned framing (module docstring) from 5 landmarks ((x, y): eyes, nose, mouth corners),
    given in pixel-index coordinates as the detector returns them."""
    _check_controls(scale, offset_x, offset_y, size)
    p = torch.as_tensor(landmarks, dtype=torch.float64).reshape(5, 2) + 0.5  # pixel index -> continuous
    left_eye, right_eye, mouth = p[0], p[1], (p[3] + p[4]) / 2
    eyes = (left_eye + right_eye) / 2
    eye_line = right_eye - left_eye
    angle = math.atan2(float(eye_line[1]), float(eye_line[0]))
    length = max(float(eye_line.norm()), float((mouth - eyes).norm()))
    side = length / FACE_FRACTION / scale
    if not side >= MIN_SIDE_PX:
        raise FaceCropError(f"the face is too small to crop ({length:.1f} px between eyes and mouth)")
    anchor = (eyes + mouth) / 2
    # put the anchor at FACE_CENTRE: the crop centre lies (0.5 - FACE_CENTRE) sides away along the crop axes
    centre = _shifted((float(anchor[0]), float(anchor[1])), side, angle,
                      0.5 - FACE_CENTRE[0] + offset_x, 0.5 - FACE_CENTRE[1] + offset_y)
    return CropTransform(center=centre, side=side, angle=angle, size=int(size))


def transform_from_box(x: float, y: float, width: float, height: float, size: int = 512, scale: float = 1.0,
                       offset_x: float = 0.0, offset_y: float = 0.0, image_size=None) -> CropTransform:
    """Manual framing: the square of side max(width, height) / scale centred on the box (no roll).
    ``image_size`` (width, height), when given, refuses a box that misses the picture."""
    _check_controls(scale, offset_x, offset_y, size)
    vals = (x, y, width, height)
    if not all(math.isfinite(v) for v in vals) or width <= 0 or height <= 0:
        raise FaceCropError(f"manual box: expected x, y and a positive width and height, got {vals}")
    if image_size is not None:
        iw, ih = image_size
        if x >= iw or y >= ih or x + width <= 0 or y + height <= 0:
            raise FaceCropError(f"manual box {vals} lies outside the {iw}x{ih} image")
    side = max(width, height) / scale
    if side < MIN_SIDE_PX:
        raise FaceCropError(f"manual box {vals}: a side of at least {MIN_SIDE_PX:.0f} px is needed")
    centre = _shifted((x + width / 2, y + height / 2), side, 0.0, offset_x, offset_y)
    return CropTransform(center=centre, side=float(side), angle=0.0, size=int(size))


def to_uint8_image(image, what: str = "image") -> torch.Tensor:
    """[H, W, 3(+)] (or [1, H, W, 3]) float 0..1 or uint8 -> uint8 [H, W, 3] on the CPU (rounded)."""
    img = torch.as_tensor(image)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[-1] not in (3, 4) or min(img.shape[:2]) < 1:
        raise FaceCropError(f"{what}: expected an image [H, W, 3], got shape {tuple(img.shape)}")
    img = img[..., :3].detach().cpu()
    if img.dtype == torch.uint8:
        return img.contiguous()
    img = img.float()
    # one cheap pass first: a NaN or inf anywhere makes the sum non-finite (values this large are garbage too)
    if not torch.isfinite(img.sum()):
        raise FaceCropError(f"{what}: holds NaN or infinite values")
    return img.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).contiguous()


def sampling_grid(transform: CropTransform, points: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) in an image of width x height for crop points."""
    xy = transform.crop_to_image(points)
    gx = xy[..., 0] * (2.0 / width) - 1.0
    gy = xy[..., 1] * (2.0 / height) - 1.0
    return torch.stack([gx, gy], dim=-1).float()


def _crop_centres(size: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # [size, size, 2]


def _outside_weight(transform, points, width, height) -> torch.Tensor:
    """0 inside the picture, rising to 1 over BORDER_FADE_PX crop pixels outside it."""
    xy = transform.crop_to_image(points)
    out_x = torch.maximum(-xy[..., 0], xy[..., 0] - width).clamp(min=0)
    out_y = torch.maximum(-xy[..., 1], xy[..., 1] - height).clamp(min=0)
    dist = torch.maximum(out_x, out_y) * (transform.size / transform.side)
    return (dist / BORDER_FADE_PX).clamp(0, 1).float()


def _blurred(x: torch.Tensor) -> torch.Tensor:
    """A strong, cheap blur: down to 1/BORDER_BLUR_DIVISOR with area averaging and back up."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // BORDER_BLUR_DIVISOR), max(1, w // BORDER_BLUR_DIVISOR)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def crop_face(image, transform: CropTransform) -> torch.Tensor:
    """The square crop [size, size, 3] float32 in 0..1 of ``image`` [H, W, 3] (float 0..1 or uint8).

    Only the region under the square is read, prefiltered (antialiased) when the crop shrinks it, so a
    4000x3000 photo costs little more than a small one.
    """
    img = torch.as_tensor(image)
    if img.dim() == 4:
        img = img[0]
    height, width = img.shape[:2]
    x0, y0, x1, y1 = transform.image_bounds(width, height)
    if x1 <= x0 or y1 <= y0:
        raise FaceCropError(f"the crop square (centre {transform.center}, side {transform.side:.0f}) lies outside "
                            f"the {width}x{height} image")
    # only the region under the square is resampled; when the crop shrinks it, it is first brought
    # down to about the crop's pixel size (antialiased, still in uint8 for a uint8 photo) and only then
    # converted to float, so memory stays bounded by the photo itself
    roi = img[y0:y1, x0:x1, :3].permute(2, 0, 1)[None]
    points = _crop_centres(transform.size)
    shrink = transform.side / transform.size
    if shrink > 1.25:
        rh, rw = max(1, round((y1 - y0) / shrink)), max(1, round((x1 - x0) / shrink))
        roi = roi.contiguous(memory_format=torch.channels_last) if roi.dtype == torch.uint8 else roi.float()
        roi = F.interpolate(roi, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    roi = roi.float() / 255.0 if roi.dtype == torch.uint8 else roi.float()
    # grid relative to the region: shift the transform's centre into region coordinates
    local = CropTransform(center=(transform.center[0] - x0, transform.center[1] - y0), side=transform.side,
                          angle=transform.angle, size=transform.size)
    grid = sampling_grid(local, points, x1 - x0, y1 - y0)[None]
    crop = F.grid_sample(roi, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    fade = _outside_weight(transform, points, width, height)
    if bool((fade > 0).any()):
        crop = torch.lerp(crop, _blurred(crop), fade[None, None])
    return crop[0].permute(1, 2, 0).clamp(0, 1).contiguous()
