"""Builds an SDXL-shaped checkpoint with random weights, for tests that need a full-structure SDXL model.

The file uses the original (SGM) single-file layout that ComfyUI's models/checkpoints folder holds:
`model.diffusion_model.*` (UNet, with `label_emb` for the size conditioning), `first_stage_model.*` (VAE),
`conditioner.embedders.0.transformer.text_model.*` (CLIP-L, HF layout) and `conditioner.embedders.1.model.*`
(OpenCLIP ViT-bigG layout: fused q/k/v `in_proj`, bare `text_projection` used as x @ P), all stored in fp16.
The models come from diffusers/transformers classes configured by the pack's shipped SDXL config folder and a
fixed seed, initialised directly in fp16 (the fp32 UNet alone would be 10 GiB on the CPU).

    python scripts/make_random_sdxl.py [--out PATH]

Cached like the SD 1.5 one (make_random_sd15.py): ~/.cache/lora-foundry/sdxl-random-fp16.safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_sd15 import (  # noqa: E402
    UNET_TOP_LEVEL,
    _convert,
    default_path,
    is_valid,
    ldm_text_key,
    ldm_unet_key,
    unet_block_prefixes,
    write_atomically,
)
from make_random_sd15 import vae_tensors as sd15_vae_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "trainer" / "families" / "sdxl_config"
FILE_NAME = "sdxl-random-fp16.safetensors"
RECIPE = "lora-foundry/random-sdxl/v1"
SEED = 1024
UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
SDXL_TOP_LEVEL = UNET_TOP_LEVEL | {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
OPEN_CLIP_NAMES = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}


def sdxl_path() -> Path:
    return default_path().with_name(FILE_NAME)


def ensure_random_sdxl(path: Path | str | None = None) -> Path:
    target = Path(path) if path is not None else sdxl_path()
    if not is_valid_sdxl(target):
        build(target)
    return target


def is_valid_sdxl(path: Path) -> bool:
    return is_valid(path, RECIPE)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(target: Path) -> None:
    started = time.monotonic()
    tensors: dict[str, torch.Tensor] = {}
    for name, make in parts():
        print(f"[make_random_sdxl] building random {name}", file=sys.stderr, flush=True)
        tensors.update(make())
        gc.collect()
    metadata = {"recipe": RECIPE, "seed": str(SEED), "tensor_count": str(len(tensors)), "format": "pt"}
    write_atomically(tensors, target, metadata)
    print(f"[make_random_sdxl] done in {time.monotonic() - started:.0f}s, {target.stat().st_size / 2**30:.2f} GiB",
          file=sys.stderr, flush=True)


def parts() -> tuple[tuple[str, Callable[[], dict[str, torch.Tensor]]], ...]:
    """Each model of the file and the function that builds its tensors under the file's names."""
    return ("unet", unet_tensors), ("vae", vae_tensors), ("CLIP-L", clip_l_tensors), ("CLIP-G", clip_g_tensors)


def unet_tensors() -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    with default_dtype(torch.float16):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "unet"))
    prefixes = unet_block_prefixes(unet.config)
    return _convert(unet.state_dict(), lambda name: UNET_PREFIX + ldm_unet_key(name, prefixes, SDXL_TOP_LEVEL))


def vae_tensors() -> dict[str, torch.Tensor]:
    return sd15_vae_tensors(CONFIG_DIR, SEED + 1)


def clip_l_tensors() -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 2)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"))
    return _convert(model.state_dict(), lambda name: CLIP_L_PREFIX + ldm_text_key(name))


def clip_g_tensors() -> dict[str, torch.Tensor]:
    """The OpenCLIP bigG text tower's names and layouts, from a CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(SEED + 3)
    with default_dtype(torch.float16):
        model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder_2"))
    return {CLIP_G_PREFIX + name: value.detach().to(torch.float16).contiguous()
            for name, value in open_clip_state(model.state_dict()).items()}


def open_clip_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf_layer, oc_layer = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc_layer}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{hf_layer}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
        for hf_name, oc_name in OPEN_CLIP_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"{oc_layer}{oc_name}.{kind}"] = hf[f"{hf_layer}{hf_name}.{kind}"]
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = hf["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = hf["text_model.final_layer_norm.bias"]
    out["text_projection"] = hf["text_projection.weight"].T.contiguous()  # OpenCLIP multiplies x @ P
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default {sdxl_path()})")
    print(ensure_random_sdxl(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
