"""FLUX.1's transformer in Black Forest Labs' layout (what ComfyUI's models/diffusion_models holds) and in
diffusers' layout (what FluxTransformer2DModel loads): the sizes read from the weights, and the tensors
renamed, the fused projections split, at any width (diffusers' own converter assumes the full 3072).

BFL fuses what diffusers keeps apart: a double block's `img_attn.qkv` is diffusers' to_q | to_k | to_v
stacked by rows, a single block's `linear1` is to_q | to_k | to_v | proj_mlp, and the final modulation holds
(shift, scale) where diffusers' `norm_out.linear` holds (scale, shift).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

# a file from models/diffusion_models has bare names; an all-in-one checkpoint prefixes them
CHECKPOINT_PREFIX = "model.diffusion_model."
GATE_KEY = "double_blocks.0.img_attn.norm.key_norm"  # ComfyUI's FLUX test (.scale, or .weight in newer files)

_DOUBLE = re.compile(r"double_blocks\.(\d+)\.(.+)")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.(.+)")
_DOUBLE_RENAMES = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
}
_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_RENAMES = {"linear2": "proj_out", "modulation.lin": "norm.linear",
                   "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_TOP_RENAMES = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
FINAL_MODULATION = "final_layer.adaLN_modulation.1"
DIFFUSERS_FINAL_MODULATION = "norm_out.linear"  # the same layer, its rows' two halves swapped (swap_halves)


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's tensors with bare BFL names, from a diffusion-model file or an all-in-one checkpoint."""
    if any(key.startswith(CHECKPOINT_PREFIX) for key in state_dict):
        return {key[len(CHECKPOINT_PREFIX):]: value for key, value in state_dict.items()
                if key.startswith(CHECKPOINT_PREFIX)}
    return dict(state_dict)


def _norm_key(shapes: Mapping[str, Any], stem: str) -> str:
    # BFL's RMSNorm weight is `.scale`; ComfyUI 0.33 writes `.weight`
    return next((f"{stem}.{suffix}" for suffix in ("scale", "weight") if f"{stem}.{suffix}" in shapes), f"{stem}.scale")


def _count(shapes: Mapping[str, Any], pattern: re.Pattern[str]) -> int:
    indices = {int(match[1]) for key in shapes if (match := pattern.fullmatch(key))}
    return max(indices) + 1 if indices else 0


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """FluxTransformer2DModel's config from the BFL tensor shapes (bare names)."""
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[_norm_key(shapes, "double_blocks.0.img_attn.norm.query_norm")][0]
    if hidden % head_dim or head_dim % 16:
        raise ValueError(f"FLUX transformer with width {hidden} and head width {head_dim}: not FLUX.1's layout")
    single_rows = shapes.get("single_blocks.0.linear1.weight", (7 * hidden,))[0]
    if single_rows != 7 * hidden or shapes["double_blocks.0.img_mlp.0.weight"][0] != 4 * hidden:
        raise ValueError("FLUX transformer whose MLP is not 4x its width: not FLUX.1's layout")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": _count(shapes, _DOUBLE),
        "num_single_layers": _count(shapes, _SINGLE),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        # FLUX.1's rotary axes split the head as 16 + 56 + 56 of 128: (1/8, 7/16, 7/16) at any head width
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }


def to_diffusers(bfl: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BFL tensors (bare names) in diffusers' names; a tensor of no known role is an error (a FLUX variant
    with parts FLUX.1 lacks must not train with those parts silently left out)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in bfl.items():
        stem, _, kind = key.rpartition(".")
        kind = "weight" if kind == "scale" else kind
        if match := _DOUBLE.fullmatch(stem):
            block, part = f"transformer_blocks.{match[1]}", match[2]
            if part in _DOUBLE_QKV:
                for name, piece in zip(_DOUBLE_QKV[part], tensor.chunk(3), strict=True):
                    out[f"{block}.{name}.{kind}"] = piece
                continue
            renamed = _DOUBLE_RENAMES.get(part)
        elif match := _SINGLE.fullmatch(stem):
            block, part = f"single_transformer_blocks.{match[1]}", match[2]
            if part == "linear1":
                hidden = tensor.shape[0] // 7  # q, k, v of the width, then the 4x MLP input
                pieces = tensor.split([hidden, hidden, hidden, 4 * hidden])
                for name, piece in zip(_SINGLE_FUSED, pieces, strict=True):
                    out[f"{block}.{name}.{kind}"] = piece
                continue
            renamed = _SINGLE_RENAMES.get(part)
        elif stem == FINAL_MODULATION:
            out[f"{DIFFUSERS_FINAL_MODULATION}.{kind}"] = swap_halves(tensor)
            continue
        else:
            block, renamed = "", _TOP_RENAMES.get(stem)
        if renamed is None:
            unknown.append(key)
            continue
        out[f"{block}.{renamed}.{kind}" if block else f"{renamed}.{kind}"] = tensor
    if unknown:
        raise ValueError(f"FLUX transformer tensors FLUX.1 does not have: {', '.join(sorted(unknown)[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return out


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN (shift, scale) as diffusers' norm_out.linear (scale, shift), and back."""
    first, second = rows.chunk(2)
    return torch.cat([second, first])
