"""The tiny FLUX.1 model (tests/tiny_model.py) is a real FLUX base model: diffusers' FluxPipeline loads the
folder offline and samples from it, dev with a guidance input and schnell without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import save_tiny_flux_model


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_pipeline_samples_from_the_tiny_model(tmp_path: Path, tokenizer_dir: Path, comfy_dir: Path,
                                                   guidance: bool) -> None:
    from diffusers import FluxPipeline

    folder = save_tiny_flux_model(tmp_path / "flux", tokenizer_dir, comfy_dir / "comfy" / "text_encoders" /
                                  "t5_tokenizer", guidance=guidance)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is guidance
    images = pipe("lfstyle, a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                  guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
