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
