"""Reading images the same way everywhere (embedding, captioning, the report, the generators)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def load_rgb(path: str | Path) -> Image.Image:
    """An RGB image; transparent pixels are composited on white (a plain convert("RGB") would expose
    whatever colour hides under them, black for Twemoji). Opaque images are unchanged."""
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "P") and ("A" in image.mode or "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
