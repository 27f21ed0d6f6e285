"""Masked loss: a mask beside a picture weights its loss; what lies under black cannot change the LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_image, read_events, run_trainer, tiny_config
from PIL import Image, ImageDraw
from test_trainer import assert_ok, lora_of, max_diff

from trainer.config import DataConfig
from trainer.data import DataError, Item, bucket_for, check_images, open_mask, prepare_framed, prepare_mask, scan_folder


def half_mask(path: Path, size: tuple[int, int], keep: str = "left") -> Path:
    """White on one half (trains), black on the other (ignored)."""
    mask = Image.new("L", size, 0)
    w, h = size
    box = (0, 0, w // 2 - 1, h - 1) if keep == "left" else (w // 2, 0, w - 1, h - 1)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return path


def scribble_right_half(path: Path, seed: int) -> None:
    """New pixels on the right half of a picture, the left half untouched."""
    pixels = np.asarray(Image.open(path).convert("RGB")).copy()
    w = pixels.shape[1]
    pixels[:, w // 2:] = np.random.default_rng(seed).integers(0, 256, pixels[:, w // 2:].shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def masked_folder(folder: Path, scribble: int | None) -> Path:
    folder.mkdir(parents=True)
    for name, colour, shape in (("red", (220, 30, 30), "circle"), ("blue", (30, 30, 220), "square")):
        draw_image(folder / f"{name}.png", (96, 64), colour, shape)  # wider than the bucket: cropped
        (folder / f"{name}.txt").write_text(f"a {name} {shape}")
        half_mask(folder / f"{name}_mask.png", (96, 64))
        if scribble is not None:
            scribble_right_half(folder / f"{name}.png", scribble + len(name))
    return folder


def test_a_mask_beside_a_picture_is_its_mask_not_a_picture(tmp_path) -> None:
    folder = masked_folder(tmp_path / "data", None)
    draw_image(folder / "lonely_mask.png", (64, 64), (0, 0, 0))  # no "lonely" picture: a picture of its own
    items, _ = scan_folder(folder)
    assert [(Path(i.image).name, i.mask and Path(i.mask).name) for i in items] == [
        ("blue.png", "blue_mask.png"), ("lonely_mask.png", None), ("red.png", "red_mask.png")]


def test_masks_that_cannot_be_used_are_refused_by_name(tmp_path) -> None:
    picture = draw_image(tmp_path / "a.png", (64, 64), (200, 0, 0))
    small = half_mask(tmp_path / "small_mask.png", (32, 32))
    black = tmp_path / "black_mask.png"
    Image.new("L", (64, 64), 0).save(black)
    with pytest.raises(DataError) as error:
        check_images([Item(str(picture), "", str(small)), Item(str(picture), "", str(black))])
    assert error.value.problems == [
        f"{small}: the mask is 32x32, its picture 64x64; a mask must match its picture's size",
        f"{black}: the mask is black everywhere, so nothing of its picture would train"]


@pytest.mark.parametrize("crop", ["center", "random"])
def test_the_mask_follows_the_pictures_crop_and_bucket(tmp_path, crop) -> None:
    """A picture with a white band, and the same band as its mask: the weights are the picture's
    brightness at latent size, wherever the crop falls."""
    import random

    size = (160, 64)  # 5:2, cropped to the widest bucket (2:1) of a 64 px square
    picture = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(picture).rectangle((60, 0, 100, 63), fill=(255, 255, 255))  # inside every crop, not all of it
    picture.convert("L").save(tmp_path / "m.png")
    data = DataConfig(resolution=64, crop=crop, bucket_step=8)
    bucket = bucket_for(*size, data)
    pixels, framing = prepare_framed(picture, bucket, crop, random.Random(3) if crop == "random" else None)
    weights = prepare_mask(open_mask(tmp_path / "m.png"), framing, (bucket[1] // 8, bucket[0] // 8))
    expected = torch.nn.functional.interpolate(((pixels[:1] + 1) / 2)[None], size=weights.shape[-2:], mode="area")[0]
    assert weights.shape == (1, bucket[1] // 8, bucket[0] // 8)
    assert torch.allclose(weights, expected, atol=1e-2)
    assert 0 < float(weights.mean()) < 1


@pytest.mark.parametrize("crop", ["center", "random"])
def test_pixels_under_a_black_mask_change_nothing_bit_for_bit(tmp_path, tiny_model_dir, crop) -> None:
    settings = {"data": {"random_flip": True, "crop": crop}, "train": {"max_steps": 6}}
    runs = {}
    for name, scribble, masked in (("masked", None, True), ("scribbled", 1, True), ("unmasked", 1, False)):
        folder = masked_folder(tmp_path / f"data-{name}", scribble)
        if not masked:
            for mask in folder.glob("*_mask.png"):
                mask.unlink()
        runs[name] = tiny_config(tmp_path / name, tiny_model_dir, folder, **settings)
        assert_ok(run_trainer(runs[name]))
    masked, scribbled = lora_of(runs["masked"]), lora_of(runs["scribbled"])
    assert all(torch.equal(masked[k], scribbled[k]) for k in masked)
    # without the masks the new pixels do train: the test could fail
    assert max_diff(lora_of(runs["scribbled"]), lora_of(runs["unmasked"])) > 1e-6
    start = next(e for e in read_events(tmp_path / "masked") if e["type"] == "start")
    assert start["masked_images"] == 2


def test_a_manifest_carries_masks(tmp_path, tiny_model_dir) -> None:
    from trainer.data import read_manifest, write_manifest

    folder = masked_folder(tmp_path / "data", None)
    items, _ = scan_folder(folder)
    write_manifest(items, tmp_path / "m.json")
    assert read_manifest(tmp_path / "m.json") == items
    shutil.rmtree(folder)
