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


def copy_clip_tokenizer(source: Path, dest: Path, pad: str) -> None:
    """ComfyUI's CLIP tokenizer files, saying what a model's own tokenizer folder says: a 77-token context
    (ComfyUI's config says 8192) and its padding token."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(model_max_length=77, pad_token=pad)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    special_path = dest / "special_tokens_map.json"
    special = json.loads(special_path.read_text(encoding="utf-8"))
    special["pad_token"] = pad
    special_path.write_text(json.dumps(special), encoding="utf-8")


def save_tiny_sdxl_model(dest: Path, tokenizer_dir: Path) -> Path:
    """Write the tiny SDXL-architecture model as a diffusers folder (both tokenizers from `tokenizer_dir`)."""
    dest.mkdir(parents=True, exist_ok=True)
    build_sdxl_unet().save_pretrained(dest / "unet")
    build_vae().save_pretrained(dest / "vae")
    first, second = build_sdxl_text_encoders()
    first.save_pretrained(dest / "text_encoder")
    second.save_pretrained(dest / "text_encoder_2")
    build_scheduler().save_pretrained(dest / "scheduler")
    # as SDXL's own tokenizer folders say it: a 77-token context, the second padding with "!"
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        copy_clip_tokenizer(tokenizer_dir, dest / name, pad)
    (dest / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.32.0",'
        ' "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],'
        ' "text_encoder": ["transformers", "CLIPTextModel"],'
        ' "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],'
        ' "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],'
        ' "scheduler": ["diffusers", "DDPMScheduler"], "force_zeros_for_empty_prompt": true}\n'
    )
    return dest


# ---- FLUX.1 (flow matching; a transformer on 2x2-packed 16-channel latents, CLIP-L pooled + T5 hidden states)

FLUX_TEXT_DIMS = (32, 24)  # CLIP-L's width (pooled projection) and T5's (the joint attention context)


def build_flux_transformer(guidance: bool = True):
    """FLUX.1 dev (guidance embedding) or schnell (none): one double-stream and one single-stream block; the
    rotary axes add up to the head width, as FLUX's do (16 + 56 + 56 = 128)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(5)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIMS[1],
        pooled_projection_dim=FLUX_TEXT_DIMS[0],
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )


def build_flux_vae() -> AutoencoderKL:
    """FLUX's VAE layout: 16 latent channels, an 8x downscale, a shift as well as a scale."""
    torch.manual_seed(6)
    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_flux_text_encoders():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(7)
    clip = CLIPTextModel(clip_config(FLUX_TEXT_DIMS[0], pad_token_id=49407))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=FLUX_TEXT_DIMS[1], d_kv=8, d_ff=48, num_layers=1,
                                 num_heads=3, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    return clip, t5


def save_tiny_flux_model(dest: Path, tokenizer_dir: Path, t5_tokenizer_dir: Path, guidance: bool = True) -> Path:
    """Write the tiny FLUX.1 model as a diffusers folder (CLIP tokenizer from `tokenizer_dir`, T5's from
    `t5_tokenizer_dir`: ComfyUI ships both)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dest.mkdir(parents=True, exist_ok=True)
    build_flux_transformer(guidance).save_pretrained(dest / "transformer")
    build_flux_vae().save_pretrained(dest / "vae")
    clip, t5 = build_flux_text_encoders()
    clip.save_pretrained(dest / "text_encoder")
    t5.save_pretrained(dest / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(dest / "scheduler")
    copy_clip_tokenizer(tokenizer_dir, dest / "tokenizer", "<|endoftext|>")
    shutil.copytree(t5_tokenizer_dir, dest / "tokenizer_2", dirs_exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    }))
    return dest
