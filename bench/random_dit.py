"""Random-weight DiT families at full size for bench/gpu.py, built in memory on the GPU from the configs the
pack ships (no 24 GB file written and read back: the step loop is what is measured, and the file loaders are
proven on the tiny models by the tests).

FLUX.1 dev: a 12B transformer, CLIP-L and T5-XXL. Z-Image: a 6B transformer and Qwen3-4B. `small=True` builds
the same classes a few layers deep and narrow, for `bench/gpu.py --cpu-check`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.config import ModelConfig, TrainConfig
from trainer.families.base import Components

FAMILIES = ("flux", "zimage")


def _init(module: torch.nn.Module, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The module's weights allocated on `device` in `dtype` and drawn small (random, finite activations)."""
    # buffers (position ids) are computed at construction: to_empty would leave them uninitialised
    buffers = {name: buffer.clone() for name, buffer in module.named_buffers() if not buffer.is_meta}
    module = module.to(dtype).to_empty(device=device)  # the dtype first: a 12B model never exists in fp32
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, value in buffers.items():
            module.get_buffer(name).copy_(value)
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif "norm" in name or name.endswith(("scale", ".weight")):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return module  # Components freezes it


def _meta(make: Any) -> torch.nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return make()


def random_flux(family: Any, model: ModelConfig, dtype: torch.dtype, device: str, small: bool) -> Components:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trainer.families import flux

    sizes = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                 joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 14, 14)) if small else {}
    transformer = _init(_meta(lambda: FluxTransformer2DModel(guidance_embeds=family.variant == "dev", **sizes)),
                        device, dtype, 1)
    clip_config = json.loads((flux.CONFIG_DIR / "clip_l.json").read_text())
    t5_config = json.loads((flux.CONFIG_DIR / "t5xxl.json").read_text())
    if small:
        clip_config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)
        t5_config.update(d_model=64, d_ff=128, num_layers=1, num_heads=1)
    clip = _init(_meta(lambda: CLIPTextModel(CLIPTextConfig(**clip_config))), device, dtype, 2)
    t5 = _init(_meta(lambda: T5EncoderModel(T5Config(**t5_config))), device, dtype, 3)
    vae = _vae(flux.CONFIG_DIR / "vae", device, small)
    tokenizers = {flux.CLIP_L: flux.clip_tokenizer(flux.find_tokenizer_dir(model), flux.CLIP_TOKENS),
                  flux.T5: flux._t5_tokenizer(model, family.max_tokens)}
    return Components(transformer, vae, {flux.CLIP_L: clip, flux.T5: t5}, tokenizers,
                      family.objective(family.train), [])


def random_zimage(family: Any, model: ModelConfig, dtype: torch.dtype, device: str, small: bool) -> Components:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from trainer.families import zimage

    config = dict(ZImageTransformer2DModel.load_config(zimage.CONFIG_DIR / "transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if small:
        config.update(dim=1152, n_heads=9, n_kv_heads=9, n_layers=1, n_refiner_layers=1, cap_feat_dim=64)
    transformer = _init(_meta(lambda: ZImageTransformer2DModel(**config)), device, dtype, 1)
    qwen_config = json.loads((zimage.CONFIG_DIR / "qwen3_4b.json").read_text())
    if small:
        qwen_config.update(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32)
    qwen = _init(_meta(lambda: Qwen3Model(Qwen3Config(**qwen_config))), device, dtype, 2)
    vae = _vae(zimage.CONFIG_DIR / "vae", device, small)
    return Components(transformer, vae, {zimage.QWEN3: qwen}, {zimage.QWEN3: zimage.qwen_tokenizer(model)},
                      family.objective(family.train), [])


def _vae(config_dir: Path, device: str, small: bool) -> Any:
    """The family's VAE, fp32 (it is exact there and small); narrow for the CPU check."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in AutoencoderKL.load_config(config_dir).items() if not k.startswith("_")}
    if small:
        config.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    return _init(_meta(lambda: AutoencoderKL(**config)), device, torch.float32, 4)


def random_family(name: str, variant_train: TrainConfig, small: bool) -> Any:
    """The family object, its loader replaced by the random builder (the step loop is untouched)."""
    from trainer.families.flux import FluxFamily
    from trainer.families.zimage import ZImageFamily

    family = FluxFamily("dev", variant_train) if name == "flux" else ZImageFamily(variant_train)
    build = random_flux if name == "flux" else random_zimage

    def load(model: ModelConfig, dtype: torch.dtype) -> Components:
        device = "cuda" if torch.cuda.is_available() and not small else "cpu"
        return build(family, model, dtype, device, small)

    family.load = load  # type: ignore[method-assign]
    family.for_model = lambda model: family  # type: ignore[method-assign]
    return family
