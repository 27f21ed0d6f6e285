"""Which samples form each batch, and every random draw of a sample, as pure functions of the seed.

A sample's noise, timestep and flip depend only on (seed, epoch, slot), never on the process that trains
it, so one process with the global batch and N processes each with a slice give the same LoRA.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = ((value ^ (part & _MASK)) * _MIX + 0x632BE59BD9B4E019) & _MASK
    return value


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class Slot:
    """One sample of a global batch: which cached item, and its place in the epoch's draw order."""

    item: int
    slot: int


class EpochPlan:
    """Global batches for one epoch: single-bucket, of exactly `global_batch` samples, in seeded order.

    The epoch's samples are every item `repeats` times. A bucket whose count does not divide the batch size
    fills its last batch by wrapping around its own samples, so every batch is full and the split across
    processes is always even.
    """

    def __init__(self, buckets: list[tuple[int, int]], repeats: int, global_batch: int, seed: int):
        self.buckets = buckets
        self.repeats = repeats
        self.global_batch = global_batch
        self.seed = seed
        self.batches_per_epoch = sum(math.ceil(n / global_batch) for n in self._bucket_sizes().values())

    def _bucket_sizes(self) -> dict[tuple[int, int], int]:
        sizes: dict[tuple[int, int], int] = defaultdict(int)
        for bucket in self.buckets:
            sizes[bucket] += self.repeats
        return sizes

    def batches(self, epoch: int) -> list[list[Slot]]:
        samples = [i for i in range(len(self.buckets)) for _ in range(self.repeats)]
        order = torch.randperm(len(samples), generator=generator(self.seed, epoch, 1)).tolist()
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for position in order:
            item = samples[position]
            by_bucket[self.buckets[item]].append(item)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            for start in range(0, len(members), self.global_batch):
                batches.append([members[(start + k) % len(members)] for k in range(self.global_batch)])
        batch_order = torch.randperm(len(batches), generator=generator(self.seed, epoch, 2)).tolist()
        ordered = [batches[i] for i in batch_order]
        return [
            [Slot(item, b * self.global_batch + k) for k, item in enumerate(batch)]
            for b, batch in enumerate(ordered)
        ]


@dataclass
class SampleDraw:
    noise: torch.Tensor
    timestep: int
    flip: bool


def draw(
    seed: int, epoch: int, slot: int, latent_shape: tuple[int, ...], timesteps: int, noise_offset: float
) -> SampleDraw:
    g = generator(seed, epoch, 3, slot)
    noise = torch.randn(latent_shape, generator=g)
    timestep = int(torch.randint(0, timesteps, (1,), generator=g))
    flip = bool(torch.rand(1, generator=g) < 0.5)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=g)
    return SampleDraw(noise, timestep, flip)
