"""The nodes open with settings that fit the GPUs SD 1.5 users have (8-12 GB), as the real server serves them."""

from __future__ import annotations

import pytest
from conftest import comfyui_version

from trainer.families import get_family

pytestmark = pytest.mark.comfy_server


def defaults(info: dict, node: str) -> dict:
    inputs = info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}
    return {name: (entry[1] or {}).get("default") for name, entry in spec.items() if len(entry) > 1}


def test_train_and_dataset_defaults_fit_a_consumer_gpu(comfy_server) -> None:
    info = comfy_server.object_info()
    train, dataset = defaults(info, "LoraFoundryTrain"), defaults(info, "LoraFoundryDataset")
    # 0: the base model's own size, which the Train node reads from the checkpoint (SD 1.5: 512; 768 was
    # ~2.25x the activations; SDXL: 1024)
    assert dataset["resolution"] == 0
    assert {name: get_family(name).default_resolution for name in ("sd15", "sdxl")} == {"sd15": 512, "sdxl": 1024}
    assert train["batch_size"] == 1
    assert train["gradient_checkpointing"] is True
    assert train["mixed_precision"] == "auto"  # bf16 or fp16 on CUDA, fp32 where 16 bits cannot train
    assert train["device"] == "auto"
    assert "mps" in str(info["LoraFoundryTrain"]["input"]["required"]["device"])  # Apple silicon can be chosen


RARELY_USED_TRAIN_INPUTS = {"gpu_ids", "num_processes", "accelerate_config", "noise_offset", "min_snr_gamma",
                            "lr_warmup_steps", "sample_steps", "device", "seed"}


def advanced_inputs(info: dict, node: str) -> set[str]:
    inputs = info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}
    return {name for name, entry in spec.items() if len(entry) > 1 and (entry[1] or {}).get("advanced")}


def test_the_train_node_opens_short_where_comfyui_has_advanced_inputs(comfy_server) -> None:
    """ComfyUI 0.33 folds inputs marked advanced away until asked; 0.3.75 has no such mark (passing it to its
    classes is a TypeError), so there the node is served without it, every input still there."""
    info = comfy_server.object_info()
    train_inputs = set(info["LoraFoundryTrain"]["input"]["required"])
    assert RARELY_USED_TRAIN_INPUTS <= train_inputs
    if comfyui_version() < (0, 33, 0):
        assert not any(advanced_inputs(info, node) for node in info if node.startswith("LoraFoundry"))
        return
    # base_quantization: advanced and optional (old workflows and API prompts lack it)
    assert advanced_inputs(info, "LoraFoundryTrain") == RARELY_USED_TRAIN_INPUTS | {"base_quantization"}
    assert advanced_inputs(info, "LoraFoundryLoraConfig") == {"init", "dropout", "lokr_factor", "lokr_decompose_both"}
    # the caption tricks: optional (old workflows lack them) and advanced
    assert advanced_inputs(info, "LoraFoundryDataset") == {"top_rows", "caption_dropout", "shuffle_tags", "keep_tags"}
    assert info["LoraFoundryTrain"]["search_aliases"] == ["train lora", "lora trainer", "dreambooth"]
