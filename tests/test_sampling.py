"""Validation samples on the tiny model: PNGs with their prompt, and the negative prompt really used."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.config import parse_config
from trainer.families import get_family
from trainer.sampling import render_samples


def sample_config(tmp_path, model_dir, tokenizer_dir, negative: str) -> object:
    return parse_config({
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "tokenizer_dir": str(tokenizer_dir)},
        "data": {"folder": str(tmp_path), "resolution": 64},
        "sample": {"prompts": ["a red circle", "a blue square"], "negative_prompt": negative, "steps": 3,
                   "guidance_scale": 7.5, "seed": 11},
        "output": {"lora_path": str(tmp_path / "out.safetensors")},
    })


def render(tmp_path, model_dir, tokenizer_dir, negative: str, step: int) -> list:
    import torch

    family = get_family("sd15")
    cfg = sample_config(tmp_path, model_dir, tokenizer_dir, negative)
    components = family.load(cfg.model, torch.float32)
    return render_samples(cfg, family, components, components.denoiser, torch.device("cpu"), step)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_samples_are_pngs_with_their_prompt(tmp_path, tiny_model_dir, tokenizer_dir) -> None:
    paths = render(tmp_path, tiny_model_dir, tokenizer_dir, "", step=5)
    assert [p.name for p in paths] == ["step-00000005-00.png", "step-00000005-01.png"]
    image = Image.open(paths[1])
    assert image.size == (64, 64)
    assert image.text["prompt"] == "a blue square" and image.text["seed"] == "12"


def test_negative_prompt_changes_the_picture(tmp_path, tiny_model_dir, tokenizer_dir) -> None:
    plain = render(tmp_path / "a", tiny_model_dir, tokenizer_dir, "", step=1)
    again = render(tmp_path / "b", tiny_model_dir, tokenizer_dir, "", step=1)
    negative = render(tmp_path / "c", tiny_model_dir, tokenizer_dir, "blurry, green", step=1)
    assert np.array_equal(pixels(plain[0]), pixels(again[0])), "same seed, same picture"
    assert np.abs(pixels(plain[0]) - pixels(negative[0])).max() > 0, "the negative prompt was ignored"
    assert Image.open(negative[0]).text["negative_prompt"] == "blurry, green"
