"""MTCNN face detector (P-Net, R-Net, O-Net; Zhang et al. 2016): boxes and 5 landmarks.

Our own torch implementation of the three-stage cascade. Module names mirror the keys of the released
weights that facenet-pytorch ships inside its wheel (``facenet_pytorch/data/{pnet,rnet,onet}.pt``, MIT
licence), so those files load as they are, through :mod:`keyface.checkpoints` (no pickle code runs).
The cascade reproduces facenet-pytorch's ``detect_face`` arithmetic (same pyramid, the same integer
box conventions, area resampling, NMS thresholds), so both give the same boxes and landmarks
(``tests/test_face_detect.py`` checks it against that code from the same wheel).

Landmarks, in image pixels: left eye, right eye, nose, left mouth corner, right mouth corner (left
and right as seen in the picture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, read_state_dict
from . import DETECTOR_FOLDER, NET_NAMES, WEIGHT_SUFFIXES

# The published MTCNN settings (and facenet-pytorch's defaults).
MIN_FACE_PX = 20  # smallest face searched for, in pixels of the (bounded) detection image
STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
PYRAMID_FACTOR = 0.709
PNET_CELL = 12  # P-Net sees 12x12 windows with a stride of 2
PNET_STRIDE = 2
RNET_INPUT = 24
ONET_INPUT = 48
# Huge photos are downscaled before detection so that time and memory stay bounded: a face needs
# ~20 px to be found, and at 1024 px on the long side that is 2% of the picture.
DETECT_MAX_SIDE = 1024
# An upright pass whose best face scores lower than this also tries the picture turned by quarter turns.
CONFIDENT_SCORE = 0.95
NMS_PER_SCALE = 0.5
NMS_STAGE = 0.7
# Stage batches: bounded memory however many candidate windows an image produces.
STAGE_BATCH = 512


class FaceDetectionError(ValueError):
    """No face where one was needed, or a face index that does not exist."""


# --------------------------------------------------------------------------------------------------
# Networks (layer names = checkpoint keys)
# --------------------------------------------------------------------------------------------------


class PNet(nn.Module):
    """Proposal net: fully convolutional; per 12x12 window a face probability and a box offset."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        """x [B, 3, h, w] normalised -> (offsets [B, 4, h', w'], probabilities [B, 2, h', w'])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_caffe(x):
    """The weights come from Caffe, which flattened [C, H, W] feature maps as (W, H, C)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refine net: 24x24 crops -> face probability, box offset."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        """x [B, 3, 24, 24] -> (offsets [B, 4], probabilities [B, 2])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_caffe(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output net: 48x48 crops -> face probability, box offset, 5 landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        """x [B, 3, 48, 48] -> (offsets [B, 4], landmarks [B, 10] (5 x then 5 y), probabilities [B, 2])."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_caffe(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


class MTCNN(nn.Module):
    """The three networks together (``.pnet``, ``.rnet``, ``.onet``)."""

    def __init__(self):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def find_weight_files(folder) -> dict[str, Path]:
    """{net name: file} for ``pnet``/``rnet``/``onet`` (.safetensors, .pt or .pth) in ``folder``.
    Raises :class:`CheckpointError` naming the folder and the missing files."""
    folder = Path(folder)
    found, missing = {}, []
    for name in NET_NAMES:
        hits = [folder / f"{name}{s}" for s in WEIGHT_SUFFIXES if (folder / f"{name}{s}").is_file()]
        if hits:
            found[name] = hits[0]
        else:
            missing.append(f"{name}.pt")
    if missing:
        raise CheckpointError(
            f"MTCNN face detector: {folder} lacks {', '.join(missing)} (needs pnet.pt, rnet.pt and onet.pt, or "
            f".safetensors conversions). Get them from the facenet-pytorch wheel: see the README, 'Face detector'.")
    return found


def _load_net(net: nn.Module, path: Path):
    sd = read_state_dict(path)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or extra or bad:
        raise CheckpointError(
            f"{path}: not an MTCNN {type(net).__name__} checkpoint (missing keys {missing[:4]}, unexpected keys "
            f"{extra[:4]}, wrong shapes {bad[:4]})")
    if not all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()):
        raise CheckpointError(f"{path}: holds non-finite weights")
    net.load_state_dict({k: v.float() for k, v in sd.items()})


def load_mtcnn(folder_or_files, device=None) -> MTCNN:
    """MTCNN from a folder holding pnet/rnet/onet weights, or from {"pnet": path, ...}; eval mode, float32."""
    files = folder_or_files if isinstance(folder_or_files, dict) else find_weight_files(folder_or_files)
    model = MTCNN()
    for name in NET_NAMES:
        _load_net(getattr(model, name), Path(os.fspath(files[name])))
    return model.eval().to(device=device or "cpu")


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    """One detected face in image pixels: ``box`` (x1, y1, x2, y2), ``score`` in 0..1,
    ``landmarks`` ((x, y) x 5: left eye, right eye, nose, left and right mouth corner)."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def size(self) -> float:
        """Side of the square with the box's area (what "largest face" compares)."""
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0.0) ** 0.5 * max(y2 - y1, 0.0) ** 0.5


def _normalise(x):
    return (x - 127.5) * 0.0078125


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, overlap: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression -> kept indices, best score first.

    ``overlap="union"``: IoU with areas (x2 - x1)(y2 - y1); ``"min"``: intersection over the smaller
    box with areas (x2 - x1 + 1)(y2 - y1 + 1), the last MTCNN stage's rule. A box is dropped when its
    overlap with a kept one exceeds ``threshold``.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    plus = 1.0 if overlap == "min" else 0.0
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + plus).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + plus).clamp(min=0)
        inter = w * h
        if overlap == "min":
            over = inter / torch.minimum(area[i], area[rest])
        else:
            over = inter / (area[i] + area[rest] - inter)
        order = rest[over <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def _square(boxes):
    """Boxes grown to squares about their centres (MTCNN's ``rerec``)."""
    out = boxes.clone()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _apply_offsets(boxes, offsets):
    """Box regression of stages 2 and 3: offsets in units of the (inclusive) box size."""
    out = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + offsets[:, 0] * w
    out[:, 1] = boxes[:, 1] + offsets[:, 1] * h
    out[:, 2] = boxes[:, 2] + offsets[:, 2] * w
    out[:, 3] = boxes[:, 3] + offsets[:, 3] * h
    return out


def _crops(img, boxes, size):
    """Crops of ``img`` [1, 3, H, W] (0..255) under the integer boxes (clipped to the image, 1-based
    like the original), each resampled to size x size by area averaging; plus which boxes had pixels."""
    h, w = img.shape[-2:]
    b = boxes[:, :4].trunc().to(torch.int64)
    x1, y1 = b[:, 0].clamp(min=1), b[:, 1].clamp(min=1)
    x2, y2 = b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)
    out, ok = [], []
    for k in range(b.shape[0]):
        if y2[k] > y1[k] - 1 and x2[k] > x1[k] - 1:
            patch = img[:, :, y1[k] - 1:y2[k], x1[k] - 1:x2[k]]
            out.append(F.interpolate(patch, size=(size, size), mode="area"))
            ok.append(k)
    if not out:
        return img.new_zeros((0, 3, size, size)), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.tensor(ok, dtype=torch.long)


def _batched(net, x):
    outs = [net(x[i:i + STAGE_BATCH]) for i in range(0, x.shape[0], STAGE_BATCH)]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def _pyramid(h, w, min_face):
    scale = PNET_CELL / min_face
    side = min(h, w) * scale
    scales = []
    while side >= PNET_CELL:
        scales.append(scale)
        scale *= PYRAMID_FACTOR
        side *= PYRAMID_FACTOR
    return scales


def _proposals(model, img, min_face, threshold):
    """Stage 1: P-Net over the scale pyramid -> candidate boxes [n, 5] (x1, y1, x2, y2, score), refined and squared."""
    h, w = img.shape[-2:]
    found = []
    for scale in _pyramid(h, w, min_face):
        im = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
        offsets, probs = model.pnet(_normalise(im))
        p = probs[0, 1]
        rows, cols = torch.nonzero(p >= threshold, as_tuple=True)
        if rows.numel() == 0:
            continue
        grid = torch.stack([cols, rows], dim=1).to(img.dtype)
        top_left = ((PNET_STRIDE * grid + 1) / scale).floor()
        bottom_right = ((PNET_STRIDE * grid + PNET_CELL) / scale).floor()
        cand = torch.cat([top_left, bottom_right, p[rows, cols][:, None], offsets[0][:, rows, cols].T], dim=1)
        found.append(cand[nms(cand[:, :4], cand[:, 4], NMS_PER_SCALE)])
    if not found:
        return img.new_zeros((0, 5))
    cand = torch.cat(found)
    cand = cand[nms(cand[:, :4], cand[:, 4], NMS_STAGE)]
    w_, h_ = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
    refined = torch.stack([cand[:, 0] + cand[:, 5] * w_, cand[:, 1] + cand[:, 6] * h_,
                           cand[:, 2] + cand[:, 7] * w_, cand[:, 3] + cand[:, 8] * h_, cand[:, 4]], dim=1)
    return _square(refined)


def _refine(model, img, boxes, threshold):
    """Stage 2: R-Net on 24x24 crops -> surviving boxes, regressed and squared."""
    crops, ok = _crops(img, boxes, RNET_INPUT)
    if ok.numel() == 0:
        return boxes[:0]
    offsets, probs = _batched(model.rnet, _normalise(crops))
    boxes, score = boxes[ok], probs[:, 1]
    keep = score > threshold
    boxes = torch.cat([boxes[keep, :4], score[keep, None]], dim=1)
    offsets = offsets[keep]
    pick = nms(boxes[:, :4], boxes[:, 4], NMS_STAGE)
    return _square(_apply_offsets(boxes[pick], offsets[pick]))


def _output(model, img, boxes, threshold):
    """Stage 3: O-Net on 48x48 crops -> (boxes [n, 5], landmarks [n, 5, 2])."""
    crops, ok = _crops(img, boxes, ONET_INPUT)
    if ok.numel() == 0:
        return boxes[:0], boxes.new_zeros((0, 5, 2))
    offsets, marks, probs = _batched(model.onet, _normalise(crops))
    boxes, score = boxes[ok], probs[:, 1]
    keep = score > threshold
    boxes, offsets, marks = torch.cat([boxes[keep, :4], score[keep, None]], dim=1), offsets[keep], marks[keep]
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    xs = w[:, None] * marks[:, :5] + boxes[:, :1] - 1
    ys = h[:, None] * marks[:, 5:] + boxes[:, 1:2] - 1
    landmarks = torch.stack([xs, ys], dim=2)
    boxes = _apply_offsets(boxes, offsets)
    pick = nms(boxes[:, :4], boxes[:, 4], NMS_STAGE, overlap="min")
    return boxes[pick], landmarks[pick]


@torch.inference_mode()
def detect_faces_raw(model: MTCNN, pixels: torch.Tensor, min_face: float = MIN_FACE_PX,
                     thresholds=STAGE_THRESHOLDS) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade on one image as the original runs it: ``pixels`` [H, W, 3] in 0..255 (float) ->
    (boxes [n, 5] = x1, y1, x2, y2, score; landmarks [n, 5, 2]), in that image's pixels."""
    param = next(model.parameters())
    img = pixels.to(device=param.device, dtype=param.dtype).permute(2, 0, 1)[None].contiguous()
    boxes = _proposals(model, img, min_face, thresholds[0])
    if boxes.shape[0]:
        boxes = _refine(model, img, boxes, thresholds[1])
    if boxes.shape[0]:
        return _output(model, img, boxes, thresholds[2])
    return boxes.new_zeros((0, 5)), boxes.new_zeros((0, 5, 2))


def _as_pixels(image, what) -> torch.Tensor:
    """[H, W, 3] uint8 as given, or float 0..1 checked for NaN/inf and converted to 0..255 float."""
    img = torch.as_tensor(image)
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[-1] not in (3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"{what}: expected an image [H, W, 3] in 0..1, got shape {tuple(img.shape)}")
    img = img[..., :3].detach().cpu()
    if img.dtype == torch.uint8:
        return img
    img = img.float()
    if not torch.isfinite(img.sum()):  # one cheap pass: any NaN / inf makes the sum non-finite
        raise ValueError(f"{what}: holds NaN or infinite values")
    return img * 255.0


def _unrotate(points: torch.Tensor, quarter_turns: int, h: int, w: int) -> torch.Tensor:
    """Pixel-index points [..., 2] found in ``torch.rot90(img, quarter_turns)`` of an h x w image ->
    the same points in the image itself."""
    x, y = points[..., 0], points[..., 1]
    if quarter_turns == 1:  # rotated[r, c] = img[c, w - 1 - r]
        return torch.stack([w - 1 - y, x], dim=-1)
    if quarter_turns == 2:
        return torch.stack([w - 1 - x, h - 1 - y], dim=-1)
    if quarter_turns == 3:  # rotated[r, c] = img[h - 1 - c, r]
        return torch.stack([y, h - 1 - x], dim=-1)
    return points


def detect_faces(model: MTCNN, image, *, what: str = "image", max_side: int = DETECT_MAX_SIDE,
                 try_rotations: bool = True) -> list[Face]:
    """All faces in ``image`` [H, W, 3] (float 0..1 or uint8), largest first, in its own pixels.

    Images longer than ``max_side`` are downscaled (antialiased, in uint8 when given uint8) for
    detection, which bounds the time and memory any photo can cost; boxes and landmarks are scaled back.
    MTCNN finds faces tilted up to about 60 degrees. When the upright pass finds no face it is sure of
    (score >= ``CONFIDENT_SCORE``; a face turned sideways often gives a weak detection with wrong
    landmarks), ``try_rotations`` looks again in the picture turned by 90, 270 and 180 degrees (a photo
    stored sideways or upside down) and keeps the turn whose best face scores highest; at most 4 passes.
    """
    img, scale = _downscaled(_as_pixels(image, what), max_side)
    h, w = img.shape[:2]
    best = None
    for quarter_turns in ((0, 1, 3, 2) if try_rotations else (0,)):
        turned = torch.rot90(img, quarter_turns, dims=(0, 1)) if quarter_turns else img
        boxes, marks = detect_faces_raw(model, turned.float())
        top = float(boxes[:, 4].max()) if boxes.shape[0] else -1.0
        if best is None or top > best[0]:
            best = (top, quarter_turns, boxes, marks)
        if top >= CONFIDENT_SCORE:
            break
    _, quarter_turns, boxes, marks = best
    faces = []
    for b, m in zip(boxes.cpu().double(), marks.cpu().double()):
        if not (torch.isfinite(b).all() and torch.isfinite(m).all()):
            continue
        corners = _unrotate(b[:4].reshape(2, 2), quarter_turns, h, w)
        lo, hi = corners.min(dim=0).values, corners.max(dim=0).values
        box = torch.cat([lo, hi]) * scale.repeat(2)
        pts = _unrotate(m, quarter_turns, h, w) * scale
        faces.append(Face(box=tuple(box.tolist()), score=float(b[4]),
                          landmarks=tuple(tuple(p) for p in pts.tolist())))
    return sorted(faces, key=lambda f: -f.size)


def _downscaled(img: torch.Tensor, max_side: int):
    """(detection image, scale (x, y) = photo pixels per detection-image pixel)."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img, torch.tensor([1.0, 1.0], dtype=torch.float64)
    factor = max(h, w) / max_side
    size = (max(1, round(h / factor)), max(1, round(w / factor)))
    x = img.permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0), torch.tensor([w / size[1], h / size[0]], dtype=torch.float64)


def pick_face(faces: list[Face], index: int = 0, *, what: str = "image") -> Face:
    """``faces[index]`` (0 = the largest), or a :class:`FaceDetectionError` that says what to do."""
    if not faces:
        raise FaceDetectionError(
            f"{what}: no face found. Use a photo where the face is visible and at least ~{MIN_FACE_PX * 2} px "
            f"tall, or frame it by hand: face mode 'manual' with a box (x, y, width, height) around the face.")
    if not 0 <= index < len(faces):
        raise FaceDetectionError(
            f"{what}: face_index {index} does not exist: {len(faces)} face(s) found (0 = the largest, "
            f"up to {len(faces) - 1}).")
    return faces[index]


def locate_detector(models_folder) -> Path:
    """The folder holding pnet/rnet/onet under a models folder: ``<folder>/mtcnn``, ``<folder>`` itself,
    or ``<folder>/keyface/mtcnn`` (a ComfyUI ``models`` root). CheckpointError naming what was searched."""
    root = Path(models_folder)
    candidates = [root / DETECTOR_FOLDER, root, root / "keyface" / DETECTOR_FOLDER]
    for c in candidates:
        if all(any((c / f"{n}{s}").is_file() for s in WEIGHT_SUFFIXES) for n in NET_NAMES):
            return c
    raise CheckpointError(
        f"MTCNN face detector not found: looked for pnet.pt, rnet.pt, onet.pt in {', '.join(map(str, candidates))}. "
        "See the README, 'Face detector', for the download (or use face mode 'manual' with a box).")
