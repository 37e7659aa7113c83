"""Write the input of `configs/tiny.yaml`: six small PNG shapes and a JSONL manifest naming them.

    python scripts/make_tiny_data.py            # -> data/tiny/manifest.jsonl, data/tiny/media/img0.png ...
    cart pipeline --config configs/tiny.yaml    # then every stage runs on it in seconds

The tests draw the same media (tests/conftest.py uses this file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "orange", "purple", "black"]
DEFAULT = Path("data/tiny")  # relative to the project root, where configs/tiny.yaml points


def make_image(path: Path, colour: str = "red", shape: str = "ellipse", size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    getattr(draw, shape)([8, 8, size - 8, size - 8], fill=colour)
    image.save(path)
    return path


def make_media(folder: Path) -> Path:
    """Six small PNGs in folder/media: img0.png .. img5.png, each a different colour."""
    for i, colour in enumerate(COLOURS):
        make_image(folder / "media" / f"img{i}.png", colour, "ellipse" if i % 2 else "rectangle")
    return folder / "media"


def manifest_rows() -> list[dict]:
    """One item a shape, two captions each; the last item's texts are held-out queries (split test)."""
    return [{"id": f"item{i}", "modality": "image", "path": f"media/img{i}.png",
             "texts": [f"a {c} shape", f"{c}"], "split": "test" if i == len(COLOURS) - 1 else "train"}
            for i, c in enumerate(COLOURS)]


def make(folder: Path) -> Path:
    """The media and `manifest.jsonl` in `folder`; returns the manifest's path."""
    folder = Path(folder)
    make_media(folder)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in manifest_rows()), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
