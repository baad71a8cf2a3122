"""Makes ``tests/fixtures/media/photo_wide_1920x1080.jpg`` (the face workflow's input) from the public
domain Grace Hopper portrait: a 16:9 picture with the face off-centre and small, the way users' photos
are, on a blurred widening of the portrait itself. Run from the repository root; deterministic."""

from pathlib import Path

from PIL import Image, ImageFilter

MEDIA = Path(__file__).resolve().parents[1] / "fixtures" / "media"
OUT = MEDIA / "photo_wide_1920x1080.jpg"


def main():
    src = Image.open(MEDIA / "face_grace_hopper.jpg").convert("RGB")
    canvas = src.resize((1920, 1080), Image.BILINEAR).filter(ImageFilter.GaussianBlur(40))
    portrait = src.resize((640, 750), Image.LANCZOS)
    canvas.paste(portrait, (1120, 200))
    canvas.save(OUT, quality=90, optimize=True)
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
