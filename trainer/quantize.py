"""A frozen base in 8 or 4 bits, so that a 12B FLUX.1 transformer trains on a 24 GB GPU: the LoRA layers stay
fp32 and full precision; only the frozen Linear weights they sit on are stored quantized.

- `int8`: torchao's int8 weight-only quantization (Int8WeightOnlyConfig). torchao is PyTorch's own
  quantization library; it runs on the CPU as well as on CUDA, and peft trains LoRA on its int8 Linear layers
  (TorchaoLoraLinear). Half the memory of bf16.
- `nf4`: bitsandbytes' 4-bit NormalFloat (QLoRA's), a quarter of bf16; bitsandbytes' kernels need a CUDA GPU.

Quantizing happens on the CPU, before the model moves to the GPU, so that the GPU never holds the 16-bit copy.
"""

from __future__ import annotations

import torch

QUANTIZATIONS = ("none", "int8", "nf4")


def quantize_frozen(model: torch.nn.Module, mode: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Quantize every nn.Linear of `model` in place (before its LoRA layers are added); the number quantized."""
    if mode == "none":
        return 0
    if mode == "int8":
        return _torchao_int8(model)
    if mode == "nf4":
        return _bitsandbytes_nf4(model, device, compute_dtype)
    raise ValueError(f"train.base_quantization {mode!r}: one of {', '.join(QUANTIZATIONS)}")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]


def _torchao_int8(model: torch.nn.Module) -> int:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("train.base_quantization 'int8' needs torchao (in requirements.txt): "
                           "pip install torchao") from exc
    count = len(_linear_names(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, _name: type(module) is torch.nn.Linear)
    return count


def _bitsandbytes_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> int:
    if device.type != "cuda":
        raise RuntimeError("train.base_quantization 'nf4' (bitsandbytes) needs a CUDA GPU; 'int8' (torchao) also "
                           "runs on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError("train.base_quantization 'nf4' needs bitsandbytes: pip install bitsandbytes") from exc
    names = _linear_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        # moving a Params4bit to the GPU is what quantizes it: one layer at a time, never the whole 16-bit copy
        setattr(parent, child, quantized.to(device))
    return len(names)
