"""What differs per model family, behind one interface: a family is one module implementing `ModelFamily`.

The loop knows a family only through this file. A family names its trainable parts by their LoRA prefix
(`lora_unet` → the UNet or transformer, `lora_te1` / `lora_te2` → text encoders ...); the adapters, the
optimizer's groups, checkpoints, resume, the kohya writer and freeing memory all iterate over those parts.
Prompt encodings are dicts of tensors (hidden states, pooled output ...), cached as they are; each sample
carries its framing (original size, crop, target size) for families that condition on it; and the family owns
its noise schedule and training target (`Objective`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LoraConfig, ModelConfig, TrainConfig

DENOISER = "lora_unet"  # the LoRA prefix of the denoiser in every family's kohya keys


class Objective(ABC):
    """The noise schedule and the training target of a family: what the denoiser learns to predict."""

    num_timesteps: int

    @abstractmethod
    def timesteps(self, drawn: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The timesteps the denoiser sees for integers drawn uniformly from [0, num_timesteps), for a batch of
        latents of `latent_shape` (C, h, w) (a resolution-dependent shift reads the size)."""

    @abstractmethod
    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The latents with noise added at each sample's timestep."""

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the prediction is compared with."""

    @abstractmethod
    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample loss weights (min-SNR and the like), or None for a plain mean."""

    @property
    @abstractmethod
    def prediction_type(self) -> str:
        """What the model predicts, as modelspec and kohya metadata name it ("epsilon", "v_prediction" ...)."""


@dataclass
class Components:
    """The loaded, frozen model of one family: every part on the CPU, each in its own dtype."""

    denoiser: torch.nn.Module  # the UNet or transformer
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # LoRA prefix -> text encoder, in the family's order
    tokenizers: dict[str, Any]  # LoRA prefix of the encoder it feeds -> tokenizer
    objective: Objective
    source_hash_inputs: list[str]  # files whose bytes identify the VAE + text encoders (cache key)
    # for a single file that also holds the denoiser: the tensor-name prefixes of the VAE + text encoders, so
    # only their bytes are hashed (empty: hash the whole files)
    source_hash_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for module in (self.denoiser, self.vae, *self.text_encoders.values()):  # frozen, in inference mode
            module.requires_grad_(False)
            module.train(False)

    def parts(self) -> dict[str, torch.nn.Module]:
        """Every model, by LoRA prefix: the denoiser first, then the text encoders."""
        return {DENOISER: self.denoiser, **self.text_encoders}


def cast_vae(vae: torch.nn.Module, dtype: torch.dtype) -> None:
    """The VAE in the training dtype, but fp32 for fp16: the SDXL and FLUX VAEs overflow in fp16 (NaN latents);
    bf16 has fp32's range."""
    wanted = torch.float32 if dtype == torch.float16 else dtype
    if vae.dtype != wanted:
        vae.to(wanted)


class ModelFamily(ABC):
    name: str  # the config's model.family
    label: str  # what users call it, in messages
    base_model_version: str  # ss_base_model_version, as kohya writes it
    modelspec_architecture: str  # modelspec.architecture of a LoRA for this family
    modelspec_implementation: str  # modelspec.implementation, as kohya's sai_model_spec writes it
    max_tokens: int  # the text encoders' context, start and end tokens included
    default_resolution: int  # the side of the square bucket the family was trained at
    pixel_multiple: int = 8  # picture sides must be multiples of this (the VAE's downscale, times a patch)
    sample_guidance: float = 7.5  # the guidance scale validation samples are drawn at, unless told otherwise
    text_encoder_names: dict[str, str]  # LoRA prefix -> what users call that encoder
    # what the family's loaders call a LoRA layer's down and up matrices in the file (kohya's names, or
    # diffusers' peft names lora_A / lora_B where those are what every loader of the family reads)
    lora_weight_names: tuple[str, str] = ("lora_down", "lora_up")

    def for_model(self, model: ModelConfig) -> ModelFamily:
        """The family as it trains this base model: itself, or a variant read from the weights (FLUX.1 dev or
        schnell) whose metadata and conditioning differ."""
        return self

    @abstractmethod
    def check(self, model: ModelConfig) -> None:
        """Raise a ValueError naming what the base model looks like when it is not this family."""

    @abstractmethod
    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        """Load the frozen components on the CPU, offline: the denoiser and text encoders in `dtype`, the VAE in
        the dtype it is exact in."""

    def trained_text_encoders(self, lora: LoraConfig) -> list[str]:
        """The prefixes of the text encoders the config trains, in the family's order."""
        chosen = [lora.train_text_encoder, lora.train_text_encoder_2]
        prefixes = list(self.text_encoder_names)
        wanted = [prefix for prefix, on in zip(prefixes, chosen, strict=False) if on]
        if lora.train_text_encoder_2 and len(prefixes) < 2:
            raise ValueError(f"lora.train_text_encoder_2: {self.label} has one text encoder")
        return wanted

    def learning_rate(self, prefix: str, train: TrainConfig) -> float:
        """The learning rate of one trainable part: the text encoders may have their own."""
        if prefix == DENOISER:
            return train.learning_rate
        first = train.text_encoder_learning_rate or train.learning_rate
        if list(self.text_encoder_names).index(prefix) == 1:
            return train.text_encoder_2_learning_rate or first
        return first

    @abstractmethod
    def targets(self, prefix: str, preset: str) -> list[str] | str:
        """peft target_modules of one trainable part for a target preset."""

    def dora_scale_rows(self, prefix: str, module_path: str, scale: torch.Tensor) -> torch.Tensor:
        """A DoRA magnitude in the row order the loaders apply it in: ComfyUI permutes a LoRA's delta to its
        own layout of a weight, but not the `dora_scale` beside it; the same order as the trained module's in
        most families."""
        return scale

    def part_name(self, prefix: str) -> str:
        """What users call a trainable part, in messages."""
        return self.text_encoder_names.get(prefix, f"{self.label} denoiser")

    def conv_targets(self, prefix: str) -> str | None:
        """The convolutions LoCon adds (a peft full-name regex), or None where the part has none to adapt."""
        return None

    def check_adapter(self, lora: LoraConfig) -> None:
        """Refuse, before anything loads, an adapter the family cannot take."""
        if lora.adapter == "locon" and self.conv_targets(DENOISER) is None:
            raise ValueError(f"lora.adapter 'locon': the {self.label} denoiser has no convolutions to adapt; "
                             "use 'lora'")

    def adapter_targets(self, prefix: str, lora: LoraConfig) -> list[str] | str:
        """peft target_modules of one part for the config's preset and adapter: LoCon adds the convolutions."""
        targets = self.targets(prefix, lora.targets)
        if lora.adapter != "locon" or prefix != DENOISER:
            return targets
        self.check_adapter(lora)
        conv = self.conv_targets(prefix)
        if isinstance(targets, str):
            return f"({targets})|({conv})"
        # a list target matches a module whose name is it or ends in "." + it (peft); as one regex
        names = "|".join(re.escape(target) for target in targets)
        return rf"((.*\.)?({names}))|({conv})"

    @abstractmethod
    def kohya_name(self, prefix: str, model: torch.nn.Module, module_path: str) -> str:
        """The key stem of a module of one part (`model`) in the LoRA file (`lora_unet_...` for the UNet
        families), as ComfyUI, A1111/Forge, kohya and diffusers read it for this family."""

    def truncated_captions(self, components: Components, captions: list[str]) -> int:
        """How many captions are longer than the text encoders' context (they are cut to it)."""
        tokenizer = next(iter(components.tokenizers.values()))
        return sum(len(tokenizer(caption).input_ids) > self.max_tokens for caption in captions)

    def configure(self, train: TrainConfig) -> None:
        """Take the training settings the family's conditioning depends on (FLUX dev's guidance input) before
        the first `predict`; nothing for most families."""
        return None

    @abstractmethod
    def tokenize(self, components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for each text encoder (encoder prefix -> (batch, tokens)), padded/truncated to the context."""

    @abstractmethod
    def encode_prompt(
        self, text_encoders: dict[str, torch.nn.Module], tokens: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What the denoiser is conditioned on, as named tensors with a batch dimension first. The tokens are on
        the encoders' device already (an encoder may be wrapped for distributed training)."""

    @abstractmethod
    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        framing: torch.Tensor,
    ) -> torch.Tensor:
        """The denoiser's prediction for a batch; `framing` is (batch, 6): original height and width, crop top
        and left, target height and width, in pixels."""

    @abstractmethod
    def sampling_pipeline(self, components: Components, denoiser: torch.nn.Module) -> Any:
        """A diffusers pipeline for validation samples built from the loaded components."""
