"""The flow-matching objective (trainer/families/flow.py): σ from the seeded integer draw through each density,
the shifts the DiT families sample with, and the straight-line noising and its velocity target."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.families.flow import BINS, FlowMatchObjective, TimestepSampling, shift_for_tokens

ALL_BINS = torch.arange(BINS)


def sigmas(**sampling) -> torch.Tensor:
    return FlowMatchObjective(TimestepSampling(**sampling)).timesteps(ALL_BINS)


def test_uniform_sigmas_are_the_bin_centres() -> None:
    values = sigmas()
    assert values.dtype == torch.float32
    assert torch.allclose(values, (ALL_BINS + 0.5) / BINS)
    assert 0 < values.min() and values.max() < 1


def test_logit_normal_sigmas_follow_the_logit_normal_density() -> None:
    values = sigmas(density="logit_normal", logit_mean=0.3, logit_std=0.8).double()
    assert torch.all(values[1:] > values[:-1])  # a quantile transform: order kept, no ties
    assert values.median().item() == pytest.approx(1 / (1 + math.exp(-0.3)), abs=2e-3)
    # Kolmogorov-Smirnov distance to a large Monte Carlo logit-normal sample
    reference = torch.sigmoid(0.3 + 0.8 * torch.randn(200_000, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)).sort().values
    empirical = torch.searchsorted(reference, values).double() / len(reference)
    assert (empirical - (ALL_BINS + 0.5) / BINS).abs().max().item() < 0.01


def test_a_fixed_shift_moves_sigma_towards_the_noise() -> None:
    plain, shifted = sigmas(), sigmas(shift=3.0)
    assert shifted[BINS // 2].item() == pytest.approx(3 * 0.5005 / (1 + 2 * 0.5005), rel=1e-6)
    assert torch.all(shifted >= plain)


def test_flux_resolution_shift_matches_diffusers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert shift_for_tokens(4096) == pytest.approx(math.exp(1.15))
    assert shift_for_tokens(256) == pytest.approx(math.exp(0.5))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    objective = FlowMatchObjective(TimestepSampling(resolution_shift=True))
    for side in (32, 64, 128):  # latent sides of 256, 512 and 1024 px: 256, 1024 and 4096 tokens of 2x2
        tokens = (side // 2) ** 2
        mu = calculate_shift(tokens)
        ours = objective.timesteps(ALL_BINS, (16, side, side)).double()
        theirs = scheduler.time_shift(mu, 1.0, (ALL_BINS.double() + 0.5) / BINS)
        assert (ours - theirs).abs().max().item() < 1e-6


def test_a_wider_bucket_is_shifted_towards_noise() -> None:
    objective = FlowMatchObjective(TimestepSampling(resolution_shift=True))
    square, wide = objective.timesteps(ALL_BINS, (16, 64, 64)), objective.timesteps(ALL_BINS, (16, 64, 128))
    assert torch.all(wide[1:-1] > square[1:-1])


def test_the_target_is_the_velocity_of_the_straight_line() -> None:
    objective = FlowMatchObjective(TimestepSampling())
    g = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    early, late = torch.tensor([0.2, 0.6]), torch.tensor([0.7, 0.9])
    start = objective.noisy(latents, noise, early)
    step = (late - early).reshape(-1, 1, 1, 1)
    # moving along the target from σ to σ' lands on the noisy latents at σ'
    assert torch.allclose(start + step * objective.target(latents, noise, early), objective.noisy(latents, noise, late),
                          atol=1e-6)
    assert torch.equal(objective.noisy(latents, noise, torch.zeros(2)), latents)
    assert torch.equal(objective.noisy(latents, noise, torch.ones(2)), noise)
