"""A tiny SD-architecture model (UNet, VAE with an 8x downscale, CLIP text encoder) built from a fixed seed.

Saved as a diffusers folder, it is a real base model for the trainer: same classes, same code paths as
SD 1.5, a few hundred thousand parameters, so a training step takes milliseconds on the CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_DIM = 32


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


def build_text_encoder() -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


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
