"""Stable Diffusion 1.5: loading, prompt encoding, the UNet call and LoRA target names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import is_diffusers_folder, require_sd15, stored_float_dtype
from ..config import ModelConfig
from .base import Components, ModelFamily

CONFIG_DIR = Path(__file__).parent / "sd15_config"
PACK_ROOT = Path(__file__).absolute().parents[2]

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
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# with TEXT_ATTENTION: every Linear of CLIPAttention and CLIPMLP, kohya's text-encoder module set
TEXT_MLP = ["fc1", "fc2"]
TOKENS = 77  # CLIP's context; ComfyUI's tokenizer_config says model_max_length 8192 under transformers 5
ENCODER_PREFIXES = ("first_stage_model.", "cond_stage_model.")  # VAE and text encoder in a single file
STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def tokenizer_search_path(model: ModelConfig) -> list[Path]:
    """Where the CLIP tokenizer files are looked for, first match wins.

    1. `model.tokenizer_dir` from the config;
    2. a diffusers base model's own `tokenizer/` folder;
    3. `$LORA_FOUNDRY_TOKENIZER_DIR`;
    4. ComfyUI's copy, `comfy/sd1_tokenizer`: of `$COMFYUI_DIR`, of the ComfyUI this pack sits in
       (`ComfyUI/custom_nodes/<pack>/`), and of the one `scripts/setup.sh` installs (`.runtime/ComfyUI`).
    """
    candidates = []
    if model.tokenizer_dir:
        candidates.append(Path(model.tokenizer_dir))
    if is_diffusers_folder(model.path):
        candidates.append(Path(model.path) / "tokenizer")
    if os.environ.get("LORA_FOUNDRY_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["LORA_FOUNDRY_TOKENIZER_DIR"]))
    comfy_roots = [Path(os.environ["COMFYUI_DIR"])] if os.environ.get("COMFYUI_DIR") else []
    comfy_roots += [PACK_ROOT.parent.parent, PACK_ROOT / ".runtime" / "ComfyUI"]
    candidates += [root / "comfy" / "sd1_tokenizer" for root in comfy_roots]
    return candidates


def find_tokenizer_dir(model: ModelConfig) -> Path:
    candidates = tokenizer_search_path(model)
    for folder in candidates:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    looked = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(
        "CLIP tokenizer files (vocab.json, merges.txt) not found. Set model.tokenizer_dir or "
        f"LORA_FOUNDRY_TOKENIZER_DIR to a folder holding them (ComfyUI has one: comfy/sd1_tokenizer). "
        f"Looked in:\n{looked}"
    )


class SD15Family(ModelFamily):
    name = "sd15"
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    max_tokens = TOKENS

    def check(self, model: ModelConfig) -> None:
        require_sd15(model.path)

    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        from diffusers import DDPMScheduler
        from transformers import CLIPTokenizer

        self.check(model)
        tokenizer = CLIPTokenizer.from_pretrained(find_tokenizer_dir(model), local_files_only=True)
        tokenizer.model_max_length = self.max_tokens  # diffusers pipelines pad prompts to this
        if is_diffusers_folder(model.path):
            unet, vae, text_encoder, scheduler_dir = self._load_folder(Path(model.path), dtype)
            hash_inputs, hash_prefixes = _weight_files(Path(model.path), ("vae", "text_encoder")), ()
        else:
            unet, vae, text_encoder = self._load_single_file(model.path, tokenizer, dtype)
            scheduler_dir, hash_inputs, hash_prefixes = CONFIG_DIR / "scheduler", [model.path], ENCODER_PREFIXES
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
        if model.prediction_type:
            scheduler.register_to_config(prediction_type=model.prediction_type)
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.train(False)
        return Components(unet, vae, text_encoder, tokenizer, scheduler, hash_inputs, hash_prefixes)

    @staticmethod
    def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Path]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        kwargs = {"torch_dtype": dtype, "local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kwargs)
        return unet, vae, text_encoder, path / "scheduler"

    @staticmethod
    def _load_single_file(path: str, tokenizer: Any, dtype: torch.dtype) -> tuple[Any, Any, Any]:
        """The three models in `dtype`. A file stored in 16 bits that is wanted in fp32 is read in its own
        dtype, without a memory map, and upcast one tensor at a time: the same values (the cast is exact),
        but the peak resident memory is about the fp32 models instead of the fp32 models plus the mapped file
        (6.8 -> 4.9 GiB for SD 1.5 in fp16)."""
        from diffusers import StableDiffusionPipeline

        stored = STORED_DTYPES.get(stored_float_dtype(path) or "")
        upcast = dtype == torch.float32 and stored is not None
        pipe = StableDiffusionPipeline.from_single_file(
            path,
            config=str(CONFIG_DIR),
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            local_files_only=True,
            torch_dtype=stored if upcast else dtype,
            disable_mmap=upcast,
        )
        models = pipe.unet, pipe.vae, pipe.text_encoder
        del pipe
        for module in models if upcast else ():
            module.to(dtype)  # parameter by parameter: each 16-bit copy is freed as its fp32 one appears
        return models

    def tokenize(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions,
            max_length=self.max_tokens,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]

    def predict(
        self, unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return unet(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    def unet_targets(self, preset: str) -> list[str] | str:
        return {
            "attention": UNET_ATTENTION,
            "attention_ff": UNET_ATTENTION + UNET_FEED_FORWARD,
            "all": UNET_ALL,
        }[preset]

    def text_encoder_targets(self, preset: str) -> list[str]:
        return TEXT_ATTENTION if preset == "attention" else TEXT_ATTENTION + TEXT_MLP

    def sampling_pipeline(self, components: Components, unet: torch.nn.Module) -> Any:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def _weight_files(root: Path, subfolders: tuple[str, ...]) -> list[str]:
    files = []
    for sub in subfolders:
        files += sorted(str(p) for p in (root / sub).iterdir() if p.suffix in (".safetensors", ".bin"))
    return files


SD15 = SD15Family()
