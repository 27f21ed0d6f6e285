"""Builds an SD 1.5-shaped checkpoint with random weights, for tests and demos that need a real-sized model.

The file uses the original (LDM) single-file layout that ComfyUI's models/checkpoints folder holds:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*`
(CLIP text encoder), all stored in fp16. The models come from diffusers/transformers classes configured by
the pack's shipped SD 1.5 config folder and a fixed seed; their names are converted diffusers -> LDM here.

    python scripts/make_random_sd15.py [--out PATH]

The result is cached (default ~/.cache/lora-foundry/sd15-random-fp16.safetensors, root overridable with
LORA_FOUNDRY_CACHE): a valid file already there is reused, and a new one is written to a temporary file
and renamed, so an interrupted build never leaves a partial checkpoint at the final path.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "trainer" / "families" / "sd15_config"
FILE_NAME = "sd15-random-fp16.safetensors"
RECIPE = "lora-foundry/random-sd15/v1"  # bump when the recipe changes so stale caches get rebuilt
SEED = 1505

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP_LEVEL = {"conv_norm_out": "norm_out"}


# ---- cache location and validity ---------------------------------------------------------------


def default_path() -> Path:
    root = os.environ.get("LORA_FOUNDRY_CACHE") or Path.home() / ".cache" / "lora-foundry"
    return Path(root) / FILE_NAME


def is_valid(path: Path, recipe: str = RECIPE) -> bool:
    """A complete file written by `recipe` (the header records the recipe and the tensor count)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            count = len(handle.keys())
    except Exception:  # noqa: BLE001 - unreadable for any reason means "rebuild"
        return False
    return metadata.get("recipe") == recipe and metadata.get("tensor_count") == str(count)


def ensure_random_sd15(path: Path | str | None = None) -> Path:
    """The random SD 1.5 checkpoint at `path` (default: the cache), built first if it is missing."""
    target = Path(path) if path is not None else default_path()
    if not is_valid(target):
        build(target)
    return target


# ---- building ----------------------------------------------------------------------------------


def build(target: Path) -> None:
    started = time.monotonic()
    tensors: dict[str, torch.Tensor] = {}
    for name, make in parts():
        _log(f"building random {name}")
        tensors.update(make())
        gc.collect()
    metadata = {"recipe": RECIPE, "seed": str(SEED), "tensor_count": str(len(tensors)), "format": "pt"}
    _log(f"writing {len(tensors)} tensors to {target}")
    write_atomically(tensors, target, metadata)
    _log(f"done in {time.monotonic() - started:.0f}s, {target.stat().st_size / 2**30:.2f} GiB")


def write_atomically(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; the cache is an ordinary shared file
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def parts() -> tuple[tuple[str, Callable[[], dict[str, torch.Tensor]]], ...]:
    """Each model of the file and the function that builds its tensors under the file's names."""
    return ("unet", unet_tensors), ("vae", vae_tensors), ("text encoder", text_encoder_tensors)


def planned_layout(builders: tuple[tuple[str, Callable[[], dict[str, torch.Tensor]]], ...]) -> dict[str, tuple]:
    """Name -> shape of every tensor the builders would write, found on the meta device (no memory, seconds):
    the cached file is reused across runs, so tests compare this with it rather than rebuild it."""
    with torch.device("meta"):
        return {name: tuple(value.shape) for _, make in builders for name, value in make().items()}


def file_layout(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def unet_tensors() -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    config = UNet2DConditionModel.load_config(CONFIG_DIR / "unet")
    unet = UNet2DConditionModel.from_config(config)
    prefixes = unet_block_prefixes(unet.config)
    return _convert(unet.state_dict(), lambda name: UNET_PREFIX + ldm_unet_key(name, prefixes))


def vae_tensors(config_dir: Path = CONFIG_DIR, seed: int = SEED + 1) -> dict[str, torch.Tensor]:
    """A random VAE of the config folder's `vae/`, under LDM's names (`first_stage_model.`)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    return ldm_vae_state_dict(vae, VAE_PREFIX, torch.float16)


def ldm_vae_state_dict(vae, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's tensors under LDM's names (what ComfyUI's VAE files and checkpoints hold)."""
    blocks = len(vae.config.block_out_channels)
    tensors = {prefix + ldm_vae_key(name, blocks): value.detach().to(dtype or value.dtype).contiguous()
               for name, value in vae.state_dict().items()}
    for key, value in tensors.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            tensors[key] = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention uses 1x1 convs
    return tensors


def text_encoder_tensors() -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 2)
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"))
    return _convert(model.state_dict(), lambda name: TEXT_PREFIX + ldm_text_key(name))


def _convert(state_dict: dict[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """fp16 copies of a component's tensors under their LDM names."""
    return {rename(name): value.detach().to(torch.float16).contiguous() for name, value in state_dict.items()}


# ---- diffusers -> LDM names --------------------------------------------------------------------


def unet_block_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix for an SD-style UNet2DConditionModel."""
    layers = config.layers_per_block
    levels = len(config.block_out_channels)
    prefixes = {}
    for level in range(levels):
        first = 1 + level * (layers + 1)
        for i in range(layers):
            prefixes[f"down_blocks.{level}.resnets.{i}."] = f"input_blocks.{first + i}.0."
            prefixes[f"down_blocks.{level}.attentions.{i}."] = f"input_blocks.{first + i}.1."
        if level < levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{first + layers}.0.op."
    prefixes["mid_block.resnets.0."] = "middle_block.0."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.1."] = "middle_block.2."
    for level, block_type in enumerate(config.up_block_types):
        has_attention = "CrossAttn" in block_type
        for i in range(layers + 1):
            block = level * (layers + 1) + i
            prefixes[f"up_blocks.{level}.resnets.{i}."] = f"output_blocks.{block}.0."
            prefixes[f"up_blocks.{level}.attentions.{i}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            last = level * (layers + 1) + layers
            slot = 2 if has_attention else 1
            prefixes[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{last}.{slot}.conv."
    return prefixes


def ldm_unet_key(name: str, prefixes: dict[str, str], top_level: dict[str, str] = UNET_TOP_LEVEL) -> str:
    module, _, param = name.rpartition(".")
    if module in top_level:
        return f"{top_level[module]}.{param}"
    for diffusers_prefix, ldm_prefix in prefixes.items():
        if name.startswith(diffusers_prefix):
            rest = name[len(diffusers_prefix) :]
            if ".resnets." in diffusers_prefix:
                rest = _rename_first(rest, UNET_RESNET_NAMES)
            return ldm_prefix + rest
    raise KeyError(f"no LDM name for UNet parameter {name}")


def ldm_vae_key(name: str, blocks: int) -> str:
    coder, _, rest = name.partition(".")
    if coder not in ("encoder", "decoder"):
        return name  # quant_conv, post_quant_conv
    parts = rest.split(".")
    if parts[0] in VAE_TOP_LEVEL:
        return ".".join([coder, VAE_TOP_LEVEL[parts[0]], *parts[1:]])
    if parts[0] == "mid_block":
        return f"{coder}.mid.{_vae_mid_name(parts[1:])}"
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{coder}.{_vae_level_name(parts, blocks)}"
    return name


def _vae_mid_name(parts: list[str]) -> str:
    kind, index, *rest = parts
    if kind == "attentions":
        return "attn_1." + _rename_first(".".join(rest), VAE_ATTENTION_NAMES)
    return f"block_{int(index) + 1}." + _rename_first(".".join(rest), VAE_RESNET_NAMES)


def _vae_level_name(parts: list[str], blocks: int) -> str:
    # LDM numbers the decoder's levels from the bottom up, diffusers from the top down
    blocks_name, level, kind, index, *rest = parts
    down = blocks_name == "down_blocks"
    ldm_level = int(level) if down else blocks - 1 - int(level)
    tail = ".".join(rest)
    direction = "down" if down else "up"
    if kind == "resnets":
        return f"{direction}.{ldm_level}.block.{index}." + _rename_first(tail, VAE_RESNET_NAMES)
    return f"{direction}.{ldm_level}.{direction}sample.{tail}"


def ldm_text_key(name: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions keep it
    return name.removeprefix("text_model.")


def _rename_first(rest: str, names: dict[str, str]) -> str:
    """Renames the leading module path of `rest` (e.g. "conv1.weight") when it is in `names`."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _log(message: str) -> None:
    print(f"[make_random_sd15] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default {default_path()})")
    args = parser.parse_args(argv)
    print(ensure_random_sd15(args.out))


if __name__ == "__main__":
    main()
