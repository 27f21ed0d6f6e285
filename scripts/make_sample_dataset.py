"""Draws the sample datasets, made by this code alone: 8 small captioned pictures of coloured shapes, and 4 solid
reds (what the demo trains on a random-weight base, where a LoRA's effect shows most plainly).

    python scripts/make_sample_dataset.py DEST_FOLDER

Writes DEST/NAME.png + DEST/NAME.txt; existing files are left as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
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


def write_once(png: Path, txt: Path, draw: Callable[[], Image.Image], caption: str) -> None:
    if not png.exists():
        draw().save(png)
    if not txt.exists():
        txt.write_text(caption + "\n", encoding="utf-8")


# four shades of one red: one colour pulls a random-weight base's samples far more plainly than four would
SOLID_REDS = {"red-1": (210, 40, 40), "red-2": (200, 50, 45), "red-3": (220, 35, 50), "red-4": (190, 45, 35)}


def make_solid_dataset(dest: Path) -> Path:
    """Four pictures of one solid colour each: a random-weight base learns them within minutes on a CPU."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, color in SOLID_REDS.items():
        write_once(dest / f"{name}.png", dest / f"{name}.txt",
                   lambda color=color: Image.new("RGB", (SIZE, SIZE), color), "lfstyle, solid red")
    return dest


def make_sample_dataset(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for color_name, color in COLORS.items():
        for shape in SHAPES:
            stem = f"{color_name}_{shape}"
            write_once(dest / f"{stem}.png", dest / f"{stem}.txt",
                       lambda shape=shape, color=color: draw_shape(shape, color),
                       f"lfstyle, a {color_name} {shape}, flat colour, thick outline")
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make_sample_dataset(Path(sys.argv[1])))
