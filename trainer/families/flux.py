"""FLUX.1 (dev and schnell): a flow-matching transformer on 2x2-packed 16-channel latents, conditioned on T5's
hidden states and CLIP-L's pooled output (and, for the guidance-distilled dev, a guidance value).

The files are read as ComfyUI users keep them: the transformer from models/diffusion_models (Black Forest
Labs' layout, flux_layout.py), CLIP-L and T5 from models/text_encoders, the VAE from models/vae; or all of them
from one all-in-one checkpoint; or a diffusers folder. The LoRA is written in diffusers' peft layout
(`transformer.<module>.lora_A/B.weight` + `.alpha`), the one every FLUX loader reads: ComfyUI maps each name onto
its fused projections, diffusers loads it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LoraConfig, ModelConfig, TrainConfig
from ..weights import weight_files
from . import flux_layout
from .base import DENOISER, Components, ModelFamily, cast_vae
from .component_files import (
    CLIP_L_KEY,
    T5_KEY,
    VAE_KEY,
    Part,
    Source,
    build_with_weights,
    clip_text_model,
    denoiser_source,
    folder_models,
    ldm_vae,
    locate_parts,
    read_tensors,
    t5_encoder,
    tensor_shapes,
)
from .detect import is_diffusers_folder, require_family
from .flow import FlowMatchObjective, check_flow_settings, sampling_from
from .sd15 import TEXT_ATTENTION, TEXT_MLP
from .tokenizers import clip_tokenizer, find_t5_tokenizer_dir, find_tokenizer_dir, tokenize

CONFIG_DIR = Path(__file__).parent / "flux_config"
CLIP_L = "lora_te1"  # pooled output: the `vector_in` conditioning
T5 = "lora_te2"  # last hidden states: the text tokens of the joint attention
CLIP_TOKENS = 77
# T5 tokens per caption, as FLUX.1 was trained (and kohya trains): 512 for dev, 256 for schnell
T5_TOKENS = {"dev": 512, "schnell": 256}

_DOUBLE_ATTENTION = (r"transformer_blocks\.\d+\.attn\."
                     r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
_SINGLE_ATTENTION = r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"
_DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
_SINGLE_MLP = r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"  # not the model's final proj_out
# peft matches a string target as a full-name regex
TARGETS = {
    "attention": f"({_DOUBLE_ATTENTION}|{_SINGLE_ATTENTION})",
    "attention_ff": f"({_DOUBLE_ATTENTION}|{_SINGLE_ATTENTION}|{_DOUBLE_MLP}|{_SINGLE_MLP})",
    "all": "all-linear",  # the blocks' modulations and the embedders too: every Linear ComfyUI maps
}


PARTS = {
    "clip_l": Part("the CLIP-L text encoder", CLIP_L_KEY, "text_encoders.clip_l.transformer."),
    "t5": Part("the T5 text encoder", T5_KEY, "text_encoders.t5xxl.transformer."),
    "vae": Part("the VAE", VAE_KEY, "vae.", text_encoder=False),
}
WHERE = ("from models/text_encoders (clip_l and t5xxl) and models/vae (ae.safetensors), as ComfyUI's "
         "DualCLIPLoader and VAELoader do")


@dataclass(frozen=True)
class FluxFiles:
    transformer: Source
    clip_l: Source
    t5: Source
    vae: Source

    def encoders(self) -> list[Source]:
        return [self.clip_l, self.t5, self.vae]


def locate_files(model: ModelConfig) -> FluxFiles:
    """Each component's file (component_files.locate_parts); UnsupportedModelError naming what is missing."""
    parts = locate_parts(model, PARTS, "FLUX.1", WHERE)
    return FluxFiles(denoiser_source(model.path, flux_layout.CHECKPOINT_PREFIX), parts["clip_l"], parts["t5"],
                     parts["vae"])


def variant_of(model: ModelConfig) -> str:
    """dev (a guidance input) or schnell (none), read from the transformer's weights."""
    if is_diffusers_folder(model.path):
        from diffusers import FluxTransformer2DModel

        config = FluxTransformer2DModel.load_config(Path(model.path) / "transformer", local_files_only=True)
        return "dev" if config.get("guidance_embeds") else "schnell"
    keys = tensor_shapes(model.path)
    guided = any(key.endswith("guidance_in.in_layer.weight") for key in keys)
    return "dev" if guided else "schnell"


class FluxFamily(ModelFamily):
    name = "flux"
    label = "FLUX.1"
    base_model_version = "flux1"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    max_tokens = T5_TOKENS["dev"]
    default_resolution = 1024
    pixel_multiple = 16  # 8x VAE, then 2x2 patches
    sample_guidance = 3.5  # dev's distilled guidance, as ComfyUI's FluxGuidance defaults to (schnell ignores it)
    text_encoder_names = {CLIP_L: "text encoder 1 (CLIP-L)", T5: "text encoder 2 (T5-XXL)"}
    lora_weight_names = ("lora_A", "lora_B")

    def __init__(self, variant: str = "dev", train: TrainConfig | None = None):
        self.variant = variant
        self.train = train or TrainConfig()
        self.max_tokens = T5_TOKENS[variant]
        self.modelspec_architecture = f"flux-1-{variant}/lora"

    def for_model(self, model: ModelConfig) -> FluxFamily:
        return FluxFamily(variant_of(model), self.train)

    def configure(self, train: TrainConfig) -> None:
        check_flow_settings(train, self.label)
        self.train = train

    def objective(self, train: TrainConfig) -> FlowMatchObjective:
        """The σ draw: FLUX.1 dev's by resolution (as it samples), schnell's unshifted, unless told otherwise;
        logit-normal by default (SD3's finding, kohya's and ai-toolkit's default for FLUX)."""
        return FlowMatchObjective(sampling_from(train, 1.0, own_resolution_shift=self.variant == "dev"))

    def check(self, model: ModelConfig) -> None:
        require_family(model.path, self.name)
        if not is_diffusers_folder(model.path):
            locate_files(model)

    def trained_text_encoders(self, lora: LoraConfig) -> list[str]:
        if lora.train_text_encoder_2:
            raise ValueError("lora.train_text_encoder_2: FLUX.1's T5 is not trained (no FLUX loader reads a T5 "
                             "LoRA the same way); train_text_encoder trains CLIP-L")
        return [CLIP_L] if lora.train_text_encoder else []

    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        self.check(model)
        clip_folder = find_tokenizer_dir(model)
        tokenizers = {CLIP_L: clip_tokenizer(clip_folder, CLIP_TOKENS), T5: _t5_tokenizer(model, self.max_tokens)}
        if is_diffusers_folder(model.path):
            transformer, vae, clip, t5 = _load_folder(Path(model.path), dtype)
            hash_inputs = weight_files(Path(model.path), ("vae", "text_encoder", "text_encoder_2"))
            hash_prefixes: tuple[str, ...] = ()
        else:
            files = locate_files(model)
            transformer, vae, clip, t5 = _load_files(files, dtype)
            hash_inputs = sorted({source.path for source in files.encoders()})
            # an all-in-one file: only its encoders' bytes decide the cache
            hash_prefixes = tuple(s.prefix for s in files.encoders() if s.path == model.path)
        cast_vae(vae, dtype)
        return Components(transformer, vae, {CLIP_L: clip, T5: t5}, tokenizers,
                          self.objective(self.train), hash_inputs, hash_prefixes)

    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        return {CLIP_L: tokenize(components.tokenizers[CLIP_L], captions, CLIP_TOKENS),
                T5: tokenize(components.tokenizers[T5], captions, self.max_tokens)}

    def truncated_captions(self, components: Components, captions: list[str]) -> int:
        tokenizer = components.tokenizers[T5]  # CLIP-L's 77 only shape the pooled vector; T5 carries the text
        return sum(len(tokenizer(caption).input_ids) > self.max_tokens for caption in captions)

    def encode_prompt(
        self, text_encoders: dict[str, torch.nn.Module], tokens: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """T5's last hidden states (512 x 4096) and CLIP-L's pooled output (768), what ComfyUI's FLUX text
        encoder and diffusers' FluxPipeline give the transformer (no attention mask, as both)."""
        pooled = text_encoders[CLIP_L](tokens[CLIP_L], output_hidden_states=False).pooler_output
        hidden = text_encoders[T5](tokens[T5], output_hidden_states=False).last_hidden_state
        return {"hidden": hidden, "pooled": pooled}

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        framing: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity for (B, 16, h, w) latents: packed into (h/2 · w/2) tokens of 2x2 patches with their
        (0, row, column) positions, the timestep as σ in [0, 1] (the model scales it by 1000 itself)."""
        batch, channels, height, width = noisy.shape
        packed = (noisy.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
                  .reshape(batch, (height // 2) * (width // 2), channels * 4))
        image_ids = image_positions(height // 2, width // 2, noisy.device)
        text_ids = torch.zeros(text["hidden"].shape[1], 3, device=noisy.device)
        config = _config(denoiser)
        guidance = (torch.full((batch,), self.train.guidance, device=noisy.device)
                    if config.guidance_embeds else None)  # schnell has no guidance input at all
        out = denoiser(hidden_states=packed, encoder_hidden_states=text["hidden"], pooled_projections=text["pooled"],
                       timestep=timesteps.to(noisy.dtype), img_ids=image_ids, txt_ids=text_ids, guidance=guidance,
                       return_dict=False)[0]
        return (out.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
                .reshape(batch, channels, height, width))

    def targets(self, prefix: str, preset: str) -> list[str] | str:
        if prefix == DENOISER:
            return TARGETS[preset]
        return TEXT_ATTENTION if preset == "attention" else TEXT_ATTENTION + TEXT_MLP

    def dora_scale_rows(self, prefix: str, module_path: str, scale: torch.Tensor) -> torch.Tensor:
        # diffusers' norm_out.linear holds (scale, shift) and BFL's final adaLN (shift, scale): ComfyUI swaps the
        # delta's halves but divides the weight it swapped by the dora_scale as written
        if prefix == DENOISER and module_path == flux_layout.DIFFUSERS_FINAL_MODULATION:
            return flux_layout.swap_halves(scale)
        return scale

    def kohya_name(self, prefix: str, model: torch.nn.Module, module_path: str) -> str:
        if prefix == DENOISER:
            return f"transformer.{module_path}"
        clip_path = module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
        return f"text_encoder.{clip_path}"

    def sampling_pipeline(self, components: Components, denoiser: torch.nn.Module) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(CONFIG_DIR / f"scheduler_{self.variant}",
                                                                    local_files_only=True)
        return FluxPipeline(
            scheduler=scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[CLIP_L],
            tokenizer=components.tokenizers[CLIP_L],
            text_encoder_2=components.text_encoders[T5],
            tokenizer_2=components.tokenizers[T5],
            transformer=denoiser,
        )


def image_positions(rows: int, columns: int, device: torch.device | str) -> torch.Tensor:
    """(rows · columns, 3) position ids of the image tokens: (0, row, column), as FLUX.1 was trained with."""
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)


def _config(denoiser: torch.nn.Module) -> Any:
    return getattr(denoiser, "module", denoiser).config  # under DDP the model is wrapped


def _t5_tokenizer(model: ModelConfig, max_tokens: int) -> Any:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(find_t5_tokenizer_dir(model), local_files_only=True)
    tokenizer.model_max_length = max_tokens
    return tokenizer


def _load_files(files: FluxFiles, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
    from diffusers import FluxTransformer2DModel

    bfl = flux_layout.strip_prefix(read_tensors(files.transformer.path, files.transformer.prefix, dtype))
    config = flux_layout.transformer_config({key: tuple(t.shape) for key, t in bfl.items()})
    weights = flux_layout.to_diffusers(bfl)
    del bfl
    transformer = build_with_weights(lambda: FluxTransformer2DModel(**config), weights,
                                     f"{files.transformer.path} (FLUX.1 transformer)")
    del weights
    vae = ldm_vae(read_tensors(files.vae.path, files.vae.prefix, dtype), CONFIG_DIR / "vae", dtype)
    clip = clip_text_model(read_tensors(files.clip_l.path, files.clip_l.prefix, dtype), CONFIG_DIR / "clip_l.json",
                           f"{files.clip_l.path} (CLIP-L)")
    t5 = t5_encoder(read_tensors(files.t5.path, files.t5.prefix, dtype), CONFIG_DIR / "t5xxl.json",
                    f"{files.t5.path} (T5)")
    return transformer, vae, clip, t5


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    transformer, vae, clip, t5 = folder_models(path, dtype, {
        "transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel})
    return transformer, vae, clip, t5


FLUX = FluxFamily()
