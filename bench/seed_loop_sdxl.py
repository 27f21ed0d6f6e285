"""seed, SDXL: the seed chapter's loop carried over to SDXL the way diffusers' SDXL LoRA example does it, with
no caching.

Every step runs the data transforms, VAE encode (`latent_dist.sample()`), both text encoders (penultimate
hidden states side by side, the second's pooled output), the time ids of each picture (original size, crop
top-left, target size), noise, timestep, `add_noise`, the UNet with its LoRA, MSE, backward, clipping, AdamW
and the LR scheduler. The LoRA is on the same attention projections as the SD 1.5 loop's and ours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from bench.common import ROOT, Spec, dataset_items
from bench.seed_loop import CaptionedImages, optimizer_step, timed_run

CONFIG_DIR = ROOT / "trainer" / "families" / "sdxl_config"


class SDXLCaptionedImages(CaptionedImages):
    """The SD 1.5 loop's per-fetch transforms, plus the second tokenizer's ids and the picture's time ids."""

    def __init__(self, items: list[tuple[Any, str]], tokenizers: tuple[Any, Any], resolution: int):
        super().__init__(items, tokenizers[0], resolution)
        self.tokenizer_2 = tokenizers[1]
        self.resolution = resolution

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(index)
        _, caption = self.items[index]
        sample["input_ids_2"] = self.tokenizer_2(caption, max_length=77, padding="max_length", truncation=True,
                                                 return_tensors="pt").input_ids[0]
        # drawn at the training size: nothing resized, nothing cropped
        side = self.resolution
        sample["time_ids"] = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)
        return sample


def load_pipeline(spec: Spec) -> tuple[Any, Any]:
    tokenizer = CLIPTokenizer.from_pretrained(spec.tokenizer_dir, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(spec.tokenizer_dir, local_files_only=True, pad_token="!")
    for t in (tokenizer, tokenizer_2):
        t.model_max_length = 77
    pipe = StableDiffusionXLPipeline.from_single_file(
        spec.checkpoint, config=str(CONFIG_DIR), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        local_files_only=True, torch_dtype=torch.float32,
    )
    scheduler = DDPMScheduler.from_pretrained(CONFIG_DIR / "scheduler", local_files_only=True)
    return pipe, scheduler


def encode_prompt(text_encoders: tuple[Any, Any], ids: tuple[torch.Tensor, torch.Tensor]) -> tuple[Any, Any]:
    first = text_encoders[0](ids[0], output_hidden_states=True)
    second = text_encoders[1](ids[1], output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second.text_embeds


def train_step(batch: dict, parts: dict[str, Any]) -> float:
    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    hidden, pooled = encode_prompt(parts["text_encoders"], (batch["input_ids"], batch["input_ids_2"]))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, hidden, added_cond_kwargs={"text_embeds": pooled,
                                                             "time_ids": batch["time_ids"]}).sample
    return optimizer_step(F.mse_loss(pred.float(), noise.float(), reduction="mean"), parts)


def run(spec: Spec, started: float) -> dict[str, Any]:
    torch.manual_seed(spec.seed)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    pipe, scheduler = load_pipeline(spec)
    vae, unet, text_encoders = pipe.vae, pipe.unet, (pipe.text_encoder, pipe.text_encoder_2)
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    images = SDXLCaptionedImages(dataset_items(spec.data), (pipe.tokenizer, pipe.tokenizer_2), spec.resolution)
    parts = dict(vae=vae, text_encoders=text_encoders, scheduler=scheduler)
    return timed_run(spec, started, accelerator, unet, images, parts, train_step)
