"""The DDPM objective of the UNet families (SD 1.5, SDXL): discrete timesteps, ε or v prediction, min-SNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .base import Objective


class DDPMObjective(Objective):
    """Noise added by diffusers' DDPMScheduler; the target is the noise (ε) or the velocity (v)."""

    def __init__(self, scheduler: Any):  # a diffusers DDPMScheduler
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps

    @classmethod
    def from_config_dir(cls, scheduler_dir: Path, model: ModelConfig) -> DDPMObjective:
        """The scheduler of `scheduler_dir` (a diffusers scheduler folder), with the model's overrides: its
        prediction type, and the zero-terminal-SNR rescale v-prediction fine-tunes are trained with."""
        from diffusers import DDPMScheduler  # here: the nodes import the families without training

        scheduler = DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
        overrides = {}
        if model.prediction_type:
            overrides["prediction_type"] = model.prediction_type
        if model.zero_terminal_snr:
            overrides["rescale_betas_zero_snr"] = True
        if overrides:
            # rebuilding (not register_to_config) recomputes the betas for the rescale
            scheduler = DDPMScheduler.from_config(scheduler.config, **overrides)
        return cls(scheduler)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def timesteps(self, drawn: torch.Tensor, latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        return drawn.long()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        if not min_snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clamped = torch.clamp(snr, max=min_snr_gamma)
        # with zero terminal SNR the last timestep's SNR is 0: its ε weight would divide by zero
        if self.prediction_type == "v_prediction":
            return clamped / (snr + 1)
        return clamped / snr.clamp(min=1e-8)
