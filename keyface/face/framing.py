"""Detect (or take a manual box) and crop: the one call the node and the command line make."""

from __future__ import annotations

from .align import FaceCrop, crop_face, to_uint8_image, transform_from_box, transform_from_landmarks
from .mtcnn import FaceDetectionError, detect_faces, pick_face


def frame_face(image, *, detector=None, box=None, face_index: int = 0, size: int = 512, scale: float = 1.0,
               offset_x: float = 0.0, offset_y: float = 0.0, what: str = "image"):
    """-> (crop [size, size, 3] float 0..1, FaceCrop, faces found (list; empty in manual mode)).

    ``box`` (x, y, width, height) in pixels: manual framing, no detector needed. Otherwise
    ``detector`` (an MTCNN) finds the faces and ``face_index`` picks one (0 = the largest).
    """
    pixels = to_uint8_image(image, what)
    height, width = pixels.shape[:2]
    if box is not None:
        transform = transform_from_box(*box, size=size, scale=scale, offset_x=offset_x, offset_y=offset_y,
                                       image_size=(width, height))
        faces, source = [], f"manual box {tuple(box)}"
    else:
        if detector is None:
            raise FaceDetectionError(f"{what}: face detection needs the MTCNN detector (or give a manual box)")
        faces = detect_faces(detector, pixels, what=what)
        face = pick_face(faces, face_index, what=what)
        transform = transform_from_landmarks(face.landmarks, size=size, scale=scale, offset_x=offset_x,
                                             offset_y=offset_y)
        x1, y1, x2, y2 = face.box
        source = (f"face {face_index} of {len(faces)} (0 = largest; box x={x1:.0f} y={y1:.0f} "
                  f"w={x2 - x1:.0f} h={y2 - y1:.0f}, score {face.score:.3f})")
    crop = FaceCrop(transform=transform, image=pixels, source=source)
    return crop_face(pixels, transform), crop, faces
