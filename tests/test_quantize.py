"""A quantized frozen base (trainer/quantize.py): int8 through torchao trains here on the CPU and writes the
same LoRA layout; nf4 through bitsandbytes needs CUDA (tested where a GPU is, refused clearly elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_trainer
from test_flux import flux_config
from test_trainer import assert_ok, lora_of

from trainer.config import ModelConfig
from trainer.families import family_for
from trainer.quantize import quantize_frozen


def test_int8_base_predicts_close_to_the_full_precision_one(tiny_flux) -> None:
    model = ModelConfig(**tiny_flux["model"])
    family = family_for(model)
    full, quantized = family.load(model, torch.float32), family.load(model, torch.float32)
    linears = sum(type(m) is torch.nn.Linear for m in quantized.denoiser.modules())
    assert quantize_frozen(quantized.denoiser, "int8", torch.device("cpu"), torch.float32) == linears > 0
    weight = quantized.denoiser.transformer_blocks[0].attn.to_q.weight
    assert "Int8" in type(weight).__name__
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 8, 8, generator=g)
    text = {"hidden": torch.randn(1, 12, 32, generator=g), "pooled": torch.randn(1, 64, generator=g)}
    with torch.no_grad():
        ours = family.predict(quantized.denoiser, noisy, torch.tensor([0.5]), text, torch.zeros(1, 6))
        reference = family.predict(full.denoiser, noisy, torch.tensor([0.5]), text, torch.zeros(1, 6))
    assert ((ours - reference).norm() / reference.norm()).item() < 0.02


def test_int8_base_trains_the_same_lora_layout(tmp_path, tiny_flux, two_image_folder) -> None:
    plain = flux_config(tmp_path / "plain", tiny_flux, two_image_folder, train={"max_steps": 3})
    int8 = flux_config(tmp_path / "int8", tiny_flux, two_image_folder,
                       train={"max_steps": 3, "base_quantization": "int8"})
    assert_ok(run_trainer(plain))
    assert_ok(run_trainer(int8))
    a, b = lora_of(plain), lora_of(int8)
    assert a.keys() == b.keys()
    assert max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k) > 1e-4  # it trained
    # the same training on a base that differs by int8 rounding: the updates point the same way, not equal
    up_a = torch.cat([a[k].flatten() for k in sorted(a) if "lora_B" in k])
    up_b = torch.cat([b[k].flatten() for k in sorted(b) if "lora_B" in k])
    similarity = torch.nn.functional.cosine_similarity(up_a, up_b, dim=0).item()
    print(f"int8 base against full precision: cosine similarity of the trained up matrices {similarity:.3f}")
    assert not torch.equal(up_a, up_b) and similarity > 0.9


def test_nf4_needs_cuda_and_says_so(tiny_flux) -> None:
    with pytest.raises(RuntimeError, match="nf4.*needs a CUDA GPU; 'int8' \\(torchao\\) also runs"):
        quantize_frozen(torch.nn.Linear(4, 4), "nf4", torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 4-bit kernels need CUDA (mocked nowhere)")
def test_nf4_base_trains_on_cuda(tmp_path, tiny_flux, two_image_folder) -> None:
    cfg = flux_config(tmp_path / "nf4", tiny_flux, two_image_folder,
                      train={"max_steps": 3, "base_quantization": "nf4", "device": "cuda",
                             "mixed_precision": "bf16"})
    assert_ok(run_trainer(cfg))
    assert Path(cfg["output"]["lora_path"]).is_file()
