"""Z-Image end to end on the tiny Z-Image (tests/tiny_model.py), kept as ComfyUI users keep Z-Image: the
transformer in ComfyUI's layout, the Qwen3 encoder and FLUX's VAE as files of their own. Real
`accelerate launch` subprocesses; diffusers' ZImagePipeline reads the LoRA files back."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_events, run_trainer
from safetensors import safe_open
from test_flux import FlowLoss, adapted_deltas, flux_config, lora_modules
from test_trainer import (
    assert_ok,
    assert_resumed_run_matches_uninterrupted,
    assert_two_processes_match_one,
    lora_of,
)

from trainer.config import LoraConfig, ModelConfig, TrainConfig
from trainer.families import UnsupportedModelError, family_for
from trainer.families.zimage import ZImageFamily, locate_files


def test_zimage_learns_and_diffusers_adapts_every_module(tmp_path, tiny_zimage, two_image_folder) -> None:
    cfg = flux_config(tmp_path / "run", tiny_zimage, two_image_folder,
                      lora={"targets": "attention_ff", "rank": 8, "alpha": 8.0},
                      train={"max_steps": 300, "learning_rate": 3e-2},
                      sample={"prompts": ["a red circle"], "steps": 2, "guidance_scale": 0.0})
    assert_ok(run_trainer(cfg))
    tensors = lora_of(cfg)
    assert tensors and all(key.startswith("diffusion_model.") for key in tensors)
    modules = lora_modules(tensors)
    # attention (4) and feed-forward (3) of the main layer and of both refiners
    assert len(modules) == 21 and "diffusion_model.context_refiner.0.feed_forward.w2" in modules
    (sample,) = [e for e in read_events(tmp_path / "run") if e["type"] == "sample"]
    assert Path(sample["path"]).is_file()

    loss = FlowLoss(tiny_zimage["model"], two_image_folder)
    before = loss()
    warnings = loss.load_lora(Path(cfg["output"]["lora_path"]))
    after = loss()
    print(f"Z-Image flow-matching loss {before:.4f} -> {after:.4f}")
    assert after <= 0.7 * before, f"flow-matching loss {before:.4f} -> {after:.4f}: less than 30% lower"
    assert not [w for w in warnings if "lora" in w.lower()], warnings
    adapted = adapted_deltas(loss.components.denoiser)
    assert {f"diffusion_model.{name}" for name in adapted} == set(modules)
    assert max(float((adapted[name.removeprefix("diffusion_model.")] - delta).abs().max())
               for name, delta in modules.items()) < 1e-6


def test_zimage_two_processes_match_one(tmp_path, tiny_zimage, two_image_folder) -> None:
    # Adam divides each gradient by its running size: where a gradient is near Adam's epsilon (the up matrices
    # start at zero, so the down matrices' first gradients are tiny), the rounding of a batch of 2 against two
    # of 1 in this 1152-wide model reached 1.5e-4 at epsilon 1e-8; a larger epsilon keeps those updates at the
    # gradients' own scale, so what is compared is the gradient sync, not rounding amplified
    assert_two_processes_match_one(tmp_path, Path(tiny_zimage["model"]["path"]), two_image_folder,
                                   model=dict(tiny_zimage["model"]), train={"adam_epsilon": 1e-6})


def test_killed_zimage_run_resumes_to_the_same_lora(tmp_path, tiny_zimage, two_image_folder) -> None:
    assert_resumed_run_matches_uninterrupted(tmp_path, Path(tiny_zimage["model"]["path"]), two_image_folder,
                                             model=dict(tiny_zimage["model"]))


def test_zimage_all_linear_lora_says_what_it_is(tmp_path, tiny_zimage, two_image_folder) -> None:
    cfg = flux_config(tmp_path / "run", tiny_zimage, two_image_folder, lora={"targets": "all"},
                      train={"max_steps": 2, "timestep_sampling": "uniform", "timestep_shift": 2.0})
    assert_ok(run_trainer(cfg))
    path = Path(cfg["output"]["lora_path"])
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == ("zimage", "z-image/lora")
    assert metadata["modelspec.prediction_type"] == "flow"
    tensors = lora_of(cfg)
    for module in ("all_x_embedder.2-1", "cap_embedder.1", "t_embedder.mlp.0", "all_final_layer.2-1.linear",
                   "layers.0.adaLN_modulation.0"):
        assert f"diffusion_model.{module}.lora_A.weight" in tensors, module
    loss = FlowLoss(tiny_zimage["model"], two_image_folder)
    assert not [w for w in loss.load_lora(path) if "lora" in w.lower()]
    assert {f"diffusion_model.{n}" for n in adapted_deltas(loss.components.denoiser)} == set(lora_modules(tensors))


def test_zimage_files_are_found_or_named(tiny_zimage) -> None:
    model = ModelConfig(**tiny_zimage["model"])
    assert family_for(model).name == "zimage"
    files = locate_files(model)
    assert Path(files.qwen3.path).name == "qwen3-tiny.safetensors"
    with pytest.raises(UnsupportedModelError, match="Z-Image diffusion model without the Qwen3 text encoder"):
        locate_files(ModelConfig(path=model.path, vae=files.vae.path))
    with pytest.raises(ValueError, match="Qwen3 encoder is not trained"):
        ZImageFamily().trained_text_encoders(LoraConfig(train_text_encoder=True))
    assert ZImageFamily().objective(TrainConfig()).shift_for((16, 128, 128)) == 3.0
