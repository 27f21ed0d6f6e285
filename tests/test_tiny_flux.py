"""The tiny FLUX.1 loads the same through every route the FLUX family offers: ComfyUI's separate files
(Black Forest Labs' transformer layout, converted by the trainer) and a diffusers folder; both predict the
same velocity for the same inputs, dev with a guidance input and schnell without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import save_tiny_flux_folder

from trainer.config import ModelConfig
from trainer.families import family_for


def prediction(model: ModelConfig) -> tuple[str, torch.Tensor]:
    family = family_for(model)
    c = family.load(model, torch.float32)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 8, 12, generator=g)  # not square: rows and columns must not swap
    with torch.no_grad():
        text = family.encode_prompt(c.text_encoders, family.tokenize(c, ["lfstyle, a red circle"]))
        return family.variant, family.predict(c.denoiser, noisy, torch.tensor([0.4]), text, torch.zeros(1, 6))


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_comfyui_files_and_diffusers_folder_predict_alike(tmp_path: Path, tokenizer_dir: Path, comfy_dir: Path,
                                                          tiny_flux: dict, tiny_flux_schnell: dict,
                                                          variant: str) -> None:
    tiny = tiny_flux if variant == "dev" else tiny_flux_schnell
    folder = save_tiny_flux_folder(tmp_path / "flux", tokenizer_dir,
                                   comfy_dir / "comfy" / "text_encoders" / "t5_tokenizer", guidance=variant == "dev")
    from_files = prediction(ModelConfig(**tiny["model"]))
    from_folder = prediction(ModelConfig(path=str(folder)))
    assert from_files[0] == from_folder[0] == variant
    assert from_files[1].shape == (1, 16, 8, 12)
    assert (from_files[1] - from_folder[1]).abs().max().item() < 1e-5
