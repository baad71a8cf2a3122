"""``python -m keyface render --face auto|manual|off``: the face options of the command line.

Kept apart from ``keyface/cli.py`` (which only calls :func:`add_face_arguments` and
:func:`face_from_args`) so the two evolve independently.
"""

from __future__ import annotations

import argparse
import math

from . import FACE_MODES

FACE_HELP = ("auto: detect the face (MTCNN), crop it aligned for the model and paste the generated face back "
             "into the full picture (the video has the photo's size); manual: the same with --face-box instead of "
             "detection; off: the whole picture is centre-cropped or padded (--identity-mode), video at the model size")


def _numbers(text: str, count: int, option: str, form: str):
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != count or not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"{option}: expected {form}, got {text!r}")
    return vals


def _box(text: str):
    return _numbers(text, 4, "--face-box", "X,Y,WIDTH,HEIGHT in pixels")


def _offset(text: str):
    return _numbers(text, 2, "--face-offset", "DX,DY (fractions of the crop side)")


def _feather(text: str):
    value = _numbers(text, 1, "--feather", "a number from 0 to 0.5")[0]
    if not 0.0 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"--feather: expected a number from 0 to 0.5, got {text!r}")
    return value


def add_face_arguments(parser):
    g = parser.add_argument_group("face framing")
    g.add_argument("--face", choices=FACE_MODES, default="off", help=FACE_HELP)
    g.add_argument("--face-box", type=_box, default=None, help="manual mode: X,Y,WIDTH,HEIGHT of the face in the picture (pixels)")
    g.add_argument("--face-index", type=int, default=0, help="auto mode: which face when several (0 = the largest)")
    g.add_argument("--face-scale", type=float, default=1.0, help="zoom of the crop (>1: face larger)")
    g.add_argument("--face-offset", type=_offset, default=(0.0, 0.0), help="DX,DY: move the crop by fractions of its side")
    g.add_argument("--detector", default=None,
                   help="folder with MTCNN pnet.pt, rnet.pt, onet.pt (default: <models>/mtcnn or <models>)")
    g.add_argument("--feather", type=_feather, default=None, help="paste-back seam softness, fraction of the crop side")
    g.add_argument("--no-color-match", action="store_true", help="paste back without the seam colour match")


def check_face_args(args):
    """Fail before any model loads: a manual mode without a box, an auto mode without the detector."""
    if args.face == "manual" and args.face_box is None:
        raise ValueError("--face manual needs --face-box X,Y,WIDTH,HEIGHT")
    if args.face == "auto" and args.detector is None:
        from .mtcnn import locate_detector

        args.detector = str(locate_detector(args.models))


def face_from_args(args, image, size: int, log):
    """-> (square identity image [size, size, 3], the FacePaster for render_to_file's paste_back) for
    --face auto/manual, or (None, None) for off."""
    if args.face == "off":
        return None, None
    from .framing import frame_face
    from .paste import DEFAULT_FEATHER, FacePaster
    from .mtcnn import load_mtcnn

    check_face_args(args)
    dx, dy = args.face_offset
    box, detector = None, None
    if args.face == "manual":
        box = args.face_box
    else:
        detector = load_mtcnn(args.detector)
    crop, face_crop, faces = frame_face(image, detector=detector, box=box, face_index=args.face_index, size=size,
                                        scale=args.face_scale, offset_x=dx, offset_y=dy, what=f"--image {args.image}")
    several = f"; {len(faces)} faces found, choose with --face-index" if len(faces) > 1 else ""
    log(f"face: {face_crop.source}{several}")
    feather = DEFAULT_FEATHER if args.feather is None else args.feather
    paster = FacePaster(face_crop, feather=feather, color_match=not args.no_color_match, even=True)
    log(f"paste-back into {paster.width}x{paster.height}")
    return crop, paster
