"""The adapter types a run trains, through peft, and each one's tensors as the loaders read them.

- LoRA: delta = B @ A * alpha / r. Written as kohya's `lora_down` / `lora_up` (or diffusers' `lora_A` /
  `lora_B`, per family) and `alpha`.
- LoCon: LoRA on the denoiser's convolutions too (the family's `conv_targets`), the same tensors.
- DoRA (LoRA or LoCon with `dora`): W' = m * (W + delta) / ||W + delta|| per output row. Written as the LoRA
  tensors plus `dora_scale` of shape (out, 1[, 1, 1]). ComfyUI (0.3.75 to 0.33 at least) divides an
  output-axis `dora_scale` by the norm of the base weight W instead of W + delta; the file holds
  m * (||W|| + eps) / ||W + delta||, so ComfyUI's weight is exactly the trained one (at strength 1, with no other
  LoRA applied before it). A loader that divides by ||W + delta||, as LyCORIS does, is off by the factor
  ||W|| / ||W + delta|| per row, which is 1 plus the relative size of the update.
- LoHa: delta = (w1a @ w1b) * (w2a @ w2b) * alpha / r. peft's `hada_*` tensors are LyCORIS's as they are.
- LoKr: delta = kron(w1, w2) * alpha / r. ComfyUI and LyCORIS ignore alpha when neither factor is split, so
  the scale is multiplied into w1 and no alpha is written: every loader then applies the same delta.
  The Tucker form (`lokr_t2`, `hada_t*`) is never used: ComfyUI fails on `lokr_t2` and skips the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .config import LoraConfig

# the module lycoris-lora's kohya network is, as its files name it (ss_network_module)
LYCORIS_NETWORK_MODULE = "lycoris.kohya"
DORA_EPS = torch.finfo(torch.float32).eps  # what ComfyUI adds to the norm it divides by, computing in fp32


def peft_config(lo: LoraConfig, targets: list[str] | str) -> Any:
    """The peft config of the run's adapter type on `targets` (peft target_modules)."""
    from peft import LoHaConfig, LoKrConfig
    from peft import LoraConfig as PeftLoraConfig

    if lo.adapter == "loha":
        return LoHaConfig(r=lo.rank, alpha=lo.alpha, target_modules=targets, use_effective_conv2d=False)
    if lo.adapter == "lokr":
        return LoKrConfig(r=lo.rank, alpha=lo.alpha, target_modules=targets, use_effective_conv2d=False,
                          decompose_both=lo.lokr_decompose_both, decompose_factor=lo.lokr_factor)
    return PeftLoraConfig(r=lo.rank, lora_alpha=lo.alpha, target_modules=targets, lora_dropout=lo.dropout,
                          init_lora_weights=True if lo.init == "default" else lo.init, use_dora=lo.dora)


def adapter_layers(model: torch.nn.Module, adapter: str) -> Iterator[tuple[str, Any]]:
    """(module path, peft layer) of every LoRA, LoHa or LoKr layer holding `adapter`."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield path, module
        elif isinstance(module, (LoHaLayer, LoKrLayer)) and adapter in module.r:
            yield path, module


def targeted_layers(model: torch.nn.Module, config: Any) -> dict[str, torch.nn.Module]:
    """The Linear and Conv2d layers `config` (a peft config) adapts, by module path, before it is applied:
    peft's own matching, so this is the set that injecting adapts."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return {path: module for path, module in model.named_modules()
            if path and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and check_target_module_exists(config, path)}


def smaller_side(layer: torch.nn.Module) -> int:
    # from the layer's attributes: a 4-bit base weight is stored packed, its shape is not the layer's
    if isinstance(layer, torch.nn.Conv2d):
        return min(layer.out_channels, layer.in_channels // layer.groups)
    return min(layer.out_features, layer.in_features)


def require_rank_fits(layers: dict[str, torch.nn.Module], lo: LoraConfig, part: str) -> None:
    """A LoRA or LoHa rank above a layer's smaller side adds parameters and nothing else (and a huge one runs
    out of memory adding them); LoKr's rank only chooses which factors are split, so any rank is meaningful."""
    if lo.adapter == "lokr" or not layers:
        return
    path, layer = min(layers.items(), key=lambda item: smaller_side(item[1]))
    side = smaller_side(layer)
    if lo.rank > side:
        raise ValueError(f"lora.rank {lo.rank} is larger than the {part} layer {path} ({side} wide); "
                         f"at most {side} for these targets")


def adapter_parameters(layers: dict[str, torch.nn.Module], config: Any) -> int:
    """How many parameters `config` adds to `layers`: peft applied to empty copies on the meta device, which
    hold no memory, so every adapter type counts exactly as it will train."""
    import dataclasses

    from peft import inject_adapter_in_model

    with torch.device("meta"):
        copies = torch.nn.ModuleDict({f"layer{i}": _empty_copy(layer) for i, layer in enumerate(layers.values())})
    if not copies:
        return 0
    inject_adapter_in_model(dataclasses.replace(config, target_modules=list(copies)), copies)
    return sum(p.numel() for p in copies.parameters() if p.requires_grad)


def _empty_copy(layer: torch.nn.Module) -> torch.nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, torch.nn.Conv2d):
        return torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                               layer.padding, layer.dilation, layer.groups, bias)
    return torch.nn.Linear(layer.in_features, layer.out_features, bias)


def layer_tensors(name: str, layer: Any, adapter: str, weight_names: tuple[str, str]) -> dict[str, torch.Tensor]:
    """One adapted module's tensors under its file name `name` (`weight_names`: the family's LoRA down / up)."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    if isinstance(layer, LoHaLayer):
        return _loha_tensors(name, layer, adapter)
    if isinstance(layer, LoKrLayer):
        return _lokr_tensors(name, layer, adapter)
    return _lora_tensors(name, layer, adapter, weight_names)


def _lora_tensors(name: str, layer: Any, adapter: str, weight_names: tuple[str, str]) -> dict[str, torch.Tensor]:
    down_name, up_name = weight_names
    tensors = {
        f"{name}.{down_name}.weight": export(layer.lora_A[adapter].weight),
        f"{name}.{up_name}.weight": export(layer.lora_B[adapter].weight),
        f"{name}.alpha": torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32),
    }
    if layer.use_dora.get(adapter, False):
        tensors[f"{name}.dora_scale"] = _comfyui_dora_scale(layer, adapter)
    return tensors


def _comfyui_dora_scale(layer: Any, adapter: str) -> torch.Tensor:
    """DoRA's magnitude as ComfyUI must read it to rebuild the trained weight (see the module's docstring)."""
    with torch.no_grad():
        base = layer.get_base_layer().weight.detach().float()
        merged = base + layer.get_delta_weight(adapter).float()
        magnitude = layer.lora_magnitude_vector[adapter].weight.detach().float().reshape(-1)
        rows = base.shape[0]
        base_norm = base.reshape(rows, -1).norm(dim=1)
        merged_norm = merged.reshape(rows, -1).norm(dim=1)
        scale = magnitude * (base_norm + DORA_EPS) / merged_norm
    return export(scale.reshape(rows, *[1] * (base.dim() - 1)))


def _loha_tensors(name: str, layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    if adapter in layer.hada_t1:
        raise ValueError(f"{name}: LoHa's Tucker form (hada_t1/t2) is not written")
    tensors = {f"{name}.{key}": export(getattr(layer, key)[adapter])
               for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha[adapter]), dtype=torch.float32)
    _check_scaling(name, layer, adapter)
    return tensors


def _lokr_tensors(name: str, layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    if adapter in layer.lokr_t2:
        raise ValueError(f"{name}: LoKr's Tucker form (lokr_t2) is not written: ComfyUI cannot apply it")
    _check_scaling(name, layer, adapter)
    scale = float(layer.scaling[adapter])
    tensors = {}
    if adapter in layer.lokr_w1:
        tensors[f"{name}.lokr_w1"] = export(layer.lokr_w1[adapter]) * scale  # the scale baked in: no alpha
    else:
        tensors[f"{name}.lokr_w1_a"] = export(layer.lokr_w1_a[adapter]) * scale
        tensors[f"{name}.lokr_w1_b"] = export(layer.lokr_w1_b[adapter])
    if adapter in layer.lokr_w2:
        tensors[f"{name}.lokr_w2"] = export(layer.lokr_w2[adapter])
    else:
        tensors[f"{name}.lokr_w2_a"] = export(layer.lokr_w2_a[adapter])
        tensors[f"{name}.lokr_w2_b"] = export(layer.lokr_w2_b[adapter])
    return tensors


def _check_scaling(name: str, layer: Any, adapter: str) -> None:
    expected = layer.alpha[adapter] / layer.r[adapter]
    if abs(layer.scaling[adapter] - expected) > 1e-6 * max(1.0, abs(expected)):
        raise ValueError(f"{name}: scaling {layer.scaling[adapter]} is not alpha / r ({expected})")


def export(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


def network_metadata(lo: LoraConfig, kohya_module: str, convolutions: bool) -> dict[str, Any]:
    """ss_network_module and ss_network_args as kohya's sd-scripts (LoRA, LoCon) and lycoris-lora's kohya
    network (DoRA, LoHa, LoKr) write them: args as strings, as their command lines parse them."""
    conv = {"conv_dim": str(lo.rank), "conv_alpha": str(lo.alpha)} if convolutions else {}
    if lo.adapter in ("lora", "locon") and not lo.dora:
        return {"ss_network_module": kohya_module} | ({"ss_network_args": conv} if conv else {})
    args: dict[str, Any] = {"algo": "locon" if lo.adapter in ("lora", "locon") else lo.adapter, **conv}
    if lo.dora:
        args |= {"dora_wd": "True", "wd_on_output": "True"}
    if lo.adapter == "lokr":
        args |= {"factor": str(lo.lokr_factor)} | ({"decompose_both": "True"} if lo.lokr_decompose_both else {})
    return {"ss_network_module": LYCORIS_NETWORK_MODULE, "ss_network_args": args}
