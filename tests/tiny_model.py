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

# CLIP-L's width (pooled projection) and T5's (the joint attention context); both keep their 64-wide heads, so
# the trainer reads every size from the weights as it does for the full models
FLUX_TEXT_DIMS = (64, 32)
FLUX_HEAD = 32  # the rotary axes split it as FLUX.1's 128 is split: 4 + 14 + 14


def build_flux_transformer(guidance: bool = True):
    """FLUX.1 dev (guidance embedding) or schnell (none): one double-stream and one single-stream block."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(5)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=FLUX_HEAD,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIMS[1],
        pooled_projection_dim=FLUX_TEXT_DIMS[0],
        guidance_embeds=guidance,
        axes_dims_rope=(FLUX_HEAD // 8, FLUX_HEAD * 7 // 16, FLUX_HEAD * 7 // 16),
    )


def build_flux_vae() -> AutoencoderKL:
    """FLUX's VAE layout: 16 latent channels, an 8x downscale, a shift as well as a scale, 32 norm groups."""
    torch.manual_seed(6)
    return AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_flux_text_encoders():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(7)
    clip_cfg = clip_config(FLUX_TEXT_DIMS[0], pad_token_id=49407)
    clip_cfg.num_attention_heads = 1
    clip = CLIPTextModel(clip_cfg)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=FLUX_TEXT_DIMS[1], d_kv=64, d_ff=48, num_layers=1,
                                 num_heads=1, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    return clip, t5


def bfl_transformer_tensors(model) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's tensors in Black Forest Labs' layout (ComfyUI's
    models/diffusion_models): the inverse of trainer/families/flux_layout.to_diffusers, written out here on
    its own so that a mistake in one is not repeated in the other."""
    return bfl_tensors(model.state_dict(), model.config)


def bfl_tensors(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`bfl_transformer_tensors` of a diffusers-named state dict (weights, or the deltas a LoRA makes)."""
    sd = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return sd.pop(name)

    for i in range(config.num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{kind}"] = torch.cat([take(f"{d}.attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{kind}"] = torch.cat([take(f"{d}.attn.add_{x}_proj.{kind}") for x in "qkv"])
            for theirs, ours in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                                 ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                 ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                                 ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2")):
                out[f"{b}.{theirs}.{kind}"] = take(f"{d}.{ours}.{kind}")
        for theirs, ours in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                             ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                             ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{b}.{theirs}.scale"] = take(f"{d}.{ours}.weight")
    for i in range(config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.linear1.{kind}"] = torch.cat([take(f"{d}.attn.to_{x}.{kind}") for x in "qkv"]
                                                   + [take(f"{d}.proj_mlp.{kind}")])
            out[f"{b}.linear2.{kind}"] = take(f"{d}.proj_out.{kind}")
            out[f"{b}.modulation.lin.{kind}"] = take(f"{d}.norm.linear.{kind}")
        out[f"{b}.norm.query_norm.scale"] = take(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = take(f"{d}.attn.norm_k.weight")
    embedders = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
                 "time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder",
                 "guidance_in": "time_text_embed.guidance_embedder"}
    for kind in ("weight", "bias"):
        for theirs, ours in embedders.items():
            if theirs.endswith("_in") and theirs not in ("img_in", "txt_in"):
                if f"{ours}.linear_1.{kind}" in sd:
                    out[f"{theirs}.in_layer.{kind}"] = take(f"{ours}.linear_1.{kind}")
                    out[f"{theirs}.out_layer.{kind}"] = take(f"{ours}.linear_2.{kind}")
            else:
                out[f"{theirs}.{kind}"] = take(f"{ours}.{kind}")
        scale, shift = take(f"norm_out.linear.{kind}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    assert not sd, f"diffusers FLUX tensors without a BFL name: {sorted(sd)}"
    return out


def save_tiny_flux_files(dest: Path, guidance: bool = True) -> dict[str, Path]:
    """The tiny FLUX.1 as ComfyUI users keep FLUX: the transformer in models/diffusion_models' layout, CLIP-L and
    T5 as models/text_encoders files, the VAE as a models/vae file (the original LDM layout)."""
    from safetensors.torch import save_file

    from scripts.make_random_sd15 import ldm_vae_state_dict

    dest.mkdir(parents=True, exist_ok=True)
    variant = "dev" if guidance else "schnell"
    clip, t5 = build_flux_text_encoders()
    files = {
        "transformer": (dest / f"flux1-tiny-{variant}.safetensors",
                        bfl_transformer_tensors(build_flux_transformer(guidance))),
        "clip_l": (dest / "clip_l-tiny.safetensors",
                   {f"text_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}),
        "t5": (dest / "t5-tiny.safetensors", {k: v.contiguous() for k, v in t5.state_dict().items()
                                              if not k.startswith("encoder.embed_tokens.")}),
        "vae": (dest / "ae-tiny.safetensors", ldm_vae_state_dict(build_flux_vae())),
    }
    for path, tensors in files.values():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return {role: path for role, (path, _) in files.items()}


def save_tiny_flux_folder(dest: Path, tokenizer_dir: Path, t5_tokenizer_dir: Path, guidance: bool = True) -> Path:
    """The same tiny FLUX.1 as a diffusers folder (the CLIP tokenizer from `tokenizer_dir`, T5's from
    `t5_tokenizer_dir`: ComfyUI ships both)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dest.mkdir(parents=True, exist_ok=True)
    build_flux_transformer(guidance).save_pretrained(dest / "transformer")
    build_flux_vae().save_pretrained(dest / "vae")
    clip, t5 = build_flux_text_encoders()
    clip.save_pretrained(dest / "text_encoder")
    t5.save_pretrained(dest / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(dest / "scheduler")
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


# ---- Z-Image (flow matching; a single-stream transformer, Qwen3's second-to-last hidden states as the text)

# Z-Image's heads are 128 wide and its feed-forward 8/3 of the width. At 1152 (9 heads) ComfyUI's rounding of
# the feed-forward (to a multiple of 256) and diffusers' (none) agree, as they do at the full 3840, and so do
# their timestep embedders (ComfyUI's is min(width, 1024) wide, diffusers' always 1024)
ZIMAGE_DIM = 1152
ZIMAGE_TEXT_DIM = 64  # the tiny Qwen3's width: the transformer's caption features


def build_zimage_transformer():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(8)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=ZIMAGE_DIM, n_layers=1, n_refiner_layers=1,
        n_heads=ZIMAGE_DIM // 128, n_kv_heads=ZIMAGE_DIM // 128, cap_feat_dim=ZIMAGE_TEXT_DIM,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    )
    with torch.no_grad():  # the pad tokens start at zero: make them count
        model.x_pad_token.normal_(std=0.02)
        model.cap_pad_token.normal_(std=0.02)
    return model


def build_zimage_text_encoder():
    """A Qwen3 of Qwen3-4B's vocabulary and head layout (grouped query attention, q/k norms), three layers."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(9)
    return Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=ZIMAGE_TEXT_DIM, intermediate_size=96,
                                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=1024, rope_theta=1e6, tie_word_embeddings=True))


def comfy_zimage_tensors(model) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel's tensors in the layout ComfyUI's models/diffusion_models holds
    (fused attention.qkv, attention.out, q_norm / k_norm, final_layer, x_embedder), written out independently
    of the trainer's loader."""
    return comfy_zimage_layout(model.state_dict())


def comfy_zimage_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    sd = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    for key in [k for k in sd if k.endswith(".attention.to_q.weight")]:
        stem = key.removesuffix(".to_q.weight")
        out[f"{stem}.qkv.weight"] = torch.cat([sd.pop(f"{stem}.to_{x}.weight") for x in "qkv"])
    renames = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
               (".attention.norm_k.", ".attention.k_norm."))
    for key, value in sd.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def save_tiny_zimage_files(dest: Path) -> dict[str, Path]:
    """The tiny Z-Image as ComfyUI users keep Z-Image: the transformer in models/diffusion_models' layout, the
    Qwen3 encoder as a models/text_encoders file (`model.` names, as qwen_3_4b.safetensors), FLUX's VAE layout."""
    from safetensors.torch import save_file

    from scripts.make_random_sd15 import ldm_vae_state_dict

    dest.mkdir(parents=True, exist_ok=True)
    files = {
        "transformer": (dest / "z-image-tiny.safetensors", comfy_zimage_tensors(build_zimage_transformer())),
        "qwen3": (dest / "qwen3-tiny.safetensors",
                  {f"model.{k}": v for k, v in build_zimage_text_encoder().state_dict().items()}),
        "vae": (dest / "ae-tiny.safetensors", ldm_vae_state_dict(build_flux_vae())),
    }
    for path, tensors in files.values():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return {role: path for role, (path, _) in files.items()}
