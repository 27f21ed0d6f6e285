"""Stable Diffusion 1.5: loading, prompt encoding, the UNet call and LoRA target names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..weights import weight_files
from .base import DENOISER, Components, ModelFamily
from .component_files import folder_models
from .ddpm import DDPMObjective
from .detect import is_diffusers_folder, require_family
from .single_file import load_pipeline
from .tokenizers import clip_tokenizer, find_tokenizer_dir, tokenize

CONFIG_DIR = Path(__file__).parent / "sd15_config"
TEXT_ENCODER = "lora_te"

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
# "all" is kohya's LoCon module set (networks/lora.py with conv_dim): every Linear and Conv2d inside the
# Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D blocks. Not conv_in, conv_out and
# time_embedding.linear_1/2: they sit outside those blocks, and kohya sd-scripts and diffusers 0.32 drop them
# when loading, so a file holding them would not mean the same thing in every loader.
# peft matches a string target as a full-name regex.
_UNET_BLOCK = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\."
_TRANSFORMER_LAYER = (
    r"attentions\.\d+\.(proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
_RESNET_LAYER = r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
_SAMPLER_LAYER = r"(downsamplers|upsamplers)\.\d+\.conv"
UNET_ALL = f"{_UNET_BLOCK}({_TRANSFORMER_LAYER}|{_RESNET_LAYER}|{_SAMPLER_LAYER})"
# LoCon's convolutions: those of "all" (kohya's conv_dim set)
UNET_CONVOLUTIONS = rf"{_UNET_BLOCK}(resnets\.\d+\.(conv1|conv2|conv_shortcut)|{_SAMPLER_LAYER})"
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# with TEXT_ATTENTION: every Linear of CLIPAttention and CLIPMLP, kohya's text-encoder module set
TEXT_MLP = ["fc1", "fc2"]
TOKENS = 77  # CLIP's context; ComfyUI's tokenizer_config says model_max_length 8192 under transformers 5
ENCODER_PREFIXES = ("first_stage_model.", "cond_stage_model.")  # VAE and text encoder in a single file


class SD15Family(ModelFamily):
    name = "sd15"
    label = "SD 1.5"
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_implementation = "diffusers"  # what kohya writes for SD v1/v2 LoRAs
    max_tokens = TOKENS
    default_resolution = 512
    text_encoder_names = {TEXT_ENCODER: "text encoder"}

    def check(self, model: ModelConfig) -> None:
        require_family(model.path, self.name)

    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        self.check(model)
        tokenizer = clip_tokenizer(find_tokenizer_dir(model), self.max_tokens)
        if is_diffusers_folder(model.path):
            unet, vae, text_encoder, scheduler_dir = self._load_folder(Path(model.path), dtype)
            hash_inputs, hash_prefixes = weight_files(Path(model.path), ("vae", "text_encoder")), ()
        else:
            unet, vae, text_encoder = self._load_single_file(model.path, tokenizer, dtype)
            scheduler_dir, hash_inputs, hash_prefixes = CONFIG_DIR / "scheduler", [model.path], ENCODER_PREFIXES
        objective = DDPMObjective.from_config_dir(scheduler_dir, model)
        return Components(unet, vae, {TEXT_ENCODER: text_encoder}, {TEXT_ENCODER: tokenizer}, objective,
                          hash_inputs, hash_prefixes)

    @staticmethod
    def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Path]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        unet, vae, text_encoder = folder_models(path, dtype, {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                                                             "text_encoder": CLIPTextModel})
        return unet, vae, text_encoder, path / "scheduler"

    @staticmethod
    def _load_single_file(path: str, tokenizer: Any, dtype: torch.dtype) -> tuple[Any, Any, Any]:
        from diffusers import StableDiffusionPipeline

        pipe = load_pipeline(StableDiffusionPipeline, path, CONFIG_DIR, dtype, tokenizer=tokenizer,
                             safety_checker=None, feature_extractor=None)
        return pipe.unet, pipe.vae, pipe.text_encoder

    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        return {TEXT_ENCODER: tokenize(components.tokenizers[TEXT_ENCODER], captions, self.max_tokens)}

    def encode_prompt(
        self, text_encoders: dict[str, torch.nn.Module], tokens: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        encoder = text_encoders[TEXT_ENCODER]
        return {"hidden": encoder(tokens[TEXT_ENCODER], return_dict=False)[0]}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        framing: torch.Tensor,
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, encoder_hidden_states=text["hidden"], return_dict=False)[0]

    def targets(self, prefix: str, preset: str) -> list[str] | str:
        return clip_unet_targets(prefix, preset)

    def conv_targets(self, prefix: str) -> str | None:
        return UNET_CONVOLUTIONS if prefix == DENOISER else None

    def kohya_name(self, prefix: str, model: torch.nn.Module, module_path: str) -> str:
        return f"{prefix}_{kohya_text_path(module_path) if prefix != DENOISER else module_path}".replace(".", "_")

    def sampling_pipeline(self, components: Components, denoiser: torch.nn.Module) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[TEXT_ENCODER],
            tokenizer=components.tokenizers[TEXT_ENCODER],
            unet=denoiser,
            scheduler=EulerDiscreteScheduler.from_config(components.objective.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def clip_unet_targets(prefix: str, preset: str) -> list[str] | str:
    """peft target_modules of a diffusers UNet (the denoiser) or a CLIP text encoder, per preset: the same
    layer names in every family built of them (SD 1.5, SDXL)."""
    if prefix == DENOISER:
        return {"attention": UNET_ATTENTION, "attention_ff": UNET_ATTENTION + UNET_FEED_FORWARD,
                "all": UNET_ALL}[preset]
    return TEXT_ATTENTION if preset == "attention" else TEXT_ATTENTION + TEXT_MLP


def kohya_text_path(path: str) -> str:
    """transformers 5 flattened CLIPTextModel (its modules are `encoder.layers...`, no `text_model.`); kohya
    names keep the original checkpoint layout `text_model.encoder.layers...`."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


SD15 = SD15Family()
