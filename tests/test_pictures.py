"""The pictures the nodes return are readable: the loss curve's axes, ticks, names and legend, the compare grid's
labels and its title with the training step.

Text is checked by rendering the expected words separately (same font, same colours) and finding that exact
patch of pixels in the picture, so a missing, clipped or wrong word fails.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scripts.comfy_server import ComfyServer

ROOT = Path(__file__).resolve().parent.parent


def load_images_module() -> ModuleType:
    """nodes/images.py alone (the nodes package imports ComfyUI; this file needs only Pillow, numpy, torch)."""
    spec = importlib.util.spec_from_file_location("lora_foundry_images", ROOT / "nodes" / "images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = load_images_module()


def rendered(text: str, size: int, fill: tuple[int, int, int]) -> np.ndarray:
    """`text` drawn on the background colour, cropped to its ink."""
    face = images.font(size)
    canvas = Image.new("RGB", (int(images.text_width(text, face)) + 40, size * 3), images.BACKGROUND)
    ImageDraw.Draw(canvas).text((10, 10), text, fill=fill, font=face)
    return crop_to_ink(np.asarray(canvas))


def crop_to_ink(array: np.ndarray) -> np.ndarray:
    ink = np.argwhere((array != images.BACKGROUND).any(axis=2))
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0)
    return array[top : bottom + 1, left : right + 1]


def find(picture: Image.Image | np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Every (x, y) where `patch` appears pixel for pixel in the picture."""
    haystack = np.asarray(picture.convert("RGB")) if isinstance(picture, Image.Image) else picture
    h, w = patch.shape[:2]
    brightest = np.unravel_index(patch.sum(axis=2).argmax(), patch.shape[:2])
    anchor = patch[brightest]
    candidates = np.argwhere((haystack == anchor).all(axis=2))
    found = []
    for y, x in candidates:
        top, left = y - brightest[0], x - brightest[1]
        if top < 0 or left < 0 or top + h > haystack.shape[0] or left + w > haystack.shape[1]:
            continue
        if np.array_equal(haystack[top : top + h, left : left + w], patch):
            found.append((int(left), int(top)))
    return found


def noisy_run(n: int) -> tuple[list[int], list[float], list[float]]:
    steps = list(range(1, n + 1))
    losses = [0.15 + 0.1 * math.exp(-k / (n / 4)) + 0.03 * math.sin(k * 1.7) for k in steps]
    smoothed, value = [], None
    for loss in losses:
        value = loss if value is None else 0.9 * value + 0.1 * loss
        smoothed.append(value)
    return steps, losses, smoothed


# ---- ticks ---------------------------------------------------------------------------------------


def test_ticks_are_round_and_cover_the_range() -> None:
    assert images.nice_ticks(1, 3, 6, integer=True) == [1, 2, 3]
    assert images.nice_ticks(1, 400, 6, integer=True) == [0, 100, 200, 300, 400]
    ticks = images.nice_ticks(0.8953, 1.1196, 5)
    assert ticks[0] <= 0.8953 and ticks[-1] >= 1.1196
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert steps == {0.05}
    assert images.tick_label(ticks[1], 0.05) == "0.90"
    for lo, hi in [(5, 5), (0.2, 0.2), (0, 1e-9)]:
        flat = images.nice_ticks(lo, hi, 5)
        assert flat[0] < flat[-1] and flat[0] <= lo and flat[-1] >= hi


# ---- the loss curve ----------------------------------------------------------------------------------


def test_loss_curve_has_axes_ticks_names_and_legend() -> None:
    steps, losses, smoothed = noisy_run(400)
    curve = images.loss_curve(steps, losses, smoothed, title="shapes.safetensors · base.safetensors")
    small, muted, fg = 13, images.MUTED, images.FOREGROUND
    for text, size, colour in [("shapes.safetensors · base.safetensors", 16, fg), ("step", 15, fg),
                               ("loss (each step)", small, fg), ("smoothed (EMA 0.9)", small, fg),
                               ("0", small, muted), ("200", small, muted), ("400", small, muted),
                               ("0.10", small, muted), ("0.30", small, muted)]:
        assert find(curve, rendered(text, size, colour)), f"{text!r} is not in the loss curve"
    loss_name = np.asarray(images.vertical_text("loss", images.font(15), fg))
    assert find(curve, crop_to_ink(loss_name)), "the vertical axis has no name"
    left, top, right, bottom = 84, 64, 768 - 24, 448 - 60
    plot = np.asarray(curve)[top + 2 : bottom - 1, left + 2 : right - 1]
    raw = (plot == images.RAW_COLOR).all(axis=2).sum()
    ema = (plot == images.SMOOTH_COLOR).all(axis=2).sum()
    assert raw > 500 and ema > 500, (raw, ema)


def test_loss_curve_of_a_short_run_labels_whole_steps() -> None:
    curve = images.loss_curve([1, 2, 3], [1.12, 1.06, 0.90], [1.12, 1.11, 1.09])
    for text in ("1", "2", "3"):
        assert len(find(curve, rendered(text, 13, images.MUTED))) >= 1, text
    assert not find(curve, rendered("2.5", 13, images.MUTED))


@pytest.mark.parametrize("points", [0, 1])
def test_loss_curve_without_enough_points_still_draws(points: int) -> None:
    steps, losses, smoothed = noisy_run(1)
    curve = images.loss_curve(steps[:points], losses[:points], smoothed[:points])
    assert curve.size == (768, 448)
    if points == 0:
        assert find(curve, rendered("no steps yet", 13, images.MUTED))


def test_loss_curve_draws_the_finite_losses_of_a_run_that_went_non_finite() -> None:
    # an events log of a run that went NaN (or one written before the guard) failed the node:
    # "cannot convert float NaN to integer"
    steps, losses, smoothed = noisy_run(40)
    losses[30:] = [math.nan] * 10
    smoothed[30:] = [math.inf] * 10
    curve = images.loss_curve(steps, losses, smoothed)
    assert find(curve, rendered("0", 13, images.MUTED)) and find(curve, rendered("loss (each step)", 13,
                                                                                images.FOREGROUND))
    plot = np.asarray(curve)[64 + 2 : 448 - 61, 84 + 2 : 768 - 25]
    assert (plot == images.RAW_COLOR).all(axis=2).sum() > 100
    nothing = images.loss_curve([1, 2], [math.nan, math.nan], [math.nan, math.nan])
    assert find(nothing, rendered("no steps yet", 13, images.MUTED))


# ---- the grid ------------------------------------------------------------------------------------------


def test_grid_title_wraps_inside_the_picture_and_keeps_the_step_whole() -> None:
    pictures = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (64, 64), (40, 40, 200))]
    title = "lfstyle-shapes: same seed, LoRA off / on · step\u00a0400"
    grid = images.labelled_grid(pictures, ["strength 0.0", "strength 1.0"], cell=64, title=title)
    label_font, title_font, _, _ = images.grid_fonts(64)
    lines = images.wrap(title, title_font, 128 - 16, 3)
    assert lines[-1].endswith("step 400") and all(images.text_width(line, title_font) <= 112 for line in lines)
    for line in lines:
        assert find(grid, rendered(line, title_font.size, images.FOREGROUND)), line
    assert find(grid, rendered("strength", label_font.size, images.FOREGROUND))


@pytest.mark.comfy_server
def test_compare_grid_labels_strength_and_the_linked_step(comfy_server: ComfyServer) -> None:
    def empty(color: int) -> dict:
        return {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}}

    cell = 128
    prompt = {
        "1": empty(0xFF0000),
        "2": empty(0x0000FF),
        "3": {"class_type": "PrimitiveInt", "inputs": {"value": 7, "control_after_generate": "fixed"}},
        "4": {"class_type": "LoraFoundryCompareGrid",
              "inputs": {"image_a": ["1", 0], "image_b": ["2", 0], "labels": "strength 0.0\nstrength 1.0",
                         "title": "shapes", "cell": cell, "step": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "lf-pictures/grid"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    (saved,) = entry["outputs"]["5"]["images"]
    with Image.open(comfy_server.output_dir / saved["subfolder"] / saved["filename"]) as image:
        grid = np.asarray(image.convert("RGB"))
    label_font, title_font, label_line, _ = images.grid_fonts(cell)
    title_band = grid[: grid.shape[0] - cell - (3 * label_line + 6)]
    assert find(title_band, rendered("shapes · step 7", title_font.size, images.FOREGROUND))
    assert not find(title_band, rendered("shapes · step 8", title_font.size, images.FOREGROUND))
    left, right = (find(grid, rendered(f"strength {s}", label_font.size, images.FOREGROUND)) for s in ("0.0", "1.0"))
    assert left and right and left[0][0] < cell <= right[0][0], (left, right)


# ---- long captions -------------------------------------------------------------------------------------
# The Dataset node's preview draws each picture's caption under it: a caption of 20 000 characters without spaces
# blocked ComfyUI's queue for minutes (the text was shortened one character at a time, measured whole each time),
# and one of 5 MB failed with Pillow's "too many characters in string".

PREVIEW_CELL = 160  # the Dataset node's preview
WORDS = "a photo of lfstyle shapes, red circle\u00a0on grey, soft light "


def previous_shorten(text: str, face: images.Font, width: float) -> str:
    """How captions were shortened before the work was bounded: what they must still look like."""
    if images.text_width(text, face) <= width:
        return text
    while text and images.text_width(text + "…", face) > width:
        text = text[:-1]
    return text + "…"


def previous_wrap(text: str, face: images.Font, width: float, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in (w.replace(images.NO_BREAK_SPACE, " ") for w in text.split(" ") if w.strip()):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and images.text_width(candidate, face) <= width:
            lines[-1] = candidate
        else:
            lines.append(previous_shorten(word, face, width))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = previous_shorten(lines[-1] + "…", face, width) if not lines[-1].endswith("…") else lines[-1]
    return lines


class CountingFont:
    """A font that counts how often it is asked to measure a text."""

    def __init__(self, face: images.Font) -> None:
        self.face, self.measured = face, 0

    def getlength(self, text: str, *args: object, **kwargs: object) -> float:
        self.measured += 1
        return self.face.getlength(text, *args, **kwargs)


def caption_of(length: int, spaced: bool) -> str:
    text = WORDS if spaced else "lfstyle_shapes_red_circle_"
    return (text * (length // len(text) + 1))[:length]


def preview_of(caption: str) -> tuple[Image.Image, list[str]]:
    """The preview grid of one picture with `caption`, and the lines its label should show."""
    picture = Image.new("RGB", (64, 48), (200, 40, 40))
    grid = images.labelled_grid([picture], [caption], cell=PREVIEW_CELL)
    label_font, _, _, _ = images.grid_fonts(PREVIEW_CELL)
    return grid, images.wrap(caption, label_font, PREVIEW_CELL - 12, 3)


def assert_label_drawn(grid: Image.Image, lines: list[str]) -> None:
    label_font, _, label_line, _ = images.grid_fonts(PREVIEW_CELL)
    assert grid.size == (PREVIEW_CELL, PREVIEW_CELL + 3 * label_line + 6)
    for line in lines:
        assert images.text_width(line, label_font) <= PREVIEW_CELL - 12, line
        assert find(grid, rendered(line, label_font.size, images.FOREGROUND)), f"{line!r} is not drawn"


def test_a_caption_of_20000_characters_without_spaces_is_drawn_cut_with_an_ellipsis() -> None:
    caption = caption_of(20_000, spaced=False)
    grid, lines = preview_of(caption)
    assert len(lines) == 1 and lines[0].endswith("…") and caption.startswith(lines[0][:-1])
    assert_label_drawn(grid, lines)


@pytest.mark.parametrize("spaced", [False, True], ids=["one word", "words"])
def test_a_caption_of_5_megabytes_is_drawn_cut_with_an_ellipsis(spaced: bool) -> None:
    grid, lines = preview_of(caption_of(5_000_000, spaced))
    assert len(lines) == (3 if spaced else 1) and lines[-1].endswith("…")
    assert_label_drawn(grid, lines)


@pytest.mark.parametrize("spaced", [False, True], ids=["one word", "words"])
def test_measuring_a_caption_does_not_grow_with_its_length(spaced: bool) -> None:
    label_font, _, _, _ = images.grid_fonts(PREVIEW_CELL)
    measured = {}
    for length in (20_000, 5_000_000):
        face = CountingFont(label_font)
        lines = images.wrap(caption_of(length, spaced), face, PREVIEW_CELL - 12, 3)
        assert lines[-1].endswith("…")
        measured[length] = face.measured
    assert measured[20_000] == measured[5_000_000] <= 60, measured


def test_a_caption_of_tiny_words_is_measured_a_bounded_number_of_times() -> None:
    label_font, _, _, _ = images.grid_fonts(PREVIEW_CELL)
    face = CountingFont(label_font)
    lines = images.wrap("i " * 2_500_000, face, PREVIEW_CELL - 12, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and face.measured <= 200, face.measured


def test_a_short_caption_renders_as_before() -> None:
    caption = "a photo of lfstyle shapes: a red circle\u00a0on grey"
    grid, lines = preview_of(caption)
    label_font, _, _, _ = images.grid_fonts(PREVIEW_CELL)
    assert lines == previous_wrap(caption, label_font, PREVIEW_CELL - 12, 3) == [
        "a photo of lfstyle shapes: a", "red circle on grey"], lines
    assert_label_drawn(grid, lines)


@pytest.mark.parametrize("caption", [
    caption_of(300, spaced=True),
    caption_of(300, spaced=False),
    "short " + "x" * 400 + " words after a long one",
    "step\u00a0400 \u00a0 \n spaces  between   words and a final_word_that_is_long_enough_to_be_cut_off_here",
    "i " * 200,
    "",
])
@pytest.mark.parametrize("cell", [64, 160, 256])
def test_captions_wrap_as_before(caption: str, cell: int) -> None:
    label_font, title_font, _, _ = images.grid_fonts(cell)
    for face in (label_font, title_font):
        assert images.wrap(caption, face, cell - 12, 3) == previous_wrap(caption, face, cell - 12, 3)
        assert images._shorten(caption, face, cell - 12) == previous_shorten(caption, face, cell - 12)
