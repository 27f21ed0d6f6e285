"""probe: the reference for time to first step, the checkpoint load plus one VAE and text-encoder pass.

From this process's start (so the imports needed to load count, as they do for every contender): import,
load the checkpoint with the trainer's own family loader (fp32, CPU), then encode every picture once with the
VAE and every caption once with the text encoder. No hashing, no cache, no flipped copies.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import Spec, dataset_items
from trainer.config import DataConfig, ModelConfig
from trainer.data import bucket_for, open_image, prepare_image
from trainer.families import get_family


def encode_once(spec: Spec, components: Any, family: Any) -> None:
    data = DataConfig(folder=spec.data, resolution=spec.resolution)
    with torch.no_grad():
        for path, caption in dataset_items(spec.data):
            image = open_image(path)
            pixels = prepare_image(image, bucket_for(image.width, image.height, data), "center", None)
            components.vae.encode(pixels[None]).latent_dist.mode()
            family.encode_prompt(components.text_encoders, family.tokenize(components, [caption]))


def run(spec: Spec, started: float) -> dict[str, Any]:
    imported = time.time()
    family = get_family("sd15")
    model = ModelConfig(path=spec.checkpoint, tokenizer_dir=spec.tokenizer_dir)
    components = family.load(model, torch.float32)
    loaded = time.time()
    encode_once(spec, components, family)
    encoded = time.time()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "encode_s": encoded - loaded,
        "reference_s": encoded - started,
    }
