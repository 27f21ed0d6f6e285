"""Loads LoRA files the way ComfyUI's LoraLoader node does and reports what ComfyUI made of them.

Run in a subprocess with ComfyUI's folder as the working directory (ComfyUI's imports have global side
effects, so the test process never imports it):

    python comfy_lora_probe.py < REQUEST.json

It imports ComfyUI before it reads the request, so it can be started early. The request:
{"unet_config": ComfyUI unet_config of the base UNet, "clip_config": overrides of ComfyUI's SD1 CLIP config,
"base": a safetensors file with the base weights ("unet." + diffusers UNet keys, "text_encoder." + CLIP keys
named text_model.*), "loras": {case: LoRA file}, "out_dir": folder}.

Writes OUT_DIR/report.json and, per case, OUT_DIR/CASE.safetensors holding for each LoRA module name the
ComfyUI weight it patches (NAME.base) and the delta ComfyUI applies to it at strength 1 (NAME.delta).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CPU = torch.device("cpu")
NOT_LOADED = "lora key not loaded"  # comfy.lora.load_lora's warning for a key it did not use


def import_comfy():
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.utils

    return comfy


def with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}


def build_unet(comfy, diffusers_weights: dict[str, torch.Tensor], unet_config: dict) -> tuple[object, dict]:
    """A ModelPatcher of the UNet, renamed from diffusers form as comfy.sd.load_diffusion_model_state_dict
    does (its config lookup only knows full-size models, so the config comes from the request)."""
    rename = comfy.utils.unet_to_diffusers(unet_config)
    unmapped = sorted(set(diffusers_weights) - set(rename))
    if unmapped:
        raise SystemExit(f"unet_config does not describe the UNet: no ComfyUI name for {unmapped[:5]}")
    ldm_weights = {rename[key]: value for key, value in diffusers_weights.items()}
    detected = comfy.model_detection.detect_unet_config(ldm_weights, "")
    model_config = comfy.supported_models.SD15(detected)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(ldm_weights, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), detected


def build_clip(comfy, weights: dict[str, torch.Tensor], clip_config: dict) -> tuple[object, dict]:
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {
        "clip_l_model_config": clip_config,
        "load_device": CPU,
        "offload_device": CPU,
        "dtype": torch.float32,
    }
    clip = comfy.sd.CLIP(target, model_options=options)
    missing, unexpected = clip.cond_stage_model.load_sd(weights)
    return clip, {"missing": list(missing), "unexpected": list(unexpected)}


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class AppliedLora:
    names: list[str]  # the file's module names
    patches: dict  # ComfyUI weight key -> its patches, UNet and CLIP together
    key_map: dict[str, str]  # ComfyUI's LoRA name -> weight key map for this model
    weights: dict[str, torch.Tensor]  # the model's weights by ComfyUI key
    warnings: list[str]  # what ComfyUI logged while loading the file

    def deltas(self, comfy) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module name, fp32 base weight, the change ComfyUI makes to it at strength 1) for each module of the
        file that ComfyUI patched."""
        for name in self.names:
            key = self.key_map.get(name)
            if key in self.patches:
                base = self.weights[key].float()
                yield name, base, comfy.lora.calculate_weight(self.patches[key], base.clone(), key) - base


def apply_lora(comfy, model, clip, path: str) -> AppliedLora:
    """The file through what ComfyUI's LoraLoader node runs, at strength 1 (`clip` None: the model only, as
    LoraLoaderModelOnly)."""
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    warnings = Warnings()
    logging.getLogger().addHandler(warnings)
    try:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(warnings)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches, weights = dict(new_model.patches), dict(model.model.state_dict())
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        patches |= new_clip.patcher.patches
        weights |= clip.cond_stage_model.state_dict()
    return AppliedLora(
        names=sorted({key.split(".")[0] for key in lora}),
        patches=patches,
        key_map=key_map,
        weights=weights,
        warnings=warnings.messages,
    )


def unconsumed(warnings: list[str]) -> list[str]:
    return sorted(m.split(": ", 1)[1] for m in warnings if m.startswith(NOT_LOADED))


def probe_lora(comfy, model, clip, path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    applied = apply_lora(comfy, model, clip, path)
    tensors = {}
    for name, base, delta in applied.deltas(comfy):
        tensors[f"{name}.base"] = base
        tensors[f"{name}.delta"] = delta
    report = {
        "warnings": applied.warnings,
        "unconsumed": unconsumed(applied.warnings),
        "patched": sorted(applied.patches),
        "key_map": {name: applied.key_map.get(name) for name in applied.names},
    }
    return report, tensors


def main() -> None:
    comfy = import_comfy()
    request = json.loads(sys.stdin.read())
    out_dir = Path(request["out_dir"])
    base = load_file(request["base"])
    model, detected = build_unet(comfy, with_prefix(base, "unet."), request["unet_config"])
    clip, clip_load = build_clip(comfy, with_prefix(base, "text_encoder."), request["clip_config"])
    report = {"unet_config": detected, "clip_load": clip_load, "loras": {}}
    for case, path in request["loras"].items():
        report["loras"][case], tensors = probe_lora(comfy, model, clip, path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{case}.safetensors"))
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
