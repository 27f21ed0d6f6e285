"""Pictures the nodes return: IMAGE tensors <-> PIL, labelled grids and the loss curve."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 27)
FOREGROUND = (235, 235, 235)
MUTED = (140, 140, 150)
GRIDLINE = (48, 48, 54)
RAW_COLOR = (120, 150, 215)
SMOOTH_COLOR = (250, 170, 60)
NO_BREAK_SPACE = "\u00a0"
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE (H, W, C floats in [0, 1]) to RGB."""
    array = (image.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., :3])


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """One ComfyUI MASK (H, W floats in [0, 1]) to 8-bit grey."""
    array = (mask.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="L")


def to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures of one size to a ComfyUI IMAGE batch (B, H, W, 3)."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def text_width(text: str, face: Font) -> float:
    return face.getlength(text)


def at(x: float, y: float) -> tuple[int, int]:
    """Whole-pixel text positions: the same text then looks the same wherever it is drawn."""
    return round(x), round(y)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


# Characters that are among the narrowest of any font: with half the narrowest of them as the smallest glyph width,
# no line of a given width can hold more characters than `character_limit` says (room for kerning, hair spaces).
NARROW_CHARACTERS = " .,:;'|!iljI"
WORD = re.compile(r"[^ ]+")  # only plain spaces break a line
INK = re.compile(r"\S")  # what str.strip() would not remove


def character_limit(face: Font, width: float) -> int:
    """More characters than a line `width` pixels wide can show: a longer text is cut without measuring it all."""
    narrowest = min(text_width(character, face) for character in NARROW_CHARACTERS)
    return math.floor(max(width, 0) / max(narrowest / 2, 0.5)) + 1


def _fits(text: str, face: Font, width: float, limit: int) -> bool:
    # the length test first: measuring a huge text is slow, and Pillow refuses a million characters
    return len(text) <= limit and text_width(text, face) <= width


def _ellipsis_point(text: str, face: Font, width: float) -> int:
    """How many leading characters of `text` still fit in `width` with an ellipsis after them (0 when none do)."""
    low, high = 0, len(text)  # the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if text_width(text[:middle] + "…", face) <= width:
            low = middle
        else:
            high = middle - 1
    return low


def _cut_to_fit(text: str, face: Font, width: float, limit: int) -> str:
    if _fits(text, face, width, limit):
        return text
    shown = text[:limit]
    return shown[: _ellipsis_point(shown, face, width)] + "…"


def _shorten(text: str, face: Font, width: float) -> str:
    """`text`, cut and ended with an ellipsis where it is wider than `width`."""
    return _cut_to_fit(text, face, width, character_limit(face, width))


def _words(text: str, longest: int) -> Iterator[str]:
    """The words between plain spaces that show something, each cut to `longest` characters, NBSP as a space."""
    for match in WORD.finditer(text):
        start, end = match.span()
        if INK.search(text, start, end):
            yield text[start : min(end, start + longest)].replace(NO_BREAK_SPACE, " ")


def wrap(text: str, face: Font, width: float, max_lines: int) -> list[str]:
    """Lines of whole words no wider than `width` (a longer word is cut); the last line ends in … when cut.

    Only the first `max_lines` lines are laid out and no word is measured past what a line can show, so the work
    is bounded whatever the length of `text`."""
    limit = character_limit(face, width)
    lines: list[str] = []
    # only plain spaces break a line: "step\u00a0400" stays whole, drawn with a plain space (the font has no NBSP);
    # a word one character longer than `limit` is known not to fit, so that is all of it ever looked at
    for word in _words(text, limit + 1):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and _fits(candidate, face, width, limit):
            lines[-1] = candidate
        else:
            lines.append(_cut_to_fit(word, face, width, limit))
        if len(lines) > max_lines:  # a line past the last shown: the rest of the text is left out
            break
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] if lines[-1].endswith("…") else _cut_to_fit(lines[-1] + "…", face, width, limit)
    return lines


def grid_fonts(cell: int) -> tuple[Font, Font, int, int]:
    """Label font, title font and their line heights for a grid of `cell`-pixel cells."""
    label_size, title_size = max(12, cell // 14), max(14, cell // 11)
    return font(label_size), font(title_size), label_size + 6, title_size + 6


def labelled_grid(
    images: list[Image.Image], labels: list[str], cell: int = 256, columns: int = 0, title: str = ""
) -> Image.Image:
    """Each picture scaled into a cell with its label under it; an optional title on top, wrapped to fit."""
    columns = columns or min(len(images), 4) or 1
    rows = math.ceil(len(images) / columns) if images else 1
    width = columns * cell
    label_font, title_font, label_line, title_line = grid_fonts(cell)
    title_lines = wrap(title, title_font, width - 16, 3) if title else []
    title_height = len(title_lines) * title_line + 12 if title_lines else 0
    label_height = 3 * label_line + 6
    grid = Image.new("RGB", (width, title_height + rows * (cell + label_height)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for line_no, line in enumerate(title_lines):
        draw.text((8, 6 + line_no * title_line), line, fill=FOREGROUND, font=title_font)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        x, y = col * cell, title_height + row * (cell + label_height)
        fitted = _fit(image, cell)
        grid.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
        label = labels[index] if index < len(labels) else ""
        for line_no, line in enumerate(wrap(label, label_font, cell - 12, 3)):
            draw.text((x + 6, y + cell + 4 + line_no * label_line), line, fill=FOREGROUND, font=label_font)
    return grid


# ---- the loss curve ------------------------------------------------------------------------------


def nice_step(span: float, count: int, integer: bool = False) -> float:
    """A 1, 2 or 5 times a power of ten step that cuts `span` into about `count` intervals."""
    raw = max(span, 1e-12) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return max(1.0, round(step)) if integer else step


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (the first ≤ lo, the last ≥ hi)."""
    if hi - lo < 1e-12:
        lo, hi = (lo - 1, hi + 1) if integer else (lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3))
    step = nice_step(hi - lo, count, integer)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def vertical_text(text: str, face: Font, fill: tuple[int, int, int]) -> Image.Image:
    """`text` turned a quarter left (reads bottom to top), on the background colour."""
    left, top, right, bottom = face.getbbox(text)
    label = Image.new("RGB", (int(right) + 2, int(bottom) + 2), BACKGROUND)
    ImageDraw.Draw(label).text((0, 0), text, fill=fill, font=face)
    return label.rotate(90, expand=True)


class Plot:
    """Maps (step, loss) into a pixel box."""

    def __init__(self, box: tuple[int, int, int, int], x_range: tuple[float, float], y_range: tuple[float, float]):
        self.box, self.x_range, self.y_range = box, x_range, y_range

    def point(self, step: float, value: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x_lo, x_hi), (y_lo, y_hi) = self.x_range, self.y_range
        return (left + (step - x_lo) / (x_hi - x_lo) * (right - left),
                top + (y_hi - value) / (y_hi - y_lo) * (bottom - top))


def draw_axes(image: Image.Image, plot: Plot, x_ticks: list[float], y_ticks: list[float]) -> None:
    draw, small = ImageDraw.Draw(image), font(13)
    left, top, right, bottom = plot.box
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    for value in y_ticks:
        _, y = plot.point(plot.x_range[0], value)
        draw.line((left, y, right, y), fill=GRIDLINE)
        draw.line((left - 5, y, left, y), fill=MUTED)
        label = tick_label(value, y_step)
        draw.text(at(left - 8 - text_width(label, small), y - 8), label, fill=MUTED, font=small)
    for step in x_ticks:
        x, _ = plot.point(step, plot.y_range[0])
        draw.line((x, top, x, bottom), fill=GRIDLINE)
        draw.line((x, bottom, x, bottom + 5), fill=MUTED)
        label = f"{step:.0f}"
        draw.text(at(x - text_width(label, small) / 2, bottom + 8), label, fill=MUTED, font=small)
    draw.rectangle(plot.box, outline=MUTED)
    normal = font(15)
    draw.text(at((left + right - text_width("step", normal)) / 2, bottom + 28), "step", fill=FOREGROUND, font=normal)
    label = vertical_text("loss", normal, FOREGROUND)
    image.paste(label, (8, (top + bottom - label.height) // 2))


def draw_legend(draw: ImageDraw.ImageDraw, right: int, y: int) -> None:
    """The two line styles and their names, right-aligned at `right`."""
    small = font(13)
    entries = [("loss (each step)", RAW_COLOR, 2), ("smoothed (EMA 0.9)", SMOOTH_COLOR, 4)]
    widths = [28 + text_width(name, small) for name, _, _ in entries]
    x = right - sum(widths) - 16 * (len(entries) - 1)
    for (name, color, line_width), entry_width in zip(entries, widths, strict=True):
        draw.line((x, y + 8, x + 22, y + 8), fill=color, width=line_width)
        draw.text(at(x + 28, y), name, fill=FOREGROUND, font=small)
        x += entry_width + 16


def draw_series(draw: ImageDraw.ImageDraw, plot: Plot, steps: Sequence[int], losses: Sequence[float],
                smoothed: Sequence[float]) -> None:
    if len(steps) == 1:
        x, y = plot.point(steps[0], losses[0])
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=SMOOTH_COLOR)
        return
    draw.line([plot.point(s, v) for s, v in zip(steps, losses, strict=True)], fill=RAW_COLOR, width=1)
    draw.line([plot.point(s, v) for s, v in zip(steps, smoothed, strict=True)], fill=SMOOTH_COLOR, width=3,
              joint="curve")


def loss_curve(steps: list[int], losses: list[float], smoothed: list[float], title: str = "") -> Image.Image:
    """Raw and smoothed loss against step: titled, with round ticks, gridlines, axis names and a legend."""
    width, height = 768, 448
    box = (84, 64, width - 24, height - 60)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    title_font = font(16)
    draw.text((box[0], 10), _shorten(title or "training loss", title_font, box[2] - box[0]), fill=FOREGROUND,
              font=title_font)
    draw_legend(draw, box[2], 38)
    # a run stopped by the non-finite guard, or an older events log, can hold NaN or infinite losses: the
    # finite ones are drawn
    kept = [(s, v, m) for s, v, m in zip(steps, losses, smoothed, strict=True) if math.isfinite(v + m)]
    steps, losses, smoothed = ([list(column) for column in zip(*kept, strict=True)] if kept else ([], [], []))
    if not steps:
        plot = Plot(box, (0, 1), (0, 1))
        draw_axes(image, plot, [], [])
        draw.text((box[0] + 12, box[1] + 12), "no steps yet", fill=MUTED, font=font(13))
        return image
    x_ticks = nice_ticks(min(steps), max(steps), 6, integer=True)
    y_ticks = nice_ticks(min(losses + smoothed), max(losses + smoothed), 5)
    plot = Plot(box, (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1]))
    draw_axes(image, plot, x_ticks, y_ticks)
    draw_series(draw, plot, steps, losses, smoothed)
    return image
