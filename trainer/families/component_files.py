"""Model components from the files ComfyUI users keep apart (models/text_encoders, models/vae,
models/diffusion_models) or inside an all-in-one checkpoint, loaded offline: the architecture from a config
shipped in the pack with the sizes read from the weights, so a fine-tune, a pruned file or a tiny test model
loads as well as the original.

Models are built without allocating their weights (accelerate's init_empty_weights) and take the file's
tensors as they are, cast to the wanted dtype one tensor at a time: the peak memory is one copy of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..weights import safetensors_header
from .detect import UnsupportedModelError

CLIP_L_KEY = "text_model.encoder.layers.0.mlp.fc1.weight"
QWEN3_KEY = "model.layers.0.self_attn.q_norm.weight"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
VAE_KEY = "decoder.conv_in.weight"
CLIP_HEAD_WIDTH = 64  # CLIP-L's and T5's attention heads are 64 wide at every size
T5_HEAD_WIDTH = 64


@dataclass(frozen=True)
class Source:
    """Where one component's tensors are: a file, and the prefix of their names in it."""

    path: str
    prefix: str = ""


@dataclass(frozen=True)
class Part:
    """A component a family needs beside its diffusion model, and how to find it."""

    label: str  # what users call it: "the T5 text encoder"
    key: str  # a tensor only this kind of file has (names as in its own file)
    checkpoint_prefix: str  # where an all-in-one checkpoint (ComfyUI's layout) keeps it
    text_encoder: bool = True  # chosen among model.text_encoders (else it is the VAE: model.vae)


def locate_parts(model: ModelConfig, parts: dict[str, Part], family_label: str, hint: str) -> dict[str, Source]:
    """Each part's file: the text encoders among the config's text-encoder files (told apart by their weights,
    in any order), the VAE from the config's VAE file, anything not given from the model file (an all-in-one
    checkpoint); UnsupportedModelError naming what is missing, with `hint` saying where to find it."""
    found: dict[str, Source] = {}
    encoders = {role: part for role, part in parts.items() if part.text_encoder}
    for file in model.text_encoders:
        keys = tensor_shapes(file)
        role = next((role for role, part in encoders.items() if part.key in keys), None)
        if role is None:
            raise UnsupportedModelError(f"{file} is none of the text encoders {family_label} needs "
                                        f"({' and '.join(p.label for p in encoders.values())})")
        if role in found:
            raise UnsupportedModelError(f"{file} and {found[role].path} are both "
                                        f"{encoders[role].label.removeprefix('the ')}s; {family_label} needs one")
        found[role] = Source(file)
    for role, part in parts.items():
        if not part.text_encoder and model.vae:
            found[role] = Source(model.vae, part.checkpoint_prefix
                                 if part.checkpoint_prefix + part.key in tensor_shapes(model.vae) else "")
    inside = tensor_shapes(model.path)
    missing = []
    for role, part in parts.items():
        if role in found:
            continue
        if part.checkpoint_prefix + part.key in inside:
            found[role] = Source(model.path, part.checkpoint_prefix)
        else:
            missing.append(part.label)
    if missing:
        raise UnsupportedModelError(f"{model.path} is a {family_label} diffusion model without "
                                    f"{' and '.join(missing)}; choose {'them' if len(missing) > 1 else 'it'} "
                                    f"{hint}")
    return found


def denoiser_source(path: str, checkpoint_prefix: str) -> Source:
    """The diffusion model's tensors: under `checkpoint_prefix` in an all-in-one checkpoint, bare in a file from
    models/diffusion_models."""
    inside = any(key.startswith(checkpoint_prefix) for key in tensor_shapes(path))
    return Source(path, checkpoint_prefix if inside else "")


def folder_models(folder: Path, dtype: torch.dtype, classes: dict[str, Any]) -> list[Any]:
    """The models of a diffusers folder, offline, in `dtype`: subfolder -> model class, in the order given."""
    return [cls.from_pretrained(folder / sub, torch_dtype=dtype, local_files_only=True)
            for sub, cls in classes.items()]


def tensor_shapes(path: str | Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Name (prefix cut) -> shape of the tensors under `prefix` in a .safetensors file, reading no data."""
    _, header = safetensors_header(path)
    return {key[len(prefix):]: tuple(info["shape"]) for key, info in header.items() if key.startswith(prefix)}


def read_tensors(path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (cut from their names), floats cast to `dtype` as each is read."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
            if key.startswith(prefix):
                tensor = handle.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[key[len(prefix):]] = tensor
    return tensors


def build_with_weights(make: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor],
                       what: str, ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """`make()`'s model holding `state_dict`'s tensors; every parameter must come from the file.

    `ignore`: names the file may hold that the model does not use (CLIP's projection and logit scale)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers (position ids) are computed, not stored
        model = make()
    wanted = {key: value for key, value in state_dict.items() if not key.startswith(ignore)}
    result = model.load_state_dict(wanted, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # T5's encoder embedding is its shared embedding
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing or result.unexpected_keys:
        problems = [f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(result.unexpected_keys[:3])}" if result.unexpected_keys else ""]
        raise ValueError(f"{what}: the file's tensors do not fit the model ({'; '.join(p for p in problems if p)})")
    return model


def _count(shapes: Mapping[str, Any], pattern: str) -> int:
    compiled = re.compile(pattern)
    indices = {int(match[1]) for key in shapes if (match := compiled.match(key))}
    return max(indices) + 1 if indices else 0


def clip_text_model(state_dict: Mapping[str, torch.Tensor], config_file: Path, what: str) -> torch.nn.Module:
    """A CLIPTextModel (transformers' layout, `text_model.*`, as ComfyUI's clip_l files hold it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, width = state_dict["text_model.embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(**{
        **json.loads(config_file.read_text(encoding="utf-8")),
        "vocab_size": vocab,
        "hidden_size": width,
        "num_attention_heads": max(1, width // CLIP_HEAD_WIDTH),
        "intermediate_size": state_dict[CLIP_L_KEY].shape[0],
        "num_hidden_layers": _count(state_dict, r"text_model\.encoder\.layers\.(\d+)\."),
        "max_position_embeddings": state_dict["text_model.embeddings.position_embedding.weight"].shape[0],
    })
    # transformers 5 names CLIPTextModel's tensors without the files' `text_model.`
    flattened = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    return build_with_weights(lambda: CLIPTextModel(config), flattened, what,
                              ignore=("text_projection", "logit_scale"))


def t5_encoder(state_dict: Mapping[str, torch.Tensor], config_file: Path, what: str) -> torch.nn.Module:
    """A T5EncoderModel (transformers' layout, `encoder.*` + `shared.weight`, as ComfyUI's t5xxl files hold it)."""
    from transformers import T5Config, T5EncoderModel

    vocab, width = state_dict["shared.weight"].shape
    attention = "encoder.block.0.layer.0.SelfAttention"
    config = T5Config(**{
        **json.loads(config_file.read_text(encoding="utf-8")),
        "vocab_size": vocab,
        "d_model": width,
        "d_kv": T5_HEAD_WIDTH,
        "num_heads": state_dict[f"{attention}.q.weight"].shape[0] // T5_HEAD_WIDTH,
        "d_ff": state_dict["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        "num_layers": _count(state_dict, r"encoder\.block\.(\d+)\."),
        "relative_attention_num_buckets": state_dict[f"{attention}.relative_attention_bias.weight"].shape[0],
    })
    return build_with_weights(lambda: T5EncoderModel(config), state_dict, what,
                              ignore=("encoder.embed_tokens.",))


def qwen3_encoder(state_dict: Mapping[str, torch.Tensor], config_file: Path, what: str) -> torch.nn.Module:
    """A Qwen3Model from Qwen3ForCausalLM's layout (`model.*`, as ComfyUI's qwen_3_4b file holds it), the
    widths, depth and head layout read from the weights."""
    from transformers import Qwen3Config, Qwen3Model

    bare = {key.removeprefix("model."): value for key, value in state_dict.items()}
    vocab, width = bare["embed_tokens.weight"].shape
    head = bare["layers.0.self_attn.q_norm.weight"].shape[0]
    config = Qwen3Config(**{
        **json.loads(config_file.read_text(encoding="utf-8")),
        "vocab_size": vocab,
        "hidden_size": width,
        "head_dim": head,
        "num_attention_heads": bare["layers.0.self_attn.q_proj.weight"].shape[0] // head,
        "num_key_value_heads": bare["layers.0.self_attn.k_proj.weight"].shape[0] // head,
        "intermediate_size": bare["layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": _count(bare, r"layers\.(\d+)\."),
    })
    return build_with_weights(lambda: Qwen3Model(config), bare, what, ignore=("lm_head.",))


def ldm_vae(state_dict: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype) -> Any:
    """An AutoencoderKL from the original (LDM) layout ComfyUI's models/vae files hold, through diffusers'
    converter, the levels, widths and latent channels read from the weights."""
    from diffusers import AutoencoderKL

    levels = _count(state_dict, r"encoder\.down\.(\d+)\.")
    sizes = {
        "block_out_channels": [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        "layers_per_block": _count(state_dict, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": state_dict[VAE_KEY].shape[1],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }
    return AutoencoderKL.from_single_file(state_dict, config=str(config_dir), local_files_only=True,
                                          torch_dtype=dtype, **sizes)
