"""The shipped workflows: ``workflows/<name>.json``, each with its thumbnail ``workflows/<name>.jpg``.

ComfyUI lists a pack's ``workflows/*.json`` in its template browser (``/api/workflow_templates``), and
both frontends we test (1.32.9 and 1.58.1) show the file name without ``.json`` as the card's title and
load ``/api/workflow_templates/<pack>/<name>.jpg`` as its picture: the file names are the titles users
read. They use letters, spaces and hyphens only (no character a URL, Windows or a quoted shell path
trips on). The Python side (the main job, tests, tools) names a workflow through these constants.
"""

from __future__ import annotations

from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"

TALKING_HEAD = "KeyFace - Talking head"
EMOTION_OVER_TIME = "KeyFace - Emotion over time"
FULL_SIZE_PHOTO = "KeyFace - Full-size photo"
ALL = (TALKING_HEAD, EMOTION_OVER_TIME, FULL_SIZE_PHOTO)


def workflow_path(name: str) -> Path:
    return WORKFLOWS_DIR / f"{name}.json"


def thumbnail_path(name: str) -> Path:
    return WORKFLOWS_DIR / f"{name}.jpg"
