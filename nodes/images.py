"""Pictures the nodes return: IMAGE tensors <-> PIL, labelled grids and the loss curve."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 27)
FOREGROUND = (235, 235, 235)
MUTED = (140, 140, 150)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE (H, W, C floats in [0, 1]) to RGB."""
    array = (image.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


def to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures of one size to a ComfyUI IMAGE batch (B, H, W, 3)."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _wrap(text: str, width_chars: int, max_lines: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width_chars and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width_chars - 1)] + "…"
    return lines


def labelled_grid(
    images: list[Image.Image], labels: list[str], cell: int = 256, columns: int = 0, title: str = ""
) -> Image.Image:
    """Each picture scaled into a cell with its label under it; an optional title on top."""
    columns = columns or min(len(images), 4) or 1
    rows = math.ceil(len(images) / columns) if images else 1
    label_font, title_font = font(max(12, cell // 14)), font(max(14, cell // 11))
    label_height = 3 * (cell // 14 + 6)
    title_height = cell // 7 + 12 if title else 0
    grid = Image.new("RGB", (columns * cell, title_height + rows * (cell + label_height)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((8, 6), title, fill=FOREGROUND, font=title_font)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        x, y = col * cell, title_height + row * (cell + label_height)
        fitted = _fit(image, cell)
        grid.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
        label = labels[index] if index < len(labels) else ""
        for line_no, line in enumerate(_wrap(label, max(8, cell // 8), 3)):
            draw.text((x + 6, y + cell + 4 + line_no * (cell // 14 + 6)), line, fill=FOREGROUND, font=label_font)
    return grid


def loss_curve(steps: list[int], losses: list[float], smoothed: list[float], title: str = "") -> Image.Image:
    """Raw and smoothed loss against step, with axes, ticks and a legend."""
    width, height, left, right, top, bottom = 768, 432, 72, 24, 40, 52
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    small, normal = font(13), font(16)
    draw.text((left, 10), title or "training loss", fill=FOREGROUND, font=normal)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=MUTED)
    draw.text((left + plot_w // 2 - 16, height - 22), "step", fill=FOREGROUND, font=small)
    draw.text((8, top - 18), "loss", fill=FOREGROUND, font=small)
    if not steps:
        draw.text((left + 12, top + 12), "no steps yet", fill=MUTED, font=small)
        return image
    x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)
    values = losses + smoothed
    y_lo, y_hi = min(values), max(values)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def point(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x_lo) / (x_hi - x_lo) * plot_w, top + (y_hi - value) / (y_hi - y_lo) * plot_h)

    for k in range(5):
        value = y_lo + (y_hi - y_lo) * k / 4
        _, y = point(x_lo, value)
        draw.line((left - 4, y, left, y), fill=MUTED)
        draw.text((6, y - 7), f"{value:.4g}", fill=MUTED, font=small)
        step = x_lo + (x_hi - x_lo) * k / 4
        x, _ = point(step, y_lo)
        draw.line((x, top + plot_h, x, top + plot_h + 4), fill=MUTED)
        draw.text((x - 10, top + plot_h + 6), f"{step:.0f}", fill=MUTED, font=small)
    raw_color, smooth_color = (110, 140, 200), (250, 170, 60)
    if len(steps) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses, strict=True)], fill=raw_color, width=1)
        draw.line([point(s, v) for s, v in zip(steps, smoothed, strict=True)], fill=smooth_color, width=3)
    else:
        x, y = point(steps[0], losses[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=smooth_color)
    legend_x = left + plot_w - 170
    draw.line((legend_x, top + 14, legend_x + 24, top + 14), fill=raw_color, width=2)
    draw.text((legend_x + 30, top + 7), "loss", fill=FOREGROUND, font=small)
    draw.line((legend_x, top + 32, legend_x + 24, top + 32), fill=smooth_color, width=3)
    draw.text((legend_x + 30, top + 25), "smoothed (EMA 0.9)", fill=FOREGROUND, font=small)
    return image
