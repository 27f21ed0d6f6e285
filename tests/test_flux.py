"""FLUX.1 end to end on the tiny FLUX (tests/tiny_model.py), kept as ComfyUI users keep FLUX: the transformer
in Black Forest Labs' layout, CLIP-L and T5 as text-encoder files, the VAE as a file of its own. Real
`accelerate launch` subprocesses; diffusers' FluxPipeline reads the LoRA files back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import read_events, run_trainer, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer import (
    assert_ok,
    assert_resumed_run_matches_uninterrupted,
    assert_two_processes_match_one,
    lora_of,
)

from trainer.config import ModelConfig, TrainConfig
from trainer.data import open_image, prepare_image
from trainer.families import UnsupportedModelError, family_for
from trainer.families.flux import FluxFamily, locate_files


def flux_config(run_dir: Path, tiny: dict, data: Path, **sections: dict) -> dict:
    return tiny_config(run_dir, Path(tiny["model"]["path"]), data, model=dict(tiny["model"]), **sections)


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the delta the file describes (up @ down x alpha / rank), in diffusers' names."""
    names = {key.rsplit(".", 2)[0] for key in tensors if key.endswith(".lora_A.weight")}
    deltas = {}
    for name in names:
        down, up = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        deltas[name] = up @ down * (float(tensors[f"{name}.alpha"]) / down.shape[0])
    return deltas


class FlowLoss:
    """The flow-matching loss of the tiny FLUX on the two training pictures over fixed (noise, σ) draws, and
    diffusers' FluxPipeline to put a LoRA file on it."""

    def __init__(self, model: dict, data: Path):
        self.family = family_for(ModelConfig(**model))
        self.components = self.family.load(ModelConfig(**model), torch.float32)
        self.pipe = self.family.sampling_pipeline(self.components, self.components.denoiser)
        self.data = data

    def __call__(self) -> float:
        c, family, vae = self.components, self.family, self.components.vae
        g = torch.Generator().manual_seed(1234)
        losses = []
        with torch.no_grad():
            for name in ("red", "blue"):
                pixels = prepare_image(open_image(self.data / f"{name}.png"), (64, 64), "center", None)
                latents = (vae.encode(pixels[None]).latent_dist.mode() - vae.config.shift_factor) \
                    * vae.config.scaling_factor
                caption = (self.data / f"{name}.txt").read_text()
                text = family.encode_prompt(c.text_encoders, family.tokenize(c, [caption]))
                for _ in range(16):
                    noise = torch.randn(latents.shape, generator=g)
                    # σ as training draws it (logit-normal, shifted for the size)
                    drawn = torch.randint(0, 1000, (1,), generator=g)
                    sigma = c.objective.timesteps(drawn, tuple(latents.shape[1:]))
                    noisy = c.objective.noisy(latents, noise, sigma)
                    pred = family.predict(c.denoiser, noisy, sigma, text, torch.zeros(1, 6))
                    losses.append(torch.nn.functional.mse_loss(pred, noise - latents).item())
        return sum(losses) / len(losses)

    def load_lora(self, path: Path) -> list[str]:
        """diffusers' load_lora_weights on the pipeline; what it logged at warning level."""
        messages: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("diffusers").addHandler(handler)
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        finally:
            logging.getLogger("diffusers").removeHandler(handler)
        return messages


def adapted_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight("default_0") for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default_0" in module.lora_A}


def test_flux_dev_learns_and_diffusers_adapts_every_module(tmp_path, tiny_flux, two_image_folder) -> None:
    cfg = flux_config(tmp_path / "run", tiny_flux, two_image_folder,
                      lora={"targets": "attention_ff", "rank": 8, "alpha": 8.0},
                      train={"max_steps": 300, "learning_rate": 1e-2})
    assert_ok(run_trainer(cfg))
    tensors = lora_of(cfg)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    assert {key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1] for key in tensors} == {
        "lora_A", "lora_B", "alpha"}
    modules = lora_modules(tensors)
    # attention + MLP of both block kinds: 8 + 4 in the double block, 3 + 2 in the single block
    assert len(modules) == 17 and "transformer.single_transformer_blocks.0.proj_mlp" in modules
    assert "transformer.proj_out" not in modules  # the final projection is not an MLP layer

    loss = FlowLoss(tiny_flux["model"], two_image_folder)
    before = loss()
    warnings = loss.load_lora(Path(cfg["output"]["lora_path"]))
    after = loss()
    print(f"FLUX.1 dev flow-matching loss {before:.4f} -> {after:.4f}")
    assert after <= 0.7 * before, f"flow-matching loss {before:.4f} -> {after:.4f}: less than 30% lower"
    # the one warning allowed: this LoRA has no text-encoder part
    assert not [w for w in warnings if "lora" in w.lower() and "CLIPTextModel" not in w], warnings
    adapted = adapted_deltas(loss.components.denoiser)
    assert {f"transformer.{name}" for name in adapted} == set(modules)
    assert max(float((adapted[name.removeprefix("transformer.")] - delta).abs().max())
               for name, delta in modules.items()) < 1e-6


def test_flux_two_processes_match_one(tmp_path, tiny_flux, two_image_folder) -> None:
    assert_two_processes_match_one(tmp_path, Path(tiny_flux["model"]["path"]), two_image_folder,
                                   model=dict(tiny_flux["model"]))


def test_killed_flux_run_resumes_to_the_same_lora(tmp_path, tiny_flux, two_image_folder) -> None:
    assert_resumed_run_matches_uninterrupted(tmp_path, Path(tiny_flux["model"]["path"]), two_image_folder,
                                             model=dict(tiny_flux["model"]))


def test_flux_schnell_with_clip_lora_samples_and_says_what_it_is(tmp_path, tiny_flux_schnell,
                                                                 two_image_folder) -> None:
    cfg = flux_config(tmp_path / "run", tiny_flux_schnell, two_image_folder,
                      lora={"targets": "all", "train_text_encoder": True},
                      train={"max_steps": 2, "timestep_sampling": "sigmoid", "logit_std": 1.5},
                      sample={"prompts": ["a red circle"], "steps": 2})
    assert_ok(run_trainer(cfg))
    path = Path(cfg["output"]["lora_path"])
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert metadata["modelspec.prediction_type"] == "flow"
    assert "text_encoders" in metadata["lora_foundry.config"] and str(tmp_path) not in "".join(metadata.values())
    tensors = load_file(path)
    clip = [k for k in tensors if k.startswith("text_encoder.text_model.encoder.layers.")]
    assert clip and all(k.startswith(("transformer.", "text_encoder.")) for k in tensors)
    # "all": the embedders and modulations too, but never the frozen T5
    assert "transformer.x_embedder.lora_A.weight" in tensors and "transformer.norm_out.linear.alpha" in tensors
    (sample,) = [e for e in read_events(tmp_path / "run") if e["type"] == "sample"]
    assert Path(sample["path"]).is_file()

    loss = FlowLoss(tiny_flux_schnell["model"], two_image_folder)
    assert loss.family.variant == "schnell"
    loss.load_lora(path)
    adapted_clip = adapted_deltas(loss.components.text_encoders["lora_te1"])
    assert len(adapted_clip) == len({k.rsplit(".", 2)[0] for k in clip if k.endswith("lora_A.weight")})
    adapted = adapted_deltas(loss.components.denoiser)
    assert {f"transformer.{n}" for n in adapted} == {k for k in lora_modules(tensors) if k.startswith("transformer.")}


def test_text_encoders_and_vae_are_found_or_named(tiny_flux) -> None:
    model = ModelConfig(**tiny_flux["model"])
    files = locate_files(model)
    names = (Path(files.clip_l.path).name, Path(files.t5.path).name)
    assert names == ("clip_l-tiny.safetensors", "t5-tiny.safetensors")
    with pytest.raises(UnsupportedModelError, match="without the CLIP-L text encoder and the VAE"):
        locate_files(ModelConfig(path=model.path, text_encoders=[files.t5.path]))
    with pytest.raises(UnsupportedModelError, match="both T5 text encoders; FLUX.1 needs one"):
        locate_files(ModelConfig(path=model.path, text_encoders=[files.t5.path, files.t5.path]))
    with pytest.raises(UnsupportedModelError, match="none of the text encoders FLUX.1 needs"):
        locate_files(ModelConfig(path=model.path, text_encoders=[files.vae.path]))


def test_flow_matching_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min-SNR"):
        FluxFamily().configure(TrainConfig(min_snr_gamma=5.0))
    from trainer.config import LoraConfig

    with pytest.raises(ValueError, match="T5 is not trained"):
        FluxFamily().trained_text_encoders(LoraConfig(train_text_encoder_2=True))
    dev = FluxFamily("dev").objective(TrainConfig())
    assert dev.shift_for((16, 128, 128)) == pytest.approx(3.158, abs=1e-3)  # e^1.15 at 1024 px
    fixed = FluxFamily("dev").objective(TrainConfig(timestep_shift=3.0))
    assert fixed.shift_for((16, 128, 128)) == 3.0
    assert FluxFamily("schnell").objective(TrainConfig()).shift_for((16, 128, 128)) == 1.0
