"""The node pack on a real ComfyUI server (CPU): the example workflow trains, validates and cancels cleanly.

Uses the session's server (tests/comfy_server.py) with the SD1.5-shaped random-weight checkpoint at 64 px.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.comfy_server import (
    SOLID_DATASET,
    ComfyError,
    api_workflow,
    lora_effect,
    random_base_settings,
    tiny_train_and_validate,
)
from scripts.make_sample_dataset import SOLID_REDS, make_solid_dataset

pytestmark = [pytest.mark.slow, pytest.mark.comfy_server]
# mean absolute difference (of 255) between the demo's strength 0 and 1 pictures that a user cannot miss
DEMO_VISIBLE_DIFFERENCE = 10.0
# strength 1's sample at least this many times closer to the training latents than strength 0's (measured: 2.1)
DEMO_CLOSER = 1.5


def small_prompt(server, output_name: str, max_steps: int = 3) -> dict:
    """The API twin of train_and_validate, shrunk to 64 px and a few steps on the random checkpoint."""
    overrides = tiny_train_and_validate(server.checkpoint_name, output_name, max_steps) + [
        "4.save_every_steps=2", "4.validation_prompts=lfstyle, a red circle", "4.learning_rate=0.001",
        "4.overwrite=false", "14.steps=4", "15.steps=4", "18.cell=128",
    ]
    return api_workflow("train_and_validate", overrides)


def train_ui(entry: dict) -> dict:
    (ui,) = [out for out in entry["outputs"].values() if "lora_path" in out]
    return ui


def run_dirs(server) -> list[Path]:
    return sorted((server.output_dir / "lora-foundry" / "runs").glob("*"))


def demo_prompt(server, output_name: str) -> dict:
    """The example workflow as the demo runs it on a random-weight base: the settings that show the LoRA's
    effect there (scripts/comfy_server.py RANDOM_BASE_SETTINGS), on the CPU."""
    make_solid_dataset(server.input_dir / SOLID_DATASET)
    overrides = tiny_train_and_validate(server.checkpoint_name, output_name) + random_base_settings(on_gpu=False)
    return api_workflow("train_and_validate", overrides + ["4.overwrite=false"])


@pytest.mark.first_comfyui_only  # 80 steps; ComfyUI's side (LoRA at strength 0/1, sampling) is checked below
def test_the_demo_trains_and_its_compare_grid_shows_the_loras_effect(comfy_server) -> None:
    prompt = demo_prompt(comfy_server, "e2e-shapes")
    entry = comfy_server.run(prompt, timeout=1200)

    lora = Path(train_ui(entry)["lora_path"][0])
    assert lora.parent == comfy_server.loras_dir and lora.name == "e2e-shapes.safetensors" and lora.is_file()

    grid_node = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    (saved,) = entry["outputs"][grid_node]["images"]
    grid = np.asarray(Image.open(comfy_server.output_dir / saved["subfolder"] / saved["filename"]), np.float32)
    cell = int(prompt["18"]["inputs"]["cell"])
    strength0, strength1 = grid[:, :cell], grid[:, cell : 2 * cell]
    difference = float(np.abs(strength0 - strength1).mean())
    print(f"compare grid: strength 0 vs 1 differ by {difference:.1f} of 255 on average")
    assert difference > DEMO_VISIBLE_DIFFERENCE, f"strength 0 and 1 differ by only {difference:.2f} of 255"
    off, on = lora_effect(comfy_server, prompt, SOLID_REDS)
    print(f"the sampled latent's distance to the training latents: {off:.1f} at strength 0, {on:.1f} at 1")
    assert on * DEMO_CLOSER < off, f"strength 1 is not pulled toward the training pictures ({off:.1f} vs {on:.1f})"

    (run_dir,) = [d for d in run_dirs(comfy_server) if d.name.startswith("e2e-shapes-")]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "done" and events[-1]["steps"] == 80
    assert any(e["type"] == "sample" for e in events)

    # queued again unchanged: nothing retrains
    comfy_server.run(prompt, timeout=300)
    again = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert len(again) == len(events)


def test_stock_lora_loader_patches_every_weight(comfy_server) -> None:
    lora = comfy_server.loras_dir / "e2e-shapes.safetensors"  # the demo's, where it ran on this server
    if not lora.is_file():  # the second ComfyUI runs no demo: a short run of its own
        entry = comfy_server.run(small_prompt(comfy_server, "e2e-stock", max_steps=2), timeout=900)
        lora = Path(train_ui(entry)["lora_path"][0])
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora.name,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "lfstyle, a red circle"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
    log_before = comfy_server.log_path.read_text(errors="replace")
    comfy_server.run(prompt, timeout=600)
    new_log = comfy_server.log_path.read_text(errors="replace")[len(log_before):]
    assert "lora key not loaded" not in new_log and "NOT LOADED" not in new_log, new_log[-2000:]


def test_interrupt_stops_the_trainer_and_keeps_the_checkpoint(comfy_server) -> None:
    prompt = small_prompt(comfy_server, "e2e-cancel", max_steps=100000)
    prompt_id = comfy_server.post_prompt(prompt)
    deadline = time.time() + 600
    checkpoints: list[Path] = []
    while time.time() < deadline and not checkpoints:
        checkpoints = [p for d in run_dirs(comfy_server) if d.name.startswith("e2e-cancel-")
                       for p in (d / "checkpoints").glob("step-*")]
        time.sleep(0.2)
    assert checkpoints, f"no checkpoint appeared:\n{comfy_server.log_tail()}"
    assert comfy_server.child_processes(), "the trainer should be running"

    asked = time.monotonic()
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=60, check=False)
    left = comfy_server.wait_no_children(timeout=30)
    assert not left, f"trainer processes left {time.monotonic() - asked:.1f} s after the interrupt: {left}"
    # the trainer finishes its step and saves a checkpoint before it exits: seconds, well inside the grace
    assert time.monotonic() - asked < 30
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert all(p.exists() for p in checkpoints[:1]) or any(
        (d / "checkpoints").glob("step-*") for d in run_dirs(comfy_server) if d.name.startswith("e2e-cancel-"))
    assert not (comfy_server.loras_dir / "e2e-cancel.safetensors").exists()

    # the next prompt runs
    dataset_only = {"2": prompt["2"], "99": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}}}
    entry = comfy_server.run(dataset_only, timeout=300)
    assert entry["status"]["status_str"] == "success"


def test_two_train_prompts_back_to_back_both_finish(comfy_server) -> None:
    first = comfy_server.post_prompt(small_prompt(comfy_server, "e2e-first", max_steps=2))
    second = comfy_server.post_prompt(small_prompt(comfy_server, "e2e-second", max_steps=2))
    entries = [comfy_server.wait(first, timeout=900), comfy_server.wait(second, timeout=900)]
    loras = [Path(train_ui(entry)["lora_path"][0]) for entry in entries]
    assert [p.name for p in loras] == ["e2e-first.safetensors", "e2e-second.safetensors"]
    assert all(p.is_file() for p in loras)
    folders = {train_ui(entry)["run_dir"][0] for entry in entries}
    assert len(folders) == 2


def test_masked_example_trains_on_masks_drawn_by_comfyui_nodes(comfy_server) -> None:
    """masked_train: ComfyUI's mask nodes mark each sample picture's shape; the trainer gets one mask per
    picture, white on the shape and black on the background."""
    ckpt = comfy_server.checkpoint_name
    prompt = api_workflow("masked_train", [
        f"8.folder={comfy_server.dataset_dir.name}", f"3.base_model={ckpt}", "3.output_name=e2e-masked",
        "1.resolution=64", "3.max_steps=2", "3.batch_size=2", "3.device=cpu", "3.mixed_precision=no",
        "3.sample_every_steps=0", "3.validation_prompts=", "3.overwrite=true",
        "1.trigger_word=zxq", "1.caption_dropout=0.25", "1.shuffle_tags=true", "1.keep_tags=1",
    ])
    entry = comfy_server.run(prompt, timeout=900)
    assert Path(train_ui(entry)["lora_path"][0]).is_file()
    (run_dir,) = [d for d in run_dirs(comfy_server) if d.name.startswith("e2e-masked-")]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    assert start["images"] == start["masked_images"] == 8
    config = json.loads((run_dir / "config.json").read_text())
    assert {k: config["data"][k] for k in ("trigger_word", "caption_dropout", "shuffle_tags", "keep_tags")} == {
        "trigger_word": "zxq", "caption_dropout": 0.25, "shuffle_tags": True, "keep_tags": 1}
    items = json.loads(Path(config["data"]["manifest"]).read_text())["items"]
    for item in items:
        mask = np.asarray(Image.open(item["mask"]))
        assert mask[2, 2] == 0 and mask[64, 64] == 255  # the background corner is ignored, the shape trains


@pytest.mark.parametrize("node, name, value, words", [
    ("4", "learning_rate", float("nan"), "train.learning_rate: must be a finite number, got nan"),
    ("3", "alpha", float("nan"), "lora.alpha: must be a finite number, got nan"),
    ("4", "num_processes", 64, "64 training processes asked for, but this machine has"),
    ("4", "output_name", "CON", "a device name Windows reserves"),
    ("4", "output_name", "style ", "ends with a space"),
])
def test_the_train_node_refuses_what_would_fail_later_before_writing_anything(
        comfy_server, node: str, name: str, value: object, words: str) -> None:
    # ComfyUI's min/max checks let NaN through (every comparison with it is false); JSON carries it
    output_name = value if name == "output_name" else f"e2e-refused-{name}"
    prompt = small_prompt(comfy_server, str(output_name))
    prompt[node]["inputs"][name] = value
    folders_before, loras_before = run_dirs(comfy_server), sorted(comfy_server.loras_dir.iterdir())
    with pytest.raises(ComfyError) as info:
        comfy_server.run(prompt, timeout=120)
    assert words in str(info.value.details), info.value.details
    assert run_dirs(comfy_server) == folders_before, "a run folder was written for a refused run"
    assert sorted(comfy_server.loras_dir.iterdir()) == loras_before
