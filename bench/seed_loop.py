"""seed: the seed chapter's training loop, written from its algorithm, with no caching.

Every step runs the data transforms, VAE encode (`latent_dist.sample()`), the text encoder, noise, timestep,
`add_noise`, the UNet with its LoRA, MSE, backward, clipping, AdamW and the LR scheduler, as the chapter does.
Two of the chapter's defects are not repeated (they would make the loop do less work, not more): the
gradient clip gets the parameter list rather than an exhausted generator, and the UNet, optimizer and data
loader go through `accelerator.prepare`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from PIL import Image
from torchvision import transforms
from transformers import CLIPTokenizer

from bench.common import ROOT, Spec, dataset_items, steady

CONFIG_DIR = ROOT / "trainer" / "families" / "sd15_config"
LEARNING_RATE, BETAS, WEIGHT_DECAY, EPSILON, MAX_GRAD_NORM = 1e-4, (0.9, 0.999), 1e-2, 1e-8, 1.0


class CaptionedImages(torch.utils.data.Dataset):
    """The chapter's `preprocess_train`: transforms and tokenization on every fetch."""

    def __init__(self, items: list[tuple[Any, str]], tokenizer: Any, resolution: int):
        self.items = items
        self.tokenizer = tokenizer
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, caption = self.items[index]
        pixels = self.transform(Image.open(path).convert("RGB"))
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def load_pipeline(spec: Spec) -> tuple[Any, Any]:
    tokenizer = CLIPTokenizer.from_pretrained(spec.tokenizer_dir, local_files_only=True)
    tokenizer.model_max_length = 77  # ComfyUI's copy of the tokenizer config says 8192 under transformers 5
    pipe = StableDiffusionPipeline.from_single_file(
        spec.checkpoint, config=str(CONFIG_DIR), tokenizer=tokenizer, safety_checker=None,
        feature_extractor=None, local_files_only=True, torch_dtype=torch.float32,
    )
    scheduler = DDPMScheduler.from_pretrained(CONFIG_DIR / "scheduler", local_files_only=True)
    return pipe, scheduler


def add_lora(unet: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.to(torch.float32)
    return params


def train_step(batch: dict, parts: dict[str, Any]) -> float:
    vae, text_encoder, unet, scheduler = parts["vae"], parts["text_encoder"], parts["unet"], parts["scheduler"]
    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                 timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    return optimizer_step(F.mse_loss(pred.float(), target.float(), reduction="mean"), parts)


def optimizer_step(loss: torch.Tensor, parts: dict[str, Any]) -> float:
    """Backward, clipping, AdamW and the LR scheduler, as the chapter steps."""
    accelerator = parts["accelerator"]
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(parts["params"], MAX_GRAD_NORM)
    parts["optimizer"].step()
    parts["lr_scheduler"].step()
    parts["optimizer"].zero_grad()
    return loss.item()


def run(spec: Spec, started: float) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    pipe, scheduler = load_pipeline(spec)
    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    images = CaptionedImages(dataset_items(spec.data), pipe.tokenizer, spec.resolution)
    parts = dict(vae=vae, text_encoder=text_encoder, scheduler=scheduler)
    return timed_run(spec, started, accelerator, unet, images, parts, train_step)


def timed_run(spec: Spec, started: float, accelerator: Accelerator, unet: torch.nn.Module,
              images: torch.utils.data.Dataset, parts: dict[str, Any], step: Any) -> dict[str, Any]:
    """The chapter's optimizer, scheduler and loader around `step(batch, parts)`, run for the spec's steps."""
    params = add_lora(unet, spec.rank)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPSILON)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    loader = torch.utils.data.DataLoader(images, shuffle=True, batch_size=1)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    parts = dict(parts, unet=unet, accelerator=accelerator, params=params, optimizer=optimizer,
                 lr_scheduler=lr_scheduler)
    unet.train()
    step_times: list[float] = []
    first_step_at = time.time()
    while len(step_times) < spec.steps:
        began = time.time()
        for batch in loader:
            step(batch, parts)
            now = time.time()
            step_times.append(now - began)
            began = now
            if len(step_times) == spec.steps:
                break
    return {**steady(step_times, spec.warmup), "step_times": step_times, "ttfs_s": first_step_at - started}
