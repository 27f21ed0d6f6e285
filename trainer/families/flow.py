"""The flow-matching objective of the DiT families (FLUX, Z-Image ...): the noisy latents are the straight line
x_t = (1 - σ) x_0 + σ ε between the picture and the noise, and the model learns the velocity ε - x_0.

σ comes from the same seeded integer draw as the DDPM families' timesteps (trainer/schedule.py): the integer's
bin centre u = (k + ½) / N in (0, 1) goes through the inverse CDF of the chosen density, so every sampling scheme
stays a pure function of the seed, the epoch and the slot (what makes N processes equal one and a resume equal
an uninterrupted run). The schemes are the ones the reference trainers offer:

- `uniform`: σ = u;
- `logit_normal`: σ = sigmoid(m + s Φ⁻¹(u)), SD3's and diffusers' `logit_normal` weighting (m = 0, s = 1 by
  default); kohya's and ai-toolkit's `sigmoid` is the same density with m = 0;
- then an optional shift, σ' = shift σ / (1 + (shift - 1) σ): a fixed one (Z-Image's 3.0, SD3's 3.0), or FLUX's
  resolution-dependent one, exp(μ) with μ linear in the number of image tokens from 0.5 at 256 tokens to 1.15
  at 4096 (what FLUX.1 dev samples with, as ComfyUI's ModelSamplingFlux and diffusers' calculate_shift do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import TrainConfig
from .base import Objective

Density = Literal["uniform", "logit_normal"]
BINS = 1000  # the draw's integers: σ at 1000 bin centres, as fine as the DDPM families' timesteps
# FLUX's resolution-dependent shift: μ from (tokens, μ) = (256, 0.5) to (4096, 1.15), linear in the tokens
BASE_TOKENS, BASE_SHIFT, MAX_TOKENS, MAX_SHIFT = 256, 0.5, 4096, 1.15


@dataclass(frozen=True)
class TimestepSampling:
    density: Density = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # a fixed shift; 1 leaves σ alone
    resolution_shift: bool = False  # FLUX: the shift follows the number of image tokens (replaces `shift`)


def sampling_from(train: TrainConfig, own_shift: float, own_resolution_shift: bool = False) -> TimestepSampling:
    """The σ draw the config asks for: `auto` is logit-normal, `sigmoid` logit-normal at mean 0 (kohya's); a
    `train.timestep_shift` of 0 keeps the family's own shift (fixed, or by resolution), any other is fixed."""
    sampling = train.timestep_sampling
    return TimestepSampling(
        density="logit_normal" if sampling in ("auto", "sigmoid") else sampling,
        logit_mean=0.0 if sampling == "sigmoid" else train.logit_mean,
        logit_std=train.logit_std,
        shift=train.timestep_shift or own_shift,
        resolution_shift=own_resolution_shift and not train.timestep_shift,
    )


def check_flow_settings(train: TrainConfig, family_label: str) -> None:
    if train.min_snr_gamma:
        raise ValueError("train.min_snr_gamma: min-SNR weighting is for noise-prediction (DDPM) models; "
                         f"{family_label} is trained with flow matching (set it to 0)")


def shift_for_tokens(image_tokens: int) -> float:
    """FLUX's shift exp(μ) for a latent of `image_tokens` patches (1024 px: 4096 tokens, shift e^1.15)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return math.exp(BASE_SHIFT + slope * (image_tokens - BASE_TOKENS))


def shifted(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchObjective(Objective):
    """Rectified-flow training: noisy = (1 - σ) x0 + σ ε, target = ε - x0 (what FLUX and Z-Image predict)."""

    num_timesteps = BINS

    def __init__(self, sampling: TimestepSampling, patch: int = 2):
        """`patch`: the side of the latent patch one image token covers (the resolution shift counts tokens)."""
        self.sampling = sampling
        self.patch = patch

    def shift_for(self, latent_shape: tuple[int, ...]) -> float:
        """The shift for latents of `latent_shape` (C, h, w): FLUX's by image tokens, or the fixed one."""
        if not self.sampling.resolution_shift:
            return self.sampling.shift
        return shift_for_tokens((latent_shape[-2] // self.patch) * (latent_shape[-1] // self.patch))

    @property
    def prediction_type(self) -> str:
        return "flow"

    def timesteps(self, drawn: torch.Tensor, latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """σ in (0, 1) per sample (float32), from integers drawn uniformly from [0, BINS)."""
        u = (drawn.double() + 0.5) / BINS
        if self.sampling.density == "logit_normal":
            normal = math.sqrt(2) * torch.special.erfinv(2 * u - 1)  # Φ⁻¹(u)
            sigmas = torch.sigmoid(self.sampling.logit_mean + self.sampling.logit_std * normal)
        else:
            sigmas = u
        return shifted(sigmas, self.shift_for(latent_shape)).float()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = _per_sample(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def loss_weights(self, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        """Plain mean: the density already weights the timesteps (min-SNR is a DDPM weighting, refused by the
        config for these families)."""
        return None


def _per_sample(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return timesteps.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
