"""The tiny FLUX.1 and Z-Image load the same through every route their families offer: ComfyUI's separate files
(Black Forest Labs' FLUX layout, converted by the trainer), ComfyUI's all-in-one checkpoints and (FLUX) a
diffusers folder all predict the same velocity for the same inputs, dev with a guidance input and schnell
without."""

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


def all_in_one(parts: dict[str, tuple[Path, str]], dest: Path) -> Path:
    """One checkpoint in ComfyUI's all-in-one layout: each part's tensors under its prefix."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for path, prefix in parts.values():
        tensors |= {prefix + key: value for key, value in load_file(str(path)).items()}
    save_file(tensors, str(dest))
    return dest


def test_an_all_in_one_checkpoint_predicts_as_the_separate_files(tmp_path: Path, tiny_flux: dict,
                                                                  tiny_zimage: dict) -> None:
    """ComfyUI's all-in-one FLUX.1 and Z-Image checkpoints (model.diffusion_model., text_encoders.<name>.transformer.,
    vae.): the same model as the files kept apart."""
    flux_files, z_files = tiny_flux["files"], tiny_zimage["files"]
    flux = all_in_one({"transformer": (flux_files["transformer"], "model.diffusion_model."),
                       "clip_l": (flux_files["clip_l"], "text_encoders.clip_l.transformer."),
                       "t5": (flux_files["t5"], "text_encoders.t5xxl.transformer."),
                       "vae": (flux_files["vae"], "vae.")}, tmp_path / "flux-aio.safetensors")
    zimage = all_in_one({"transformer": (z_files["transformer"], "model.diffusion_model."),
                         "qwen3": (z_files["qwen3"], "text_encoders.qwen3_4b.transformer."),
                         "vae": (z_files["vae"], "vae.")}, tmp_path / "zimage-aio.safetensors")
    tokenizer_dir = tiny_flux["model"]["tokenizer_dir"]
    for path, tiny in ((flux, tiny_flux), (zimage, tiny_zimage)):
        alone = ModelConfig(path=str(path), tokenizer_dir=tokenizer_dir)
        family = family_for(alone)
        components = family.load(alone, torch.float32)
        assert components.source_hash_inputs == [str(path)] and "vae." in components.source_hash_prefixes
        g = torch.Generator().manual_seed(0)
        noisy = torch.randn(1, 16, 8, 12, generator=g)
        with torch.no_grad():
            text = family.encode_prompt(components.text_encoders, family.tokenize(components, ["a red circle"]))
            ours = family.predict(components.denoiser, noisy, torch.tensor([0.4]), text, torch.zeros(1, 6))
            latents = components.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        separate = ModelConfig(**tiny["model"])
        reference_family = family_for(separate)
        reference = reference_family.load(separate, torch.float32)
        with torch.no_grad():
            text = reference_family.encode_prompt(reference.text_encoders,
                                                  reference_family.tokenize(reference, ["a red circle"]))
            expected = reference_family.predict(reference.denoiser, noisy, torch.tensor([0.4]), text,
                                                torch.zeros(1, 6))
            expected_latents = reference.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
        # the same weights (memory layouts may differ, so the last bit may too)
        assert (ours - expected).abs().max().item() < 1e-6, family.label
        assert (latents - expected_latents).abs().max().item() < 1e-6, family.label
