"""The non-finite guard: a step whose loss or gradients are not finite numbers ends the run before it can change
the weights, and no LoRA or checkpoint is ever written with a NaN or infinite tensor (such a LoRA turns every
picture black)."""

from __future__ import annotations

import math

import torch


class NonFiniteTraining(RuntimeError):
    """The loss or the gradient norm stopped being a finite number."""


def non_finite_problem(loss: float, grad_norm: float | None, gradients_may_overflow: bool) -> str | None:
    """What is not finite before this step's update, or None.

    `gradients_may_overflow`: fp16 training with a gradient scaler, whose scaled gradients overflow now and then
    by design; the scaler then skips that step and lowers its scale, so only the loss counts there.
    """
    if not math.isfinite(loss):
        return f"the loss is {loss}, not a finite number (the weights were not updated with it)"
    if grad_norm is not None and not math.isfinite(grad_norm) and not gradients_may_overflow:
        return f"the gradient norm is {grad_norm}, not a finite number (the weights were not updated with it)"
    return None


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Are all trained weights finite? One device sync for all of them."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())


WEIGHTS_PROBLEM = "its update made the trained weights non-finite"


def non_finite_message(step: int, problem: str, learning_rate: float, mixed_precision: str,
                       checkpoint_step: int | None) -> str:
    """Which step, what went wrong, the likely causes, and what is kept."""
    causes = [f"a learning rate too high for this run (train.learning_rate {learning_rate:g}: try a tenth)"]
    if mixed_precision == "fp16":
        causes.append("fp16 overflowing (train.mixed_precision bf16, or no, keeps more range)")
    kept = (f"the checkpoint of step {checkpoint_step} is kept" if checkpoint_step is not None
            else "no checkpoint had been saved")
    return f"training stopped at step {step}: {problem}. Likely: {'; or '.join(causes)}. No LoRA was written; {kept}"


def require_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write `what` when any tensor holds a NaN or an infinity, naming how many."""
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteTraining(f"{what} not written: {len(bad)} of {len(tensors)} tensors are not finite "
                                f"(first: {bad[0]})")
