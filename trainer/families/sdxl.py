"""SDXL (and its fine-tunes: Pony, Illustrious, NoobAI share the architecture): two CLIP text encoders, the
pooled text and each picture's size and crop as extra conditioning, kohya's SGM-named LoRA keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..weights import weight_files
from .base import DENOISER, Components, ModelFamily, cast_vae
from .component_files import folder_models
from .ddpm import DDPMObjective
from .detect import is_diffusers_folder, require_family
from .sd15 import TOKENS, UNET_CONVOLUTIONS, clip_unet_targets
from .sd15 import kohya_text_path as flattened_clip_path
from .single_file import load_pipeline
from .tokenizers import clip_tokenizer, find_tokenizer_dir, tokenize

CONFIG_DIR = Path(__file__).parent / "sdxl_config"
TEXT_ENCODER_1 = "lora_te1"  # CLIP ViT-L: penultimate hidden states
TEXT_ENCODER_2 = "lora_te2"  # OpenCLIP ViT-bigG: penultimate hidden states and the projected pooled output
# the second tokenizer pads with "!" (id 0) where the first pads with the end token, as SDXL was trained
# (ComfyUI's SDXLClipG and the diffusers SDXL tokenizer_2 agree)
SECOND_PAD_TOKEN = "!"
# VAE, both text encoders in a single file: the bytes that decide the cache
ENCODER_PREFIXES = ("first_stage_model.", "conditioner.")


class SDXLFamily(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"  # kohya's, for SDXL
    max_tokens = TOKENS
    default_resolution = 1024
    text_encoder_names = {TEXT_ENCODER_1: "text encoder 1 (CLIP-L)", TEXT_ENCODER_2: "text encoder 2 (CLIP-G)"}

    def check(self, model: ModelConfig) -> None:
        require_family(model.path, self.name)

    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        self.check(model)
        folder = find_tokenizer_dir(model)  # the same BPE files serve both encoders
        tokenizers = {TEXT_ENCODER_1: clip_tokenizer(folder, self.max_tokens),
                      TEXT_ENCODER_2: clip_tokenizer(folder, self.max_tokens, pad_token=SECOND_PAD_TOKEN)}
        if is_diffusers_folder(model.path):
            unet, vae, te1, te2 = self._load_folder(Path(model.path), dtype)
            scheduler_dir = Path(model.path) / "scheduler"
            hash_inputs = weight_files(Path(model.path), ("vae", "text_encoder", "text_encoder_2"))
            hash_prefixes: tuple[str, ...] = ()
        else:
            unet, vae, te1, te2 = self._load_single_file(model.path, tokenizers, dtype)
            scheduler_dir, hash_inputs, hash_prefixes = CONFIG_DIR / "scheduler", [model.path], ENCODER_PREFIXES
        cast_vae(vae, dtype)
        return Components(
            unet, vae, {TEXT_ENCODER_1: te1, TEXT_ENCODER_2: te2}, tokenizers,
            DDPMObjective.from_config_dir(scheduler_dir, model), hash_inputs, hash_prefixes,
        )

    @staticmethod
    def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet, vae, te1, te2 = folder_models(path, dtype, {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                                                          "text_encoder": CLIPTextModel,
                                                          "text_encoder_2": CLIPTextModelWithProjection})
        return unet, vae, te1, te2

    @staticmethod
    def _load_single_file(path: str, tokenizers: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
        from diffusers import StableDiffusionXLPipeline

        pipe = load_pipeline(StableDiffusionXLPipeline, path, CONFIG_DIR, dtype,
                             tokenizer=tokenizers[TEXT_ENCODER_1], tokenizer_2=tokenizers[TEXT_ENCODER_2])
        return pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2

    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        return {prefix: tokenize(tokenizer, captions, self.max_tokens)
                for prefix, tokenizer in components.tokenizers.items()}

    def encode_prompt(
        self, text_encoders: dict[str, torch.nn.Module], tokens: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states side by side (77 x 2048 for SDXL), without the final
        layer norm, and the second encoder's projected pooled output (1280): what ComfyUI's
        CLIPTextEncodeSDXL and diffusers' SDXL pipeline give the UNet."""
        first, second = text_encoders[TEXT_ENCODER_1], text_encoders[TEXT_ENCODER_2]
        out1 = first(tokens[TEXT_ENCODER_1], output_hidden_states=True)
        out2 = second(tokens[TEXT_ENCODER_2], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return {"hidden": hidden, "pooled": out2.text_embeds}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        framing: torch.Tensor,
    ) -> torch.Tensor:
        # time ids: original (h, w), crop top-left (top, left), target (h, w), as SDXL was trained with
        conditions = {"text_embeds": text["pooled"], "time_ids": framing.to(noisy.device, text["pooled"].dtype)}
        return denoiser(noisy, timesteps, encoder_hidden_states=text["hidden"], added_cond_kwargs=conditions,
                        return_dict=False)[0]

    def targets(self, prefix: str, preset: str) -> list[str] | str:
        return clip_unet_targets(prefix, preset)

    def conv_targets(self, prefix: str) -> str | None:
        return UNET_CONVOLUTIONS if prefix == DENOISER else None

    def kohya_name(self, prefix: str, model: torch.nn.Module, module_path: str) -> str:
        if prefix == DENOISER:
            return f"{prefix}_{sgm_path(module_path, model.config)}".replace(".", "_")
        return f"{prefix}_{flattened_clip_path(module_path)}".replace(".", "_")

    def sampling_pipeline(self, components: Components, denoiser: torch.nn.Module) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[TEXT_ENCODER_1],
            text_encoder_2=components.text_encoders[TEXT_ENCODER_2],
            tokenizer=components.tokenizers[TEXT_ENCODER_1],
            tokenizer_2=components.tokenizers[TEXT_ENCODER_2],
            unet=denoiser,
            scheduler=EulerDiscreteScheduler.from_config(components.objective.scheduler.config),
            add_watermarker=False,
        )


# ---- kohya's SGM names: the UNet layout of the original SDXL checkpoints, which kohya, A1111 and ComfyUI
# read (diffusers' SDXL loader maps them back) ---------------------------------------------------------------

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.?(.*)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.?(.*)")


def sgm_path(path: str, config: Any) -> str:
    """The SGM (input_blocks / middle_block / output_blocks) name of a diffusers UNet module path.

    Each encoder level holds `layers_per_block` (resnet, attention) blocks, then one with its downsampler;
    each decoder level one block more, its upsampler in the last (after the attention where it has one)."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    per_level = config.layers_per_block
    if match := _BLOCK.fullmatch(path):
        side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if side == "down_blocks":
            if kind == "downsamplers":
                return _join(f"input_blocks.{(level + 1) * (per_level + 1)}.0", _sampler_rest(rest, "op"))
            block = f"input_blocks.{1 + level * (per_level + 1) + index}"
        else:
            if kind == "upsamplers":
                has_attention = config.up_block_types[level].startswith("CrossAttn")
                return _join(f"output_blocks.{level * (per_level + 1) + per_level}.{2 if has_attention else 1}",
                             rest)
            block = f"output_blocks.{level * (per_level + 1) + index}"
        return _join(f"{block}.{0 if kind == 'resnets' else 1}", _resnet_rest(rest) if kind == "resnets" else rest)
    if match := _MID.fullmatch(path):
        kind, index, rest = match[1], int(match[2]), match[3]
        block = f"middle_block.{2 * index if kind == 'resnets' else 1}"
        return _join(block, _resnet_rest(rest) if kind == "resnets" else rest)
    raise ValueError(f"{path}: no SGM name for this UNet module")


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _join(_RESNET_PARTS.get(head, head), tail)


def _sampler_rest(rest: str, conv: str) -> str:
    head, _, tail = rest.partition(".")
    return _join(conv if head == "conv" else head, tail)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


SDXL = SDXLFamily()
