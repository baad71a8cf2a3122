"""Template thumbnails for the shipped workflows, from the browser tests' screenshots.

ComfyUI's template browser shows a custom node pack's example workflow ``workflows/<name>.json`` with
the thumbnail ``/api/workflow_templates/<pack>/<name>.jpg`` (the same folder, served as is; frontends
1.32 and 1.58 ask for ``.jpg``). Run the layout browser test first, then this:

    .venv/bin/python -m pytest tests/browser/test_workflow_layout.py -k "latest and vue"
    .venv/bin/python tests/tools/make_workflow_thumbnails.py
"""

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "workflow_{name}-latest-vue.png"  # Nodes 2.0 on the newest frontend: what new installs show
CANVAS_BOX = (60, 95, 1520, 900)  # the graph at its saved view (1920x1000 page), without the side bar, tabs and minimap
WIDTH = 512


def main():
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        shot = ROOT / "test-artifacts" / SOURCE.format(name=wf.stem)
        image = Image.open(shot).convert("RGB").crop(CANVAS_BOX)
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
        out = wf.with_suffix(".jpg")
        image.save(out, quality=85, optimize=True)
        print(f"{out.relative_to(ROOT)}: {image.width}x{image.height}, {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
