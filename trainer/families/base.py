"""What differs per model family, behind one small interface: a family is one module implementing it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any  # a diffusers DDPMScheduler configured for training
    source_hash_inputs: list[str]  # files whose bytes identify the VAE + text encoder (cache key)
    # for a single file that also holds the UNet: the tensor-name prefixes of the VAE + text encoder, so
    # only their bytes are hashed (empty: hash the whole files)
    source_hash_prefixes: tuple[str, ...] = ()


class ModelFamily(ABC):
    name: str
    base_model_version: str  # ss_base_model_version, as kohya writes it
    modelspec_architecture: str  # modelspec.architecture of a LoRA for this family
    max_tokens: int  # the text encoder's context, start and end tokens included
    lora_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}

    @abstractmethod
    def check(self, model: ModelConfig) -> None:
        """Raise a ValueError naming what the base model looks like when it is not this family."""

    @abstractmethod
    def load(self, model: ModelConfig, dtype: torch.dtype) -> Components:
        """Load the frozen components on the CPU in `dtype`, offline."""

    @abstractmethod
    def tokenize(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        """Token ids, padded/truncated to the text encoder's context."""

    @abstractmethod
    def encode_text(self, text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's conditioning for the given token ids."""

    @abstractmethod
    def predict(
        self, unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction (noise or velocity) for a batch."""

    @abstractmethod
    def unet_targets(self, preset: str) -> list[str] | str:
        """peft target_modules for the UNet and a target preset."""

    @abstractmethod
    def text_encoder_targets(self, preset: str) -> list[str]:
        """peft target_modules for the text encoder and a target preset."""

    @abstractmethod
    def sampling_pipeline(self, components: Components, unet: torch.nn.Module) -> Any:
        """A diffusers pipeline for validation samples built from the loaded components."""
