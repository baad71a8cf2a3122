"""Shared by the face tests: the real MTCNN weights and facenet-pytorch's reference code (fetched by
scripts/setup_env.sh from the facenet-pytorch 2.6.0 wheel into ``.cache/``, never installed), and
test pictures made from the public domain portraits: two faces, no face, a tiny face, a rotated
face, a 4000x3000 photo.

Where the weights are missing, tests that need them skip, except under ``CI=true``, where they fail
(``comfy_server.skip_or_fail``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT / "tests" / "fixtures" / "media"
MTCNN_CACHE = Path(os.environ.get("KEYFACE_MTCNN_CACHE", ROOT / ".cache" / "facenet_pytorch-2.6.0"))
WEIGHTS = MTCNN_CACHE / "facenet_pytorch" / "data"
PHOTO_WIDE = "photo_wide_1920x1080.jpg"  # tests/tools/make_face_fixtures.py


def have_weights() -> bool:
    return all((WEIGHTS / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet"))


def require_weights() -> Path:
    if not have_weights():
        from comfy_server import skip_or_fail

        skip_or_fail(f"MTCNN weights not in {WEIGHTS} (run: bash scripts/setup_env.sh)")
    return WEIGHTS


def install_detector(models_dir) -> bool:
    """Copy the real weights into ``<models_dir>/mtcnn/`` (the node's default folder); False if absent."""
    if not have_weights():
        return False
    dest = Path(models_dir) / "mtcnn"
    dest.mkdir(parents=True, exist_ok=True)
    for n in ("pnet", "rnet", "onet"):
        shutil.copy(WEIGHTS / f"{n}.pt", dest / f"{n}.pt")
    return True


def reference():
    """facenet-pytorch's PNet/RNet/ONet classes and ``detect_face`` from the extracted wheel files
    (``facenet_pytorch`` without its ``__init__``: a namespace package, so nothing else loads)."""
    require_weights()
    if str(MTCNN_CACHE) not in sys.path:
        sys.path.insert(0, str(MTCNN_CACHE))
    from facenet_pytorch.models import mtcnn as ref_mtcnn
    from facenet_pytorch.models.utils import detect_face as ref_detect

    return ref_mtcnn, ref_detect


# ------------------------------------------------------------------------------------ pictures
def load_rgb(name) -> np.ndarray:
    from PIL import Image

    with Image.open(MEDIA / name) as im:
        return np.asarray(im.convert("RGB")).copy()


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))


def canvas(w: int, h: int, value=(96, 110, 120)) -> np.ndarray:
    """A plain backdrop with a gentle gradient (not a face)."""
    ramp = np.linspace(-20, 20, w)[None, :, None]
    return np.clip(np.array(value)[None, None, :] + ramp + np.zeros((h, 1, 1)), 0, 255).astype(np.uint8)


def two_faces() -> tuple[np.ndarray, tuple, tuple]:
    """1280x720: Grace Hopper large on the right, the astronaut smaller on the left.
    Returns (picture, (x, y, w, h) of the larger portrait, same for the smaller)."""
    pic = canvas(1280, 720)
    big = _resize(load_rgb("face_grace_hopper.jpg"), 512, 600)
    small = _resize(load_rgb("face_astronaut.png"), 300, 300)
    pic[60:660, 700:1212] = big
    pic[200:500, 100:400] = small
    return pic, (700, 60, 512, 600), (100, 200, 300, 300)


def no_face() -> np.ndarray:
    """A landscape-like picture: sky, ground, a few shapes, no face."""
    pic = canvas(800, 600, (120, 160, 210))
    pic[350:] = (70, 120, 60)
    pic[250:350, 100:260] = (150, 90, 60)
    rng = np.random.default_rng(0)
    noise = rng.integers(-12, 13, size=pic.shape)
    return np.clip(pic.astype(int) + noise, 0, 255).astype(np.uint8)


def tiny_face(face_px: int) -> np.ndarray:
    """640x480 backdrop with the Grace Hopper portrait scaled to ``face_px`` wide (the face about half of it)."""
    pic = canvas(640, 480)
    h = round(face_px * 600 / 512)
    pic[100:100 + h, 300:300 + face_px] = _resize(load_rgb("face_grace_hopper.jpg"), face_px, h)
    return pic


def rotated_face(degrees: float) -> np.ndarray:
    """The astronaut portrait rotated counter-clockwise by ``degrees`` on an 800x800 backdrop."""
    from PIL import Image

    pic = Image.fromarray(canvas(800, 800))
    face = Image.fromarray(load_rgb("face_astronaut.png")).rotate(degrees, resample=Image.BICUBIC, expand=True,
                                                                 fillcolor=(96, 110, 120))
    pic.paste(face, ((800 - face.width) // 2, (800 - face.height) // 2))
    return np.asarray(pic).copy()


def huge_photo() -> np.ndarray:
    """4000x3000 with the Grace Hopper portrait at 1400 px wide."""
    pic = canvas(4000, 3000)
    pic[700:2341, 1800:3200] = _resize(load_rgb("face_grace_hopper.jpg"), 1400, 1641)
    return pic
