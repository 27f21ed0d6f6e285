"""The pack's side of the full-structure SDXL checks (test_sdxl_checkpoint.py), in a process of its own so that
the fp16 model it loads is handed back to the system before ComfyUI loads its copy:

    python sdxl_lora_probe.py < REQUEST.json

The request: {"checkpoint": file, "tokenizer_dir": folder, "presets": [...], "adapters": {case: lora settings},
"adapter_preset": the adapters' target preset, "prompt": text, "out_dir": folder}.
From one load of the checkpoint (fp16, its dtype in the file) it writes to OUT_DIR:
- CASE.safetensors: a LoRA per target preset and a file per adapter case, both text encoders trained, made by
  the trainer's own adapter code (loop.add_lora) and kohya writer, with up-projections (adapters: every factor)
  drawn at random (peft starts them at zero, and a zero delta would prove nothing);
- peft-CASE.safetensors: per kohya module name, the sketch (comfy_sdxl_probe.sketch) of the trained delta;
- diffusers-PRESET.safetensors: the same for what StableDiffusionXLPipeline.load_lora_weights made of the file;
- encoding.safetensors: the trainer's prompt encoding, with the fp16 text encoders upcast to fp32 for it;
- probe_vectors.safetensors, and report.json: modules adapted per preset and LoRA prefix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from comfy_sdxl_probe import ProbeVectors, sketch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from adapter_cases import randomize  # noqa: E402 (it imports the trainer)

from trainer.adapters import adapter_layers  # noqa: E402

UP_SCALE = 0.05  # deltas of ~1e-2, a thousand times the tests' tolerance


def remove_adapters(model: torch.nn.Module) -> None:
    """Put each adapted layer's base layer back, so the next case starts from the plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def draw_up_weights(parts: dict[str, torch.nn.Module], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for model in parts.values():
        for _, layer in adapter_layers(model, "default"):
            up = layer.lora_B["default"].weight
            up.data = torch.randn(up.shape, generator=generator) * UP_SCALE


def effective_delta(layer, adapter: str) -> torch.Tensor:
    """What the adapter changes in the layer's weight, in fp32: peft's delta, and for DoRA the whole change
    m * (W + delta) / ||W + delta|| - W (computed here, not by merging: the fp16 weight would round it)."""
    delta = layer.get_delta_weight(adapter).float()
    if not getattr(layer, "use_dora", {}).get(adapter, False):
        return delta
    base = layer.get_base_layer().weight.float()
    merged = base + delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    magnitude = layer.lora_magnitude_vector[adapter].weight.float().reshape(norm.shape)
    return merged * (magnitude / norm) - base


def sketches(family, parts: dict[str, torch.nn.Module], adapter: str, vectors: ProbeVectors) -> dict:
    # one module at a time: all of the "all" preset's deltas in fp32 would outweigh the UNet
    with torch.no_grad():
        return {family.kohya_name(prefix, model, path): sketch(effective_delta(layer, adapter), vectors)
                for prefix, model in parts.items() for path, layer in adapter_layers(model, adapter)}


def encode(family, components, prompt: str) -> dict[str, torch.Tensor]:
    encoders = components.text_encoders
    tokens = family.tokenize(components, [prompt])
    for encoder in encoders.values():
        encoder.float()  # exact: fp16 weights upcast
    with torch.no_grad():
        encoding = {name: value.float().contiguous() for name, value in family.encode_prompt(encoders, tokens).items()}
    for encoder in encoders.values():
        encoder.half()
    return encoding


def main() -> None:
    from trainer.config import LoraConfig, ModelConfig, RunConfig
    from trainer.families import get_family
    from trainer.loop import add_lora
    from trainer.lora_file import kohya_state_dict

    request = json.loads(sys.stdin.read())
    out = Path(request["out_dir"])
    family = get_family("sdxl")
    model = ModelConfig(path=request["checkpoint"], family="sdxl", tokenizer_dir=request["tokenizer_dir"])
    components = family.load(model, torch.float16)
    save_file(encode(family, components, request["prompt"]), str(out / "encoding.safetensors"))
    vectors, modules, loras = ProbeVectors(), {}, {}
    cases = {preset: (preset, {}) for preset in request["presets"]} | {
        case: (request["adapter_preset"], settings) for case, settings in request["adapters"].items()}
    for index, (case, (preset, settings)) in enumerate(cases.items()):
        lora = LoraConfig(rank=4, alpha=8.0, targets=preset, train_text_encoder=True, train_text_encoder_2=True,
                          **settings)
        add_lora(RunConfig(model=model, lora=lora), family, components)
        parts = components.parts()
        if settings:
            randomize(parts, seed=index)  # every factor of LoHa / LoKr, DoRA's magnitudes too
        else:
            draw_up_weights(parts, seed=index)
        path = out / f"{case}.safetensors"
        save_file(kohya_state_dict(parts, family, alpha=lora.alpha), str(path))
        if not settings:
            loras[case] = path  # diffusers reads LoRA files only
        modules[case] = {prefix: len(list(adapter_layers(part, "default"))) for prefix, part in parts.items()}
        save_file(sketches(family, parts, "default", vectors), str(out / f"peft-{case}.safetensors"))
        for part in parts.values():
            remove_adapters(part)
    pipe = family.sampling_pipeline(components, components.denoiser)
    for preset, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=preset)
        save_file(sketches(family, components.parts(), preset, vectors), str(out / f"diffusers-{preset}.safetensors"))
        pipe.unload_lora_weights()
    save_file(dict(vectors), str(out / "probe_vectors.safetensors"))
    (out / "report.json").write_text(json.dumps({"modules": modules}))


if __name__ == "__main__":
    main()
