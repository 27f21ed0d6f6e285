"""The nodes open with settings that fit the GPUs SD 1.5 users have (8-12 GB), as the real server serves them."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy_server


def defaults(info: dict, node: str) -> dict:
    inputs = info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}
    return {name: (entry[1] or {}).get("default") for name, entry in spec.items() if len(entry) > 1}


def test_train_and_dataset_defaults_fit_a_consumer_gpu(comfy_server) -> None:
    info = comfy_server.object_info()
    train, dataset = defaults(info, "LoraFoundryTrain"), defaults(info, "LoraFoundryDataset")
    assert dataset["resolution"] == 512  # SD 1.5's own size; 768 was ~2.25x the activations
    assert train["batch_size"] == 1
    assert train["gradient_checkpointing"] is True
    assert train["mixed_precision"] == "auto"  # bf16 or fp16 on CUDA, fp32 where 16 bits cannot train
    assert train["device"] == "auto"
    assert "mps" in str(info["LoraFoundryTrain"]["input"]["required"]["device"])  # Apple silicon can be chosen
