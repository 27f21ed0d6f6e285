"""ComfyUI's own Z-Image code on the tiny Z-Image (tests/comfy_zimage_probe.py, a subprocess in ComfyUI's
folder): ComfyUI's NextDiT holding the tiny file predicts what the trainer's model predicts, and ComfyUI's
LoraLoader uses every tensor of our LoRA files and applies the delta peft trained (< 1e-5), on every target
preset, for LoRA, LoHa, LoKr and DoRA. Runs on each ComfyUI the suite is run against (marker comfy_code)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_cases import ADAPTERS
from safetensors.torch import save_file
from test_flux_comfy import TOLERANCE, assert_comfyui_applies_every_module, run_probe, write_lora
from tiny_model import ZIMAGE_DIM, ZIMAGE_TEXT_DIM, build_zimage_transformer, comfy_zimage_layout

from trainer.config import ModelConfig
from trainer.families import family_for

pytestmark = pytest.mark.comfy_code
PROBE = Path(__file__).absolute().parent / "comfy_zimage_probe.py"
# case -> (target preset, adapter settings)
CASES = {"attention": ("attention", {}), "attention_ff": ("attention_ff", {}), "all": ("all", {}),
         "loha": ("attention_ff", ADAPTERS["loha"]), "lokr": ("all", ADAPTERS["lokr"]),
         "lokr_split": ("attention", ADAPTERS["lokr_split"]), "dora": ("all", ADAPTERS["dora"])}


def expected_deltas(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI weight key -> the delta of each trained module, mapped to ComfyUI's fused attention.qkv."""
    full = {name: torch.zeros_like(value) for name, value in build_zimage_transformer().state_dict().items()}
    for name, delta in deltas.items():
        full[f"{name.removeprefix('diffusion_model.')}.weight"] = delta
    return {f"diffusion_model.{key}": value for key, value in comfy_zimage_layout(full).items()
            if key.endswith(".weight") and value.abs().max() > 0}


@pytest.fixture(scope="module")
def comfy_zimage(tiny_zimage, comfy_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("comfy-zimage")
    model = ModelConfig(**tiny_zimage["model"])
    loras = {case: folder / f"{case}.safetensors" for case in CASES}
    deltas = {case: write_lora(model, preset, False, loras[case], **settings)
              for case, (preset, settings) in CASES.items()}
    g = torch.Generator().manual_seed(3)
    inputs = {"x": torch.randn(1, 16, 8, 12, generator=g), "timestep": torch.tensor([0.4]),
              "context": torch.randn(1, 20, ZIMAGE_TEXT_DIM, generator=g)}
    save_file(inputs, str(folder / "inputs.safetensors"))
    request = {"transformer": str(tiny_zimage["files"]["transformer"]),
               "sizes": {"dim": ZIMAGE_DIM, "layers": 1, "refiners": 1, "heads": ZIMAGE_DIM // 128,
                         "caption": ZIMAGE_TEXT_DIM, "axes": [32, 48, 48]},
               "loras": {k: str(v) for k, v in loras.items()}, "inputs": str(folder / "inputs.safetensors"),
               "out_dir": str(folder)}
    return {"model": model, "inputs": inputs, "loras": loras, "module_deltas": deltas,
            **run_probe(PROBE, request, comfy_dir, folder)}


def test_comfyui_zimage_model_predicts_what_the_trainer_predicts(comfy_zimage) -> None:
    assert comfy_zimage["report"]["load"] == {"missing": [], "unexpected": []}
    family = family_for(comfy_zimage["model"])
    components = family.load(comfy_zimage["model"], torch.float32)
    inputs = comfy_zimage["inputs"]
    text = {"hidden": inputs["context"], "mask": torch.ones(inputs["context"].shape[:2])}
    with torch.no_grad():
        ours = family.predict(components.denoiser, inputs["x"], inputs["timestep"], text, torch.zeros(1, 6))
    assert (ours - comfy_zimage["forward"]).abs().max().item() < TOLERANCE


def test_comfyui_uses_every_tensor_and_applies_the_trained_delta(comfy_zimage) -> None:
    assert_comfyui_applies_every_module(comfy_zimage, "Z-Image", expected_deltas)
