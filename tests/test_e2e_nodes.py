"""Dataset, Load LoRA and Compare nodes on the real ComfyUI server: what a user sees when things go wrong."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from scripts.comfy_server import ComfyError

pytestmark = [pytest.mark.comfy_server]


def dataset_prompt(folder: str, **inputs: object) -> dict:
    values = {"source": "folder", "folder": folder, "hub_dataset": "", "captions": "", "resolution": 64,
              "crop": "center", "random_flip": True, "bucketing": True, "top_rows": 0, "repeats": 1} | inputs
    return {
        "1": {"class_type": "LoraFoundryDataset", "inputs": values},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }


def make_folder(server, name: str) -> Path:
    folder = server.input_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def manifests(server) -> list[Path]:
    return sorted((server.output_dir / "lora-foundry" / "datasets" / "manifests").glob("*.json"),
                  key=lambda p: p.stat().st_mtime)


def test_unreadable_files_are_reported_together_by_name(comfy_server) -> None:
    folder = make_folder(comfy_server, "e2e-broken")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:200])
    with pytest.raises(ComfyError) as info:
        comfy_server.run(dataset_prompt("e2e-broken"), timeout=120)
    message = str(info.value)
    for name in ("empty.png", "notes.png", "cut.jpg"):
        assert name in message
    assert "good.png" not in message


def test_folder_change_makes_the_dataset_node_run_again(comfy_server) -> None:
    folder = make_folder(comfy_server, "e2e-changing")
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    comfy_server.run(dataset_prompt("e2e-changing"), timeout=120)
    first = json.loads(manifests(comfy_server)[-1].read_text())
    assert len(first["items"]) == 2
    time.sleep(0.05)
    Image.new("RGB", (32, 32), (250, 250, 0)).save(folder / "2.png")
    (folder / "2.txt").write_text("picture 2")
    comfy_server.run(dataset_prompt("e2e-changing"), timeout=120)
    second = json.loads(manifests(comfy_server)[-1].read_text())
    assert sorted(item["caption"] for item in second["items"]) == ["picture 0", "picture 1", "picture 2"]


def test_dataset_folder_outside_input_is_refused(comfy_server) -> None:
    with pytest.raises(ComfyError) as info:
        comfy_server.run(dataset_prompt("../models"), timeout=60)
    assert "../models" in str(info.value)


def test_images_from_the_graph_become_a_dataset(comfy_server) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0xFF0000}},
        "2": {"class_type": "LoraFoundryDataset", "inputs": {
            "source": "images", "folder": comfy_server.dataset_dir.name, "hub_dataset": "", "captions": "a red square",
            "resolution": 64, "crop": "center", "random_flip": False, "bucketing": True, "top_rows": 0, "repeats": 1,
            "images": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    comfy_server.run(prompt, timeout=120)
    manifest = json.loads(manifests(comfy_server)[-1].read_text())
    assert [item["caption"] for item in manifest["items"]] == ["a red square"] * 3
    assert all(Image.open(item["image"]).getpixel((5, 5)) == (255, 0, 0) for item in manifest["items"])


def test_masks_from_the_graph_must_match_their_pictures(comfy_server) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xFF0000}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
        "3": {"class_type": "LoraFoundryDataset", "inputs": {
            "source": "images", "folder": comfy_server.dataset_dir.name, "hub_dataset": "", "captions": "a red square",
            "resolution": 64, "crop": "center", "random_flip": False, "bucketing": True, "top_rows": 0, "repeats": 1,
            "images": ["1", 0], "masks": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    with pytest.raises(ComfyError) as info:
        comfy_server.run(prompt, timeout=120)
    assert "1 masks for 2 images" in str(info.value.details)


def test_hub_dataset_missing_from_cache_names_the_cache(comfy_server) -> None:
    with pytest.raises(ComfyError) as info:
        comfy_server.run(dataset_prompt(comfy_server.dataset_dir.name, source="hub_cache",
                                        hub_dataset="nobody/not-cached"), timeout=120)
    assert "not in the local Hugging Face cache" in str(info.value) and "hub" in str(info.value)


@pytest.mark.slow
def test_load_lora_refuses_a_lora_that_patches_nothing(comfy_server) -> None:
    # the seed chapter's file layout: diffusers keys, which ComfyUI's loader silently ignores
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight": torch.zeros(4, 320),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.up.weight": torch.zeros(320, 4)}
    save_file(tensors, comfy_server.loras_dir / "e2e-diffusers-keys.safetensors")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        "2": {"class_type": "LoraFoundryLoadLora", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": "e2e-diffusers-keys.safetensors",
            "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "x"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    with pytest.raises(ComfyError) as info:
        comfy_server.run(prompt, timeout=600)
    assert "patches none of the model's layers" in str(info.value)


def test_compare_grid_labels_its_inputs(comfy_server) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFFFFFF}},
        "3": {"class_type": "LoraFoundryCompareGrid", "inputs": {
            "image_a": ["1", 0], "image_b": ["2", 0], "labels": "strength 0.0\nstrength 1.0", "title": "step 10",
            "cell": 128}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "e2e-grid"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    (saved,) = entry["outputs"]["4"]["images"]
    grid = Image.open(comfy_server.output_dir / saved["subfolder"] / saved["filename"]).convert("RGB")
    assert grid.width == 256 and grid.height > 128
    # the black picture on the left, the white one on the right, labels drawn below them
    assert grid.getpixel((64, grid.height // 2)) != grid.getpixel((192, grid.height // 2))
