"""Validation samples: the training denoiser (LoRA active) rendering fixed prompts with a fixed seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from .config import RunConfig
from .families import Components, ModelFamily


def render_samples(
    cfg: RunConfig,
    family: ModelFamily,
    components: Components,
    denoiser: torch.nn.Module,
    device: torch.device,
    step: int,
    weight_dtype: torch.dtype = torch.float32,
    stop_requested: Callable[[], bool] = lambda: False,
) -> list[Path]:
    """Render every validation prompt with the training denoiser (LoRA active); a stop asked meanwhile ends the
    sampling after the current denoising step, keeping the pictures already drawn."""
    s = cfg.sample
    width, height = s.width or cfg.data.resolution, s.height or cfg.data.resolution
    out_dir = Path(cfg.run_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    components.vae.to(device)
    for encoder in components.text_encoders.values():
        encoder.to(device)
    pipe = family.sampling_pipeline(components, denoiser)
    pipe.set_progress_bar_config(disable=True)
    was_training = denoiser.training
    denoiser.train(False)
    paths = []
    # The frozen weights are 16-bit and the LoRA weights fp32: only autocast makes every op (the VAE decode
    # included) see one dtype. On the CPU autocast has bf16 only; fp16 never reaches here on the CPU.
    mixed = weight_dtype != torch.float32

    def check_stop(_pipe: object, _index: int, _timestep: object, kwargs: dict) -> dict:
        if stop_requested():
            raise _SamplingStopped()
        return kwargs

    try:
        for index, prompt in enumerate(s.prompts):
            if stop_requested():
                break
            generator = torch.Generator("cpu").manual_seed(s.seed + index)
            try:
                with torch.no_grad(), torch.autocast(device.type, dtype=weight_dtype, enabled=mixed):
                    image = pipe(
                        prompt=prompt,
                        negative_prompt=s.negative_prompt or None,
                        num_inference_steps=s.steps,
                        guidance_scale=s.guidance_scale,
                        width=width,
                        height=height,
                        generator=generator,
                        callback_on_step_end=check_stop,
                    ).images[0]
            except _SamplingStopped:
                break
            info = PngInfo()
            info.add_text("prompt", prompt)
            info.add_text("negative_prompt", s.negative_prompt)
            info.add_text("seed", str(s.seed + index))
            info.add_text("step", str(step))
            path = out_dir / f"step-{step:08d}-{index:02d}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
    finally:
        denoiser.train(was_training)
        if not family.trained_text_encoders(cfg.lora):  # else every encoder encodes each step's captions
            for encoder in components.text_encoders.values():
                encoder.to("cpu")
        components.vae.to("cpu")
    return paths


class _SamplingStopped(Exception):
    """Raised from the pipeline's step callback to leave the denoising loop at once."""
