"""The optimizers a run can use, the learning-rate schedules each one takes, and the learning rate it is at.

AdamW and AdamW8bit take any schedule. The others bring their own idea of the step size, so some schedules
make no sense for them and are refused in the config (`schedule_problems`) before anything loads:
- Prodigy estimates the step size itself; `learning_rate` is a multiplier of that estimate (1.0 usually).
- Adafactor with the `adafactor` schedule uses its relative step (the learning rate follows 1/sqrt(step));
  with any other schedule it runs at the given learning rate.
- Schedule-free AdamW replaces the schedule by averaging: only a constant rate, warmed up by the optimizer.
  It trains at one point and is evaluated at the average, so whatever reads the weights (the LoRA file,
  checkpoints, samples) does so inside `averaged_weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the config checks its optimizer settings here: no import cycle at run time
    from .config import TrainConfig

# the schedules schedule-free AdamW takes: its own warmup replaces a schedule's
SCHEDULE_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def schedule_problems(t: TrainConfig) -> list[str]:
    """The optimizer / schedule pairs that make no sense, one message each."""
    problems = []
    if t.lr_scheduler == "adafactor" and t.optimizer != "adafactor":
        problems.append(f"train.lr_scheduler: 'adafactor' is Adafactor's own relative step; the optimizer is "
                        f"{t.optimizer!r}")
    if t.optimizer == "adafactor" and t.lr_scheduler == "adafactor":
        if t.lr_warmup_steps:
            problems.append("train.lr_warmup_steps: Adafactor's relative step has its own warmup; use 0")
        if t.text_encoder_learning_rate is not None or t.text_encoder_2_learning_rate is not None:
            problems.append("train.text_encoder_learning_rate: Adafactor's relative step sets every learning "
                            "rate itself; leave it unset or choose another lr_scheduler")
    if t.optimizer == "adamw_schedulefree" and t.lr_scheduler not in SCHEDULE_FREE_SCHEDULES:
        problems.append(f"train.lr_scheduler: schedule-free AdamW replaces the schedule by averaging; use "
                        f"'constant' (with lr_warmup_steps for a warmup), not {t.lr_scheduler!r}")
    if t.optimizer == "prodigy" and not 0.1 <= t.learning_rate <= 10:
        problems.append(f"train.learning_rate: Prodigy finds the step size itself and multiplies it by the "
                        f"learning rate; use about 1.0 (got {t.learning_rate:g})")
    return problems


def make_optimizer(t: TrainConfig, groups: list[dict[str, Any]], on_cuda: bool) -> torch.optim.Optimizer:
    """The optimizer over parameter groups ({"params", "lr"}: one per trained part)."""
    betas, decay, eps = (t.adam_beta1, t.adam_beta2), t.weight_decay, t.adam_epsilon
    if t.optimizer == "adamw8bit":
        if not on_cuda:
            raise RuntimeError("optimizer 'adamw8bit' (bitsandbytes) needs a CUDA GPU; use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from exc
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=decay, eps=eps)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # bias correction keeps the first steps of a short LoRA run from overshooting; safeguard_warmup is what
        # Prodigy's authors advise whenever the learning rate is warmed up
        return Prodigy(groups, betas=betas, weight_decay=decay, eps=eps, use_bias_correction=True,
                       safeguard_warmup=t.lr_warmup_steps > 0)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        if t.lr_scheduler == "adafactor":
            for group in groups:
                group["lr"] = None  # the relative step computes it
            # no parameter scaling: it multiplies the step by each weight's RMS, and a LoRA's up matrices start
            # at zero, so they would move at 1e-5 of the relative step (measured: the tiny model did not learn)
            return Adafactor(groups, relative_step=True, scale_parameter=False, warmup_init=False,
                             weight_decay=decay)
        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False, weight_decay=decay)
    if t.optimizer == "adamw_schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(groups, betas=betas, weight_decay=decay, eps=eps,
                                              warmup_steps=t.lr_warmup_steps)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=decay, eps=eps)


def make_lr_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    if t.lr_scheduler == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    schedule, warmup = t.lr_scheduler, t.lr_warmup_steps
    if t.optimizer == "adamw_schedulefree":
        schedule, warmup = "constant", 0  # the optimizer warms up by itself
    elif schedule == "constant" and warmup:
        schedule = "constant_with_warmup"  # diffusers' "constant" ignores warmup steps
    return get_scheduler(schedule, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def current_lr(optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> float:
    """The denoiser's learning rate as it was applied in the last step: Prodigy's is its estimate times the
    multiplier; Adafactor's relative step reports its own through the schedule."""
    group = optimizer.param_groups[0]
    if "d" in group and "d0" in group:  # Prodigy
        return float(group["d"] * group["lr"])
    return float(lr_scheduler.get_last_lr()[0])


@contextlib.contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """The weights as they should be read: schedule-free AdamW's average (its eval mode) while inside, its
    training point again after. Accelerate's optimizer wrapper makes this a no-op for the other optimizers."""
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
