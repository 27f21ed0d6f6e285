"""floor: the least a LoRA training step can do here, and how fast this CPU does arithmetic.

The UNet with the same rank-4 attention LoRA, on fixed precomputed inputs (latents, text embedding,
timestep): forward, MSE, backward, AdamW step, nothing else. Its FLOPs come from torch.utils.flop_counter;
the machine's reference rate is a 4096 x 4096 fp32 matmul in the same process.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Spec, steady
from trainer.config import ModelConfig
from trainer.families import get_family

MATMUL_N = 4096


def load_unet(spec: Spec) -> torch.nn.Module:
    """The UNet exactly as the trainer loads it (same loader, fp32); the VAE and text encoder are dropped."""
    model = ModelConfig(path=spec.checkpoint, tokenizer_dir=spec.tokenizer_dir)
    components = get_family("sd15").load(model, torch.float32)
    return components.denoiser


def fixed_inputs(resolution: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    return {
        "noisy": torch.randn(1, 4, side, side, generator=generator),
        "noise": torch.randn(1, 4, side, side, generator=generator),
        "timesteps": torch.tensor([500]),
        "text": torch.randn(1, 77, 768, generator=generator),
    }


def step(unet: torch.nn.Module, optimizer: torch.optim.Optimizer, x: dict[str, torch.Tensor]) -> None:
    pred = unet(x["noisy"], x["timesteps"], encoder_hidden_states=x["text"], return_dict=False)[0]
    F.mse_loss(pred, x["noise"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(unet: torch.nn.Module, x: dict[str, torch.Tensor]) -> int:
    """Forward + backward FLOPs of one step (the optimizer's are negligible and not counted)."""
    with FlopCounterMode(display=False) as counter:
        pred = unet(x["noisy"], x["timesteps"], encoder_hidden_states=x["text"], return_dict=False)[0]
        F.mse_loss(pred, x["noise"]).backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_s(n: int = MATMUL_N, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    return 2 * n**3 / min(times)  # best of the repeats, like the step times


def run(spec: Spec, started: float) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    unet = load_unet(spec)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet.train()
    x = fixed_inputs(spec.resolution)
    first_step_at = time.time()
    step_times = []
    for _ in range(spec.steps):
        began = time.perf_counter()
        step(unet, optimizer, x)
        step_times.append(time.perf_counter() - began)
    stats = steady(step_times, spec.warmup)
    flops = count_flops(unet, x)
    matmul = matmul_flops_per_s()
    rate = flops / stats["s_per_step"]
    return {**stats, "step_times": step_times, "ttfs_s": first_step_at - started, "flops_per_step": flops,
            "flops_per_s": rate, "matmul_flops_per_s": matmul, "fraction_of_matmul": rate / matmul}
