"""The run identity: what retrains, what continues, what only re-samples (trainer/identity.py)."""

from __future__ import annotations

import copy

import pytest

from trainer.config import parse_config
from trainer.identity import run_identity

BASE = {
    "run_dir": "/home/ann/ComfyUI/output/lora-foundry/runs/style-1",
    "model": {"path": "/home/ann/ComfyUI/models/checkpoints/v1-5.safetensors", "tokenizer_dir": "/a/tok"},
    "data": {"manifest": "/home/ann/ComfyUI/output/lora-foundry/datasets/manifests/m.json", "resolution": 512},
    "train": {"max_steps": 400, "learning_rate": 1e-4, "seed": 42, "save_every_steps": 100},
    "sample": {"prompts": ["a lighthouse"], "every_steps": 100, "steps": 20},
    "output": {"lora_path": "/home/ann/ComfyUI/models/loras/style.safetensors", "name": "style"},
}
CONTENT = "c0ffee"


def identity(changes: dict | None = None, content: str = CONTENT) -> str:
    raw = copy.deepcopy(BASE)
    for section, values in (changes or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return run_identity(parse_config(raw), content)


@pytest.mark.parametrize("changes", [
    {"sample": {"prompts": ["another prompt"], "steps": 40, "every_steps": 0, "negative_prompt": "blurry"}},
    {"train": {"save_every_steps": 7}},
    {"train": {"device": "cpu"}},
    {"train": {"gradient_checkpointing": True}},
    {"train": {"max_steps": 800}},  # constant schedule: a longer run continues the shorter one
    {"train": {"epochs": 3}},
    {"run_dir": "/elsewhere/run"},
    {"data": {"manifest": "/elsewhere/m.json"}},  # the same pictures listed in another manifest
    {"model": {"path": "/other/disk/v1-5.safetensors", "tokenizer_dir": "/b/tok"}},
    {"output": {"overwrite": True, "lora_path": "/other/loras/style.safetensors"}},
])
def test_what_does_not_change_the_weights_keeps_the_run(changes: dict) -> None:
    assert identity(changes) == identity()


@pytest.mark.parametrize("changes", [
    {"train": {"learning_rate": 2e-4}},
    {"train": {"seed": 1}},
    {"train": {"batch_size": 2}},
    {"train": {"mixed_precision": "bf16"}},
    {"lora": {"rank": 8}},
    {"data": {"resolution": 768}},
    {"model": {"path": "/home/ann/ComfyUI/models/checkpoints/another.safetensors"}},
    {"output": {"name": "other-style"}},
])
def test_what_changes_the_weights_is_a_new_run(changes: dict) -> None:
    assert identity(changes) != identity()


def test_new_picture_bytes_or_captions_are_a_new_run() -> None:
    assert identity(content="another content key") != identity()


def test_with_a_decaying_schedule_the_length_is_part_of_the_run() -> None:
    cosine = {"train": {"lr_scheduler": "cosine", "max_steps": 400}}
    longer = {"train": {"lr_scheduler": "cosine", "max_steps": 800}}
    assert identity(cosine) != identity(longer)


def test_separate_model_files_are_part_of_the_run_by_name() -> None:
    """A diffusion model's text encoders and VAE: which files (by name, in any order) is the run; where they sit
    is not. The flow-matching settings and a quantized base change the weights: a new run."""
    files = {"text_encoders": ["/m/text_encoders/t5xxl.safetensors", "/m/text_encoders/clip_l.safetensors"],
             "vae": "/m/vae/ae.safetensors"}
    moved = {"text_encoders": ["/n/clip_l.safetensors", "/n/t5xxl.safetensors"], "vae": "/n/ae.safetensors"}
    assert identity({"model": files}) == identity({"model": moved}) != identity()
    assert identity({"model": {**files, "vae": "/m/vae/other.safetensors"}}) != identity({"model": files})
    for changed in ({"base_quantization": "int8"}, {"timestep_shift": 3.0}, {"guidance": 3.5},
                    {"timestep_sampling": "uniform"}):
        assert identity({"train": changed}) != identity(), changed
