"""native: ComfyUI's own TrainLoraNode (the pinned ComfyUI), fed the same checkpoint and pictures.

The graph: CheckpointLoaderSimple, LoadImageTextDataSetFromFolder (a list of images and their captions, which
also avoids 0.3.75's UnboundLocalError 'multi_res' on a single latent batch), VAEEncode and CLIPTextEncode per
item, TrainLoraNode (batch 1, rank 4, AdamW, MSE, fp32 training and LoRA weights, no gradient checkpointing),
SaveLoRA. TrainLoraNode cannot be limited to the attention layers: it puts a LoRA on every weight of the UNet
and trains every bias. A step's time is the gap between two of its progress updates on the websocket; time to
first step is from posting the prompt (server already up) to the node starting.
"""

from __future__ import annotations

import time
from typing import Any

from bench.comfy import CHECKPOINT_NAME, listen, node_started, progress_times, start_server
from bench.common import Spec, intervals, steady

DATASET = "bench-native"
TRAIN_NODE = "5"


def native_prompt(spec: Spec) -> dict[str, Any]:
    train = {
        "model": ["1", 0], "latents": ["3", 0], "positive": ["4", 0], "batch_size": 1,
        "grad_accumulation_steps": 1, "steps": spec.steps, "learning_rate": 1e-4, "rank": spec.rank,
        "optimizer": "AdamW", "loss_function": "MSE", "seed": spec.seed, "training_dtype": "fp32",
        "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]",
    }
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": DATASET}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["2", 1], "clip": ["1", 1]}},
        TRAIN_NODE: {"class_type": "TrainLoraNode", "inputs": train},
        "6": {"class_type": "SaveLoRA", "inputs": {"lora": [TRAIN_NODE, 1], "prefix": "loras/bench-native",
                                                   "steps": [TRAIN_NODE, 3]}},
    }


def run(spec: Spec, started: float) -> dict[str, Any]:
    server = start_server(spec, DATASET)
    try:
        recorder = listen(server)
        try:
            posted = time.time()
            prompt_id = server.post_prompt(native_prompt(spec), client_id=recorder.client_id)
            server.wait(prompt_id, timeout=3600)
            time.sleep(0.5)  # let the last websocket messages land
        finally:
            recorder.stop()
        train_began = node_started(recorder, prompt_id, TRAIN_NODE)
        step_times = intervals(progress_times(recorder, prompt_id, TRAIN_NODE), train_began)
    finally:
        server.stop()
    if len(step_times) != spec.steps:
        raise RuntimeError(f"saw {len(step_times)} progress updates of TrainLoraNode, expected {spec.steps}")
    return {**steady(step_times, spec.warmup), "step_times": step_times, "ttfs_s": train_began - posted,
            "server_start_s": posted - started}
