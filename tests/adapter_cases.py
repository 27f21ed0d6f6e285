"""The adapter types each family's loader checks run on, and what a trained adapter really changes.

The deltas are peft's own merge (the base weight after `merge()` less before), so a mistake in how the writer
scales or lays out LoHa, LoKr or DoRA tensors cannot cancel against the same mistake in the check.
"""

from __future__ import annotations

import torch

from trainer.adapters import adapter_layers
from trainer.families.base import ModelFamily
from trainer.lora_file import ADAPTER

# name -> lora config settings; each is on top of the case's target preset
ADAPTERS = {
    "loha": {"adapter": "loha"},
    "lokr": {"adapter": "lokr"},  # small layers: both factors full, the scale baked into w1
    "lokr_split": {"adapter": "lokr", "lokr_factor": 4, "lokr_decompose_both": True},  # both factors low-rank
    "dora": {"dora": True},
}
CONV_ADAPTERS = {"locon": {"adapter": "locon"}, "locon_dora": {"adapter": "locon", "dora": True},
                 "loha_conv": {"adapter": "loha"}, "lokr_conv": {"adapter": "lokr"}}
SCALE = 0.05  # LoRA: deltas of ~1e-2, a thousand times the checks' tolerance
# LoHa and LoKr multiply two or three such factors: larger ones give deltas of the same ~1e-2
FACTOR_SCALE = 0.3


def randomize(parts: dict[str, torch.nn.Module], seed: int) -> None:
    """Every adapter weight drawn at random (peft starts one factor at zero, and a zero delta proves nothing);
    DoRA's magnitudes moved by a few percent around the base weights' norms they start from."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in parts.values():
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                noise = torch.randn(param.shape, generator=generator)
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + SCALE * noise)
                else:
                    param.copy_(noise * (FACTOR_SCALE if ".hada_" in name or ".lokr_" in name else SCALE))


def merged_deltas(parts: dict[str, torch.nn.Module], family: ModelFamily) -> dict[str, torch.Tensor]:
    """File module name -> how the trained adapter changes that module's weight (fp32)."""
    deltas = {}
    with torch.no_grad():
        for prefix, model in parts.items():
            for path, layer in adapter_layers(model, ADAPTER):
                base = layer.get_base_layer().weight
                before = base.detach().float().clone()
                layer.merge(adapter_names=[ADAPTER])
                deltas[family.kohya_name(prefix, model, path)] = layer.get_base_layer().weight.detach().float() - before
                layer.unmerge()
    return deltas
