"""KeyFace Detect & Crop Face, KeyFace Paste Back: real photos in, full-resolution frames out.

Detect & Crop finds the face (MTCNN, weights in ``models/keyface/mtcnn/``) or takes a manual box,
and gives the aligned square for Sample Keyframes plus a ``KEYFACE_CROP`` (transform + original
picture). Paste Back puts generated frames back into the picture; KeyFace Save Video does the same
chunk by chunk when given the ``KEYFACE_CROP`` (flat memory on long clips).
"""

from __future__ import annotations

import logging
import os

from . import _common as C

log = logging.getLogger("keyface")

CROP_TYPE = "KEYFACE_CROP"
DETECTOR_KIND = "mtcnn"
NODE_MODES = ("auto", "manual")  # the command line's "off" is simply not using these nodes
_detectors = {}  # folder -> (mtimes, model): the weights are read once per ComfyUI session


def _detector_dirs() -> dict[str, str]:
    """{combo name: folder} of folders holding MTCNN weights, up to two levels below models/keyface."""
    from ..keyface.face import NET_NAMES, WEIGHT_SUFFIXES

    def complete(folder):
        return all(any(os.path.isfile(os.path.join(folder, n + s)) for s in WEIGHT_SUFFIXES) for n in NET_NAMES)

    found = {}
    for _name, directory in C._folders(DETECTOR_KIND):
        if not os.path.isdir(directory):
            continue
        for root, dirs, _files in os.walk(directory, followlinks=True):
            rel = os.path.relpath(root, directory).replace(os.sep, "/")
            if complete(root):
                found.setdefault(rel, root)
            depth = 0 if rel == "." else rel.count("/") + 1
            dirs[:] = [d for d in dirs if not d.startswith(".")] if depth < 2 else []
    return found


def detector_choices() -> list[str]:
    from ..keyface.face import DETECTOR_FOLDER

    names = sorted(_detector_dirs(), key=lambda n: (n != DETECTOR_FOLDER, n))
    return names or [DETECTOR_FOLDER]


def load_detector(name: str):
    from ..keyface.face import NET_NAMES
    from ..keyface.face.mtcnn import find_weight_files, load_mtcnn

    folder = _detector_dirs().get(name)
    if folder is None:
        raise ValueError(
            f"detector: no MTCNN weights (pnet.pt, rnet.pt, onet.pt) in models/keyface/{name}. Download them (README, "
            "'Face detector'), or set mode to 'manual' and give the face box.")
    files = find_weight_files(folder)
    stamp = tuple(os.path.getmtime(files[n]) for n in NET_NAMES)
    cached = _detectors.get(folder)
    if cached is None or cached[0] != stamp:
        _detectors[folder] = (stamp, load_mtcnn(files))
    return _detectors[folder][1]


class KeyFaceDetectCropFace:
    DESCRIPTION = ("Finds the face in a photo (MTCNN) or takes a box you give, and crops a square around it the way "
                   "KeyFace was trained: face centred, eyes level, a fixed face size. Feed the IMAGE to Sample "
                   "Keyframes and the face_crop to Paste Back or KeyFace Save Video for a full-resolution video.")
    CATEGORY = C.CATEGORY
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE", CROP_TYPE, "INT")
    RETURN_NAMES = ("face", "face_crop", "faces_found")
    OUTPUT_TOOLTIPS = ("The aligned square crop (size x size).",
                       "Where the crop came from (transform + the original picture), for pasting back.",
                       "How many faces were detected (0 in manual mode).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The photo (any size or aspect). A batch uses its first image."}),
            "mode": (list(NODE_MODES), {"default": "auto",
                                        "tooltip": "auto: detect the face; manual: use the box below (no detector "
                                                   "needed)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 99,
                                   "tooltip": "Several faces: which one (0 = the largest, 1 = the next, ...)."}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.25, "max": 4.0, "step": 0.05,
                                "tooltip": "Zoom: > 1 makes the face larger in the crop, < 1 shows more around it."}),
            "offset_x": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Move the crop right (+) or left (-), in crop widths."}),
            "offset_y": ("FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Move the crop down (+) or up (-), in crop heights."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                             "tooltip": "Crop size in pixels (KeyFace's model size is 512)."}),
            "detector": (detector_choices(),
                         {"tooltip": "Folder in models/keyface holding MTCNN pnet.pt, rnet.pt, onet.pt."}),
            "box_x": ("INT", {"default": 0, "min": 0, "max": 65535,
                              "tooltip": "Manual mode: left of the face box (px)."}),
            "box_y": ("INT", {"default": 0, "min": 0, "max": 65535,
                              "tooltip": "Manual mode: top of the face box (px)."}),
            "box_width": ("INT", {"default": 512, "min": 8, "max": 65535,
                                  "tooltip": "Manual mode: box width (px); the crop is a square of the larger side."}),
            "box_height": ("INT", {"default": 512, "min": 8, "max": 65535, "tooltip": "Manual mode: box height (px)."}),
        }}

    def crop(self, image, mode, face_index, scale, offset_x, offset_y, size, detector, box_x, box_y, box_width,
             box_height):
        from ..keyface.face.framing import frame_face

        if mode not in NODE_MODES:
            raise ValueError(f"mode: expected one of {NODE_MODES}, got {mode!r}")
        picture = C.first_image(image)[0]
        box = (box_x, box_y, box_width, box_height) if mode == "manual" else None
        model = load_detector(detector) if mode == "auto" else None
        face, crop, faces = frame_face(picture, detector=model, box=box, face_index=int(face_index), size=int(size),
                                       scale=float(scale), offset_x=float(offset_x), offset_y=float(offset_y))
        if len(faces) > 1:
            C.notify(f"{len(faces)} faces found; using {crop.source}. Pick another with face_index.", severity="info")
        else:
            log.info("KeyFace: face crop from %s", crop.source)
        return face[None], crop, len(faces)


def _paste_inputs():
    from ..keyface.face import DEFAULT_COLOR_MATCH, DEFAULT_FEATHER

    return {
        "feather": ("FLOAT", {"default": DEFAULT_FEATHER, "min": 0.0, "max": 0.5, "step": 0.01,
                              "tooltip": "Width of the soft seam, as a fraction of the crop side."}),
        "color_match": ("BOOLEAN", {"default": DEFAULT_COLOR_MATCH,
                                    "tooltip": "Shift each frame's face colour to the photo's around the seam."}),
    }


def face_paster(face_crop, feather=None, color_match=None, even: bool = True):
    """The FacePaster of KeyFace Save Video's optional inputs (None without a face_crop); even sizes for H.264."""
    if face_crop is None:
        return None
    from ..keyface.face import DEFAULT_COLOR_MATCH, DEFAULT_FEATHER
    from ..keyface.face.paste import FacePaster

    paster = FacePaster(face_crop, feather=DEFAULT_FEATHER if feather is None else float(feather),
                        color_match=DEFAULT_COLOR_MATCH if color_match is None else bool(color_match), even=even)
    if (paster.width, paster.height) != (face_crop.width, face_crop.height):
        log.info("KeyFace: the %dx%d picture is cut to %dx%d (H.264 needs even sizes)", face_crop.width,
                 face_crop.height, paster.width, paster.height)
    return paster


class KeyFacePasteBack:
    DESCRIPTION = ("Puts KeyFace frames back into the original photo (its full size and aspect): the face warped "
                   "back, blended with a soft seam, the rest of the picture unchanged. For long clips use KeyFace "
                   "Save Video's face_crop input instead (it pastes chunk by chunk into the mp4).")
    CATEGORY = C.CATEGORY
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The frames at the photo's size.",)
    CHUNK = 16  # frames per step: progress, cancel, and a bounded temporary

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "KeyFace frames (e.g. from KeyFace Decode)."}),
            "face_crop": (CROP_TYPE, {"tooltip": "From KeyFace Detect & Crop Face."}),
            **_paste_inputs(),
        }}

    def paste(self, images, face_crop, feather, color_match):
        import comfy.utils
        import torch

        from ..keyface.face.paste import FacePaster

        if getattr(images, "ndim", 0) != 4:  # chunking a single [H, W, 3] frame would cut it into rows
            raise ValueError(f"images: expected an IMAGE batch [n, s, s, 3] of KeyFace frames, got "
                             f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
        paster = FacePaster(face_crop, feather=float(feather), color_match=bool(color_match))
        n = int(images.shape[0])
        out = C.image_batch(n, paster.height, paster.width, torch.device("cpu"), "KeyFace Paste Back",
                            "For long clips give the face_crop to KeyFace Save Video instead: it pastes chunk by "
                            "chunk into the mp4 (memory stays flat).")
        bar = comfy.utils.ProgressBar(n)
        for i in range(0, n, self.CHUNK):
            C.check_interrupt()
            out[i:i + self.CHUNK] = paster.paste(images[i:i + self.CHUNK], what=f"images[{i}:{min(i + self.CHUNK, n)}]")
            bar.update_absolute(min(i + self.CHUNK, n), n)
        return (out,)


NODE_CLASS_MAPPINGS = {"KeyFaceDetectCropFace": KeyFaceDetectCropFace, "KeyFacePasteBack": KeyFacePasteBack}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceDetectCropFace": "KeyFace Detect & Crop Face",
                              "KeyFacePasteBack": "KeyFace Paste Back"}
