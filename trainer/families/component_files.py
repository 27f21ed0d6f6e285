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
from pathlib import Path
from typing import Any

import torch

from ..weights import safetensors_header

CLIP_L_KEY = "text_model.encoder.layers.0.mlp.fc1.weight"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
VAE_KEY = "decoder.conv_in.weight"
CLIP_HEAD_WIDTH = 64  # CLIP-L's and T5's attention heads are 64 wide at every size
T5_HEAD_WIDTH = 64


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
