"""Real photos in, full-resolution video out: face detection (MTCNN), aligned crop, paste-back.

* :mod:`.mtcnn`: ``load_mtcnn(folder)``, ``detect_faces(model, image) -> [Face]`` (largest first),
  ``pick_face(faces, index)``;
* :mod:`.align`: ``transform_from_landmarks`` / ``transform_from_box`` -> ``CropTransform``,
  ``crop_face(image, transform)``, ``FaceCrop`` (transform + original picture: ``KEYFACE_CROP``);
* :mod:`.paste`: ``FacePaster(face_crop, feather, color_match)`` -> ``paste`` / ``paste_uint8`` per chunk;
* :mod:`.framing`: ``frame_face``: detect (or take a manual box) and crop in one call, as the node and the CLI do;
* :mod:`.cli_args`: the ``--face`` options of ``python -m keyface render``.

Importing this package imports nothing (the command line stays torch-free until it renders).
"""

FACE_MODES = ("auto", "manual", "off")  # the command line's --face; the node offers the first two
DEFAULT_FEATHER = 0.1  # paste-back seam width, fraction of the crop side
DEFAULT_COLOR_MATCH = True
# MTCNN weight files: models/keyface/mtcnn/{pnet,rnet,onet}.pt (or .safetensors conversions)
DETECTOR_FOLDER = "mtcnn"
NET_NAMES = ("pnet", "rnet", "onet")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
