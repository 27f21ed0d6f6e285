"""Draws the sample dataset: 8 small captioned pictures of coloured shapes, made by this code alone.

    python scripts/make_sample_dataset.py DEST_FOLDER

Writes DEST/NAME.png + DEST/NAME.txt; existing files are left as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
COLORS = {"red": (210, 40, 40), "blue": (40, 70, 210), "green": (40, 160, 70), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square")


def draw_shape(shape: str, color: tuple[int, int, int], size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 242, 235))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color, outline=(30, 30, 30), width=3)
    else:
        draw.rectangle(box, fill=color, outline=(30, 30, 30), width=3)
    return image


def make_sample_dataset(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for color_name, color in COLORS.items():
        for shape in SHAPES:
            stem = f"{color_name}_{shape}"
            png, txt = dest / f"{stem}.png", dest / f"{stem}.txt"
            if not png.exists():
                draw_shape(shape, color).save(png)
            if not txt.exists():
                txt.write_text(f"lfstyle, a {color_name} {shape}, flat colour, thick outline\n", encoding="utf-8")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make_sample_dataset(Path(sys.argv[1])))
