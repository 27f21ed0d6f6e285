"""Hostile widget values through POST /prompt on a real server: each is refused, and nothing outside the
allowed folders is read or written (a sentinel folder beside the server's base directory stays untouched)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import comfyui_version
from PIL import Image

from scripts.comfy_server import ComfyError

pytestmark = [pytest.mark.comfy_server]
SECRET = "sentinel-secret-do-not-read"


@pytest.fixture(scope="module")
def sentinel(comfy_server, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentinel")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "secret.png")
    (folder / "secret.txt").write_text(SECRET)
    (folder / "accelerate.yaml").write_text("compute_environment: LOCAL_MACHINE\n")
    # a folder inside input/ that is a symlink to the sentinel, and a legit folder with one symlinked caption
    (comfy_server.input_dir / "escape").symlink_to(folder, target_is_directory=True)
    sneaky = comfy_server.input_dir / "sneaky"
    sneaky.mkdir()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(sneaky / "a.png")
    (sneaky / "a.txt").symlink_to(folder / "secret.txt")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def dataset(folder: str = "lora-foundry-sample", **inputs: object) -> dict:
    return {"class_type": "LoraFoundryDataset", "inputs": {
        "source": "folder", "folder": folder, "hub_dataset": "", "captions": "", "resolution": 64, "crop": "center",
        "random_flip": False, "bucketing": True, "top_rows": 0, "repeats": 1} | inputs}


def train_prompt(server, **train: object) -> dict:
    values = {"base_model": server.checkpoint_name, "output_name": "hostile", "overwrite": False,
              "learning_rate": 1e-4, "batch_size": 1, "gradient_accumulation_steps": 1, "epochs": 0, "max_steps": 1,
              "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw", "max_grad_norm": 1.0,
              "mixed_precision": "no", "gradient_checkpointing": False, "min_snr_gamma": 0.0, "noise_offset": 0.0,
              "seed": 0, "save_every_steps": 0, "validation_prompts": "", "negative_prompt": "",
              "sample_every_steps": 0, "sample_steps": 2, "device": "cpu", "num_processes": 1, "gpu_ids": "",
              "accelerate_config": "none"} | train
    return {
        "1": dataset(),
        "2": {"class_type": "LoraFoundryLoraConfig", "inputs": {"rank": 4, "alpha": 4.0, "init": "gaussian",
                                                                "targets": "attention", "dropout": 0.0,
                                                                "train_text_encoder": False}},
        "3": {"class_type": "LoraFoundryTrain", "inputs": {**values, "dataset": ["1", 0], "lora_config": ["2", 0]}},
    }


def preview(node: dict) -> dict:
    return {"1": node, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}


HOSTILE_TRAIN = [
    {"output_name": "../../escaped"}, {"output_name": "a/b"}, {"output_name": ""}, {"output_name": ".."},
    {"output_name": "/tmp/abs"}, {"output_name": "x\\y"},
    {"base_model": "../../../../etc/passwd"}, {"base_model": "/etc/passwd"},
    {"gpu_ids": "0; touch /tmp/pwned"}, {"gpu_ids": "$(touch /tmp/pwned)"},
    {"accelerate_config": "../../../../etc/passwd"},
]
HOSTILE_DATASET = [
    dataset("../models"), dataset("/etc"), dataset("lora-foundry-sample/../../models"), dataset("escape"),
    dataset("sneaky"), dataset(source="hub_cache", hub_dataset="../../etc"),
    dataset(source="hub_cache", hub_dataset="a/b/c"),
]


def refused_on_purpose(refusal: str) -> bool:
    """A refusal by the pack's own checks, or, where ComfyUI validates them, by its check of combo values.

    ComfyUI 0.3.75 passes a V3 node's combo values to the node unchecked (the pack's path checks refuse
    them); 0.33.0 refuses a value that is not among the options before the node runs ("Value not in list")."""
    if "PathError" in refusal or "ValueError" in refusal:
        return True
    return comfyui_version() >= (0, 33, 0) and "Value not in list" in refusal


def test_hostile_values_are_refused_and_touch_nothing_outside(comfy_server, sentinel) -> None:
    before = snapshot(sentinel)
    base_parent = comfy_server.base_dir.parent
    outside_before = {p for p in base_parent.iterdir()}
    loras_before = snapshot(comfy_server.loras_dir)
    refusals = []
    prompts = [train_prompt(comfy_server, **values) for values in HOSTILE_TRAIN]
    prompts += [preview(node) for node in HOSTILE_DATASET]
    prompts.append({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        "2": {"class_type": "LoraFoundryLoadLora", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "lora_name": "../../../../etc/passwd",
                                                              "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "x"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    })
    for prompt in prompts:
        with pytest.raises(ComfyError) as info:
            comfy_server.run(prompt, timeout=300)
        refusals.append(str(info.value))
        assert not comfy_server.child_processes(), f"a process was started for {prompt}"
    # refused by the pack's own checks, each with a message, not by some crash further in
    crashes = [r for r in refusals if not refused_on_purpose(r)]
    assert not crashes, crashes
    assert snapshot(sentinel) == before, "the sentinel folder changed"
    assert {p for p in base_parent.iterdir()} == outside_before, "something was written beside the base directory"
    assert snapshot(comfy_server.loras_dir) == loras_before
    assert not Path("/tmp/pwned").exists()
    # nothing read from the sentinel ended up in the server's outputs
    for path in comfy_server.output_dir.rglob("*.json"):
        assert SECRET not in path.read_text(errors="replace"), path
    assert os.stat(sentinel / "secret.txt").st_size == len(SECRET)


def test_existing_lora_of_another_origin_is_not_overwritten(comfy_server) -> None:
    target = comfy_server.loras_dir / "someone-elses.safetensors"
    target.write_bytes(b"not ours")
    with pytest.raises(ComfyError) as info:
        comfy_server.run(train_prompt(comfy_server, output_name="someone-elses"), timeout=300)
    assert "exists" in str(info.value) and "overwrite" in str(info.value)
    assert target.read_bytes() == b"not ours"
    time.sleep(0.1)
    assert not comfy_server.child_processes()
