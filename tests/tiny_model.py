"""Tiny models of each family, built from a fixed seed: SD 1.5's architecture (UNet, VAE with an 8x
downscale, CLIP text encoder) and SDXL's (three-level UNet with size conditioning, two text encoders).

Saved as diffusers folders, they are real base models for the trainer: same classes, same code paths as
the full-size families, a few hundred thousand parameters, so a training step takes milliseconds on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TEXT_DIM = 32
SDXL_TEXT_DIMS = (32, 48)  # the two encoders' widths: the UNet's context is their sum
SDXL_TIME_DIM = 8  # width of each of the six size numbers' embedding


def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def clip_config(width: int, pad_token_id: int, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def build_text_encoder() -> CLIPTextModel:
    torch.manual_seed(2)
    config = clip_config(TEXT_DIM, pad_token_id=49407)
    config.num_hidden_layers = 2
    config.intermediate_size = 64
    return CLIPTextModel(config)


def build_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's layout: no attention at the first level, attention at the other two (deeper at the last), the
    pooled text and six size numbers as added conditioning."""
    torch.manual_seed(3)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=sum(SDXL_TEXT_DIMS),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_TEXT_DIMS[1] + 6 * SDXL_TIME_DIM,
        use_linear_projection=True,
        norm_num_groups=8,
    )


def build_sdxl_text_encoders() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(4)
    first = CLIPTextModel(clip_config(SDXL_TEXT_DIMS[0], pad_token_id=49407))
    torch.manual_seed(5)
    second = CLIPTextModelWithProjection(clip_config(SDXL_TEXT_DIMS[1], pad_token_id=0, hidden_act="gelu"))
    return first, second


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )


def save_tiny_model(dest: Path, tokenizer_dir: Path) -> Path:
    """Write the tiny model as a diffusers folder (tokenizer copied from `tokenizer_dir`)."""
    dest.mkdir(parents=True, exist_ok=True)
    build_unet().save_pretrained(dest / "unet")
    build_vae().save_pretrained(dest / "vae")
    build_text_encoder().save_pretrained(dest / "text_encoder")
    build_scheduler().save_pretrained(dest / "scheduler")
    shutil.copytree(tokenizer_dir, dest / "tokenizer", dirs_exist_ok=True)
    (dest / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.0",'
        ' "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],'
        ' "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],'
        ' "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [null, null],'
        ' "feature_extractor": [null, null], "requires_safety_checker": false}\n'
    )
    return dest


def save_tiny_sdxl_model(dest: Path, tokenizer_dir: Path) -> Path:
    """Write the tiny SDXL-architecture model as a diffusers folder (both tokenizers from `tokenizer_dir`)."""
    dest.mkdir(parents=True, exist_ok=True)
    build_sdxl_unet().save_pretrained(dest / "unet")
    build_vae().save_pretrained(dest / "vae")
    first, second = build_sdxl_text_encoders()
    first.save_pretrained(dest / "text_encoder")
    second.save_pretrained(dest / "text_encoder_2")
    build_scheduler().save_pretrained(dest / "scheduler")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        shutil.copytree(tokenizer_dir, dest / name, dirs_exist_ok=True)
        # as SDXL's own tokenizer folders say it: a 77-token context, the second padding with "!"
        config_path = dest / name / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.update(model_max_length=77, pad_token=pad)
        config_path.write_text(json.dumps(config), encoding="utf-8")
        special_path = dest / name / "special_tokens_map.json"
        special = json.loads(special_path.read_text(encoding="utf-8"))
        special["pad_token"] = pad
        special_path.write_text(json.dumps(special), encoding="utf-8")
    (dest / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.32.0",'
        ' "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],'
        ' "text_encoder": ["transformers", "CLIPTextModel"],'
        ' "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],'
        ' "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],'
        ' "scheduler": ["diffusers", "DDPMScheduler"], "force_zeros_for_empty_prompt": true}\n'
    )
    return dest
