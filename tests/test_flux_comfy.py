"""ComfyUI's own FLUX code on the tiny FLUX.1 (tests/comfy_flux_probe.py, a subprocess in ComfyUI's folder):
ComfyUI's FLUX model holding the tiny file predicts what the trainer's converted model predicts, and
ComfyUI's LoraLoader uses every tensor of our files and applies the delta peft trained (< 1e-5), on every
target preset, CLIP-L included, for LoRA, LoHa, LoKr (factors whole and split) and DoRA. Runs on each ComfyUI
the suite is run against (marker comfy_code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_cases import ADAPTERS, merged_deltas, randomize
from safetensors.torch import load_file, save_file
from tiny_model import FLUX_HEAD, FLUX_TEXT_DIMS, bfl_tensors

from trainer.config import LoraConfig, ModelConfig, RunConfig
from trainer.families import family_for
from trainer.loop import add_lora, trained_parts
from trainer.lora_file import kohya_state_dict

pytestmark = pytest.mark.comfy_code
PROBE = Path(__file__).absolute().parent / "comfy_flux_probe.py"
# case -> (target preset, train CLIP-L too, adapter settings); adapter_cases.ADAPTERS on top of LoRA's
CASES = {
    "dev": {"attention": ("attention", False, {}), "attention_ff": ("attention_ff", False, {}),
            "all": ("all", True, {}), "loha": ("all", True, ADAPTERS["loha"]),
            "lokr": ("attention_ff", True, ADAPTERS["lokr"]), "lokr_split": ("all", False, ADAPTERS["lokr_split"]),
            "dora": ("all", True, ADAPTERS["dora"])},
    "schnell": {"all": ("all", True, {})},
}
TOLERANCE = 1e-5
ALPHA = 2.0


def write_lora(model: ModelConfig, preset: str, text_encoder: bool, path: Path, **settings) -> dict[str, torch.Tensor]:
    """An adapter of the preset through the trainer's own adapters and writer, every weight of it drawn at random
    (a zero delta would prove nothing); returns what it changes in each module (adapter_cases.merged_deltas)."""
    cfg = RunConfig(lora=LoraConfig(rank=4, alpha=ALPHA, targets=preset, train_text_encoder=text_encoder,
                                     **settings))
    family = family_for(model)
    components = family.load(model, torch.float32)
    add_lora(cfg, family, components)
    parts = trained_parts(cfg, family, components)
    randomize(parts, seed=11)
    save_file(kohya_state_dict(parts, family, alpha=ALPHA), str(path))
    return merged_deltas(parts, family)


def expected_deltas(deltas: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """ComfyUI weight key -> the delta of each trained module (by file name), the transformer's mapped to BFL's
    fused weights."""
    from tiny_model import build_flux_transformer

    full = {name: torch.zeros_like(value) for name, value in build_flux_transformer(config.guidance_embeds)
            .state_dict().items()}
    for name, delta in deltas.items():
        if name.startswith("transformer."):
            full[f"{name.removeprefix('transformer.')}.weight"] = delta
    expected = {f"diffusion_model.{key}": value for key, value in bfl_tensors(full, config).items()
                if key.endswith(".weight") and value.abs().max() > 0}
    for name, delta in deltas.items():
        if name.startswith("text_encoder."):
            expected[f"clip_l.transformer.{name.removeprefix('text_encoder.')}.weight"] = delta
    return expected


@pytest.fixture(scope="module", params=sorted(CASES))
def comfy_flux(request, tiny_flux, tiny_flux_schnell, comfy_dir, tmp_path_factory) -> dict:
    variant = request.param
    tiny = tiny_flux if variant == "dev" else tiny_flux_schnell
    folder = tmp_path_factory.mktemp(f"comfy-flux-{variant}")
    model = ModelConfig(**tiny["model"])
    loras, deltas = {}, {}
    for case, (preset, text_encoder, settings) in CASES[variant].items():
        loras[case] = folder / f"{case}.safetensors"
        deltas[case] = write_lora(model, preset, text_encoder, loras[case], **settings)
    g = torch.Generator().manual_seed(3)
    inputs = {"x": torch.randn(1, 16, 8, 12, generator=g), "timestep": torch.tensor([0.4]),
              "context": torch.randn(1, 20, FLUX_TEXT_DIMS[1], generator=g),
              "y": torch.randn(1, FLUX_TEXT_DIMS[0], generator=g), "guidance": torch.tensor([1.0])}
    save_file(inputs, str(folder / "inputs.safetensors"))
    sizes = {"hidden": 2 * FLUX_HEAD, "heads": 2, "depth": 1, "single": 1, "pooled": FLUX_TEXT_DIMS[0],
             "context": FLUX_TEXT_DIMS[1], "guidance": variant == "dev",
             "axes": [FLUX_HEAD // 8, FLUX_HEAD * 7 // 16, FLUX_HEAD * 7 // 16]}
    request_body = {
        "transformer": str(tiny["files"]["transformer"]), "clip_l": str(tiny["files"]["clip_l"]), "sizes": sizes,
        "clip_config": {"hidden_size": FLUX_TEXT_DIMS[0], "intermediate_size": 2 * FLUX_TEXT_DIMS[0],
                        "num_hidden_layers": 3, "num_attention_heads": 1, "hidden_act": "quick_gelu"},
        "schnell": variant == "schnell", "loras": {k: str(v) for k, v in loras.items()},
        "inputs": str(folder / "inputs.safetensors"), "out_dir": str(folder),
    }
    return {"variant": variant, "model": model, "inputs": inputs, "loras": loras, "module_deltas": deltas,
            **run_probe(PROBE, request_body, comfy_dir, folder)}


def run_probe(probe: Path, request: dict, comfy_dir: Path, folder: Path) -> dict:
    """A probe in ComfyUI's folder; its report, ComfyUI's prediction and each case's deltas."""
    result = subprocess.run([sys.executable, str(probe)], input=json.dumps(request), cwd=comfy_dir,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(probe.parent)))
    assert result.returncode == 0, result.stderr[-4000:]
    return {"report": json.loads((folder / "report.json").read_text()),
            "forward": load_file(str(folder / "forward.safetensors"))["out"],
            "deltas": {case: load_file(str(folder / f"delta-{case}.safetensors")) for case in request["loras"]}}


def test_comfyui_flux_model_predicts_what_the_trainer_predicts(comfy_flux) -> None:
    assert comfy_flux["report"]["load"]["unexpected"] == []
    # 0.3.75's NextDiT-style unused final norm aside, every ComfyUI FLUX weight came from the file
    assert comfy_flux["report"]["load"]["missing"] == []
    family = family_for(comfy_flux["model"])
    components = family.load(comfy_flux["model"], torch.float32)
    inputs = comfy_flux["inputs"]
    with torch.no_grad():
        ours = family.predict(components.denoiser, inputs["x"], inputs["timestep"],
                              {"hidden": inputs["context"], "pooled": inputs["y"]}, torch.zeros(1, 6))
    assert (ours - comfy_flux["forward"]).abs().max().item() < TOLERANCE


def test_comfyui_uses_every_tensor_and_applies_the_trained_delta(comfy_flux) -> None:
    config = family_for(comfy_flux["model"]).load(comfy_flux["model"], torch.float32).denoiser.config
    assert_comfyui_applies_every_module(comfy_flux, f"FLUX.1 {comfy_flux['variant']}",
                                        lambda tensors: expected_deltas(tensors, config))


def assert_comfyui_applies_every_module(probed: dict, label: str, expected_of) -> None:
    """Every module of each case's file is in ComfyUI's key map, nothing is left unloaded, and each patched
    weight changes by what the trained adapter changes (`expected_of(module deltas)`: ComfyUI weight key ->
    delta)."""
    for case in probed["loras"]:
        report, comfy_deltas = probed["report"]["loras"][case], probed["deltas"][case]
        assert report["unconsumed"] == [] and report["warnings"] == [], (case, report["warnings"][:5])
        assert report["mapped"] == report["names"], (case, sorted(set(report["names"]) - set(report["mapped"])))
        expected = expected_of(probed["module_deltas"][case])
        assert set(comfy_deltas) == set(expected), (case, sorted(set(comfy_deltas) ^ set(expected))[:6])
        worst = max((comfy_deltas[key] - expected[key]).abs().max().item() for key in expected)
        print(f"ComfyUI {label} {case}: {len(report['names'])} modules, {len(expected)} weights, "
              f"max abs diff {worst:.2g}")
        assert worst < TOLERANCE, (case, max(((comfy_deltas[k] - expected[k]).abs().max().item(), k)
                                             for k in expected))
