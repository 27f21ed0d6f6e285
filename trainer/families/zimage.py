"""Z-Image (Tongyi-MAI's 6B single-stream DiT; Turbo and its fine-tunes): flow matching on 16-channel FLUX-VAE
latents, conditioned on the second-to-last hidden states of a Qwen3 (Qwen3-4B) reading the prompt in a chat
template, with no pooled text.

The files are read as ComfyUI users keep them: the transformer from models/diffusion_models (ComfyUI's layout:
fused attention.qkv; diffusers' converter splits it at any width), the Qwen3 encoder from models/text_encoders,
FLUX's VAE from models/vae; or from one all-in-one checkpoint. Conventions differ from FLUX: the model's
timestep runs the other way (t = 1 - σ, 1 is the clean picture) and its output is the negated velocity.

The LoRA is written as `diffusion_model.<diffusers module>.lora_A/B.weight` + `.alpha`: the only diffusers-style
prefix ComfyUI 0.3.75 maps for Z-Image (0.33 adds `transformer.`), and one diffusers' Z-Image loader converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig, ModelConfig, TrainConfig
from .base import Components, ModelFamily, cast_vae
from .component_files import (
    QWEN3_KEY,
    VAE_KEY,
    Part,
    Source,
    denoiser_source,
    ldm_vae,
    locate_parts,
    qwen3_encoder,
    read_tensors,
)
from .detect import require_family
from .flow import FlowMatchObjective, check_flow_settings, sampling_from
from .tokenizers import find_qwen_tokenizer_dir

CONFIG_DIR = Path(__file__).parent / "zimage_config"
QWEN3 = "lora_te1"
CHECKPOINT_PREFIX = "model.diffusion_model."
TOKENS = 512  # caption tokens, template included, as diffusers' ZImagePipeline reads them
# ComfyUI's z_image.py prompt template (diffusers' pipeline builds the same through Qwen3's chat template)
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# a chat template giving exactly TEMPLATE, for diffusers' pipeline: the Qwen2.5 tokenizer files ComfyUI ships
# carry Qwen2.5's template, which adds a system prompt Z-Image was not trained with
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHIFT = 3.0  # Z-Image's σ shift, as ComfyUI (ZImage.sampling_settings) and the Turbo scheduler sample with

PARTS = {
    "qwen3": Part("the Qwen3 text encoder", QWEN3_KEY, "text_encoders.qwen3_4b.transformer."),
    "vae": Part("the VAE", VAE_KEY, "vae.", text_encoder=False),
}
WHERE = ("from models/text_encoders (qwen_3_4b) and models/vae (FLUX's ae.safetensors), as ComfyUI's CLIPLoader "
         "(type lumina2) and VAELoader do")

_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+\."
TARGETS = {
    "attention": rf"{_BLOCKS}attention\.(to_q|to_k|to_v|to_out\.0)",
    "attention_ff": rf"{_BLOCKS}(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))",
    "all": "all-linear",  # the modulations, embedders and final layer too: every Linear ComfyUI maps
}


@dataclass(frozen=True)
class ZImageFiles:
    transformer: Source
    qwen3: Source
    vae: Source


def locate_files(model: ModelConfig) -> ZImageFiles:
    parts = locate_parts(model, PARTS, "Z-Image", WHERE)
    return ZImageFiles(denoiser_source(model.path, CHECKPOINT_PREFIX), parts["qwen3"], parts["vae"])


def transformer_sizes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """ZImageTransformer2DModel's sizes from the tensor shapes (ComfyUI's or diffusers' names, bare)."""
    dim, caption_width = shapes["cap_embedder.1.weight"]
    norm = next(shapes[key] for key in ("layers.0.attention.q_norm.weight", "layers.0.attention.norm_q.weight")
                if key in shapes)
    head = norm[0]
    qkv = shapes.get("layers.0.attention.qkv.weight", (3 * dim,))
    if qkv[0] != 3 * dim or dim % head:
        raise ValueError("Z-Image transformer with grouped key/value heads or an odd head width: not Z-Image's layout")

    def count(prefix: str) -> int:
        return len({key.split(".")[1] for key in shapes if key.startswith(prefix)})

    embedder = shapes.get("x_embedder.weight") or shapes["all_x_embedder.2-1.weight"]
    return {
        "dim": dim, "cap_feat_dim": caption_width, "n_heads": dim // head, "n_kv_heads": dim // head,
        "n_layers": count("layers."), "n_refiner_layers": count("noise_refiner."),
        "in_channels": embedder[1] // 4,
        # Z-Image's rotary axes split its 128-wide heads as 32 + 48 + 48: (1/4, 3/8, 3/8) at any head width
        "axes_dims": [head // 4, head * 3 // 8, head * 3 // 8],
    }


class ZImageFamily(ModelFamily):
    name = "zimage"
    label = "Z-Image"
    base_model_version = "zimage"
    modelspec_architecture = "z-image/lora"
    modelspec_implementation = "https://github.com/Tongyi-MAI/Z-Image"
    max_tokens = TOKENS
    default_resolution = 1024
    pixel_multiple = 16  # 8x VAE, then 2x2 patches
    sample_guidance = 0.0  # Turbo is distilled to sample without classifier-free guidance
    text_encoder_names = {QWEN3: "text encoder (Qwen3)"}
    lora_weight_names = ("lora_A", "lora_B")

    def __init__(self, train: TrainConfig | None = None):
        self.train = train or TrainConfig()

    def for_model(self, model: ModelConfig) -> ZImageFamily:
        return ZImageFamily(self.train)

    def configure(self, train: TrainConfig) -> None:
        check_flow_settings(train, self.label)
        self.train = train

    def objective(self, train: TrainConfig) -> FlowMatchObjective:
        """Logit-normal σ shifted by Z-Image's 3.0 unless told otherwise (the Turbo scheduler's training table
        is shifted the same way)."""
        return FlowMatchObjective(sampling_from(train, SHIFT))

    def check(self, model: ModelConfig) -> None:
        require_family(model.path, self.name)
        locate_files(model)

    def trained_text_encoders(self, lora: LoraConfig) -> list[str]:
        if lora.train_text_encoder or lora.train_text_encoder_2:
            raise ValueError("lora.train_text_encoder: Z-Image's Qwen3 encoder is not trained (no Z-Image loader "
                             "reads a text-encoder LoRA)")
        return []

    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        from diffusers import ZImageTransformer2DModel

        self.check(model)
        files = locate_files(model)
        weights = read_tensors(files.transformer.path, files.transformer.prefix, dtype)
        sizes = transformer_sizes({key: tuple(t.shape) for key, t in weights.items()})
        transformer = ZImageTransformer2DModel.from_single_file(
            weights, config=str(CONFIG_DIR / "transformer"), local_files_only=True, torch_dtype=dtype, **sizes)
        del weights
        qwen3 = qwen3_encoder(read_tensors(files.qwen3.path, files.qwen3.prefix, dtype), CONFIG_DIR / "qwen3_4b.json",
                              f"{files.qwen3.path} (Qwen3)")
        vae = ldm_vae(read_tensors(files.vae.path, files.vae.prefix, dtype), CONFIG_DIR / "vae", dtype)
        cast_vae(vae, dtype)
        encoders = [files.qwen3, files.vae]
        return Components(transformer, vae, {QWEN3: qwen3}, {QWEN3: qwen_tokenizer(model)},
                          self.objective(self.train), sorted({s.path for s in encoders}),
                          tuple(s.prefix for s in encoders if s.path == model.path))

    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = components.tokenizers[QWEN3]
        return {QWEN3: tokenizer([TEMPLATE.format(c) for c in captions], max_length=TOKENS, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids}

    def truncated_captions(self, components: Components, captions: list[str]) -> int:
        tokenizer = components.tokenizers[QWEN3]
        return sum(len(tokenizer(TEMPLATE.format(caption)).input_ids) > TOKENS for caption in captions)

    def encode_prompt(
        self, text_encoders: dict[str, torch.nn.Module], tokens: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Qwen3's second-to-last hidden states (before the final norm) over the caption's tokens, and which
        tokens are the caption's (the rest is padding the transformer never sees), as ComfyUI's Z-Image text
        encoder and diffusers' ZImagePipeline give it."""
        ids = tokens[QWEN3]
        mask = ids != PAD_TOKEN_ID
        hidden = text_encoders[QWEN3](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return {"hidden": hidden, "mask": mask.to(hidden.dtype)}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        framing: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity (noise - picture) for (B, 16, h, w) latents. The model takes lists (one picture of one
        frame, one caption of its own length each), a timestep that is 1 at the clean picture, and predicts
        picture - noise."""
        pictures = list(noisy.unsqueeze(2).unbind(0))  # (C, frames=1, h, w) each
        captions = [hidden[mask > 0.5] for hidden, mask in zip(text["hidden"], text["mask"], strict=True)]
        out = denoiser(pictures, 1 - timesteps.to(noisy.dtype), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def targets(self, prefix: str, preset: str) -> list[str] | str:
        return TARGETS[preset]

    def kohya_name(self, prefix: str, model: torch.nn.Module, module_path: str) -> str:
        return f"diffusion_model.{module_path}"

    def sampling_pipeline(self, components: Components, denoiser: torch.nn.Module) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(CONFIG_DIR / "scheduler", local_files_only=True)
        return ZImagePipeline(scheduler=scheduler, vae=components.vae, text_encoder=components.text_encoders[QWEN3],
                              tokenizer=components.tokenizers[QWEN3], transformer=denoiser)


PAD_TOKEN_ID = 151643  # Qwen's <|endoftext|>: the padding, which no caption template holds


def qwen_tokenizer(model: ModelConfig) -> Any:
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(find_qwen_tokenizer_dir(model), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = TOKENS
    return tokenizer


ZIMAGE = ZImageFamily()
