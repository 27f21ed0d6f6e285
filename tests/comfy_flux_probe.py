"""Loads FLUX.1 LoRA files the way ComfyUI's LoraLoader node does, on a ComfyUI FLUX model built from a
tiny-width file in Black Forest Labs' layout, and reports what ComfyUI made of them.

ComfyUI derives a FLUX model's sizes from its weights but fixes the head count (24 in 0.3.75, width / 128 in
0.33), so a tiny width cannot go through its detection: the probe builds ComfyUI's own FLUX model class
(supported_models.Flux / FluxSchnell) with the tiny sizes and loads the file into it. Run with ComfyUI's
folder as the working directory:

    python comfy_flux_probe.py < REQUEST.json

The request: {"transformer": BFL file, "clip_l": CLIP-L file, "sizes": {...}, "schnell": bool,
"loras": {case: file}, "inputs": safetensors of x / timestep / context / y / guidance, "out_dir": folder}.
Writes OUT_DIR/report.json, OUT_DIR/forward.safetensors (ComfyUI's prediction for the inputs) and per case
OUT_DIR/delta-CASE.safetensors: for each ComfyUI weight a LoRA patches, the change it makes at strength 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from comfy_lora_probe import CPU, apply_lora, build_clip, import_comfy, unconsumed
from safetensors.torch import load_file, save_file


def flux_unet_config(comfy, sizes: dict) -> dict:
    """ComfyUI's unet_config of FLUX.1 at the tiny sizes; the fields this ComfyUI's FluxParams has."""
    import comfy.ldm.flux.model as flux_model

    config = {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "qkv_bias": True,
        "mlp_ratio": 4.0, "theta": 10000, "vec_in_dim": sizes["pooled"], "context_in_dim": sizes["context"],
        "hidden_size": sizes["hidden"], "num_heads": sizes["heads"], "depth": sizes["depth"],
        "depth_single_blocks": sizes["single"], "axes_dim": sizes["axes"], "guidance_embed": sizes["guidance"],
        "txt_ids_dims": [],  # 0.33: no text position axes (FLUX.1)
    }
    fields = {field.name for field in dataclasses.fields(flux_model.FluxParams)}
    return {key: value for key, value in config.items() if key in fields or key == "image_model"}


def build_flux(comfy, bfl: dict[str, torch.Tensor], sizes: dict, schnell: bool) -> tuple[object, dict]:
    supported = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
    model_config = supported(flux_unet_config(comfy, sizes))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    weights = model_config.process_unet_state_dict(dict(bfl))  # 0.33 renames the norms' .scale to .weight
    result = model.diffusion_model.load_state_dict(weights, strict=False)
    load = {"missing": sorted(result.missing_keys), "unexpected": sorted(result.unexpected_keys)}
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), load


def patched_deltas(comfy, applied) -> dict[str, torch.Tensor]:
    """Every patched weight's change at strength 1 (q, k and v slices of one fused weight together)."""
    deltas = {}
    for key, patches in applied.patches.items():
        base = applied.weights[key].float()
        deltas[key] = comfy.lora.calculate_weight(patches, base.clone(), key) - base
    return deltas


def lora_report(applied, path: str) -> dict:
    """What ComfyUI logged and which of the file's modules its key map knows (diffusers-style names hold dots:
    a module's name is its key less the tensor's own part: `lora_A.weight`, or one word such as `alpha`,
    `dora_scale`, `hada_w1_a`, `lokr_w1`)."""
    names = sorted({key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in load_file(path)})
    return {"warnings": applied.warnings, "unconsumed": unconsumed(applied.warnings), "names": names,
            "mapped": [name for name in names if name in applied.key_map]}


def probe_loras(comfy, model, clip, loras: dict[str, str], out_dir: Path) -> dict:
    """Each case's file through ComfyUI's loader: its report, and OUT_DIR/delta-CASE.safetensors."""
    reports = {}
    for case, path in loras.items():
        applied = apply_lora(comfy, model, clip, path)
        reports[case] = lora_report(applied, path)
        save_file({k: v.contiguous() for k, v in patched_deltas(comfy, applied).items()},
                  str(out_dir / f"delta-{case}.safetensors"))
    return reports


def main() -> None:
    comfy = import_comfy()
    request = json.loads(sys.stdin.read())
    out_dir = Path(request["out_dir"])
    model, load = build_flux(comfy, load_file(request["transformer"]), request["sizes"], request["schnell"])
    clip, clip_load = build_clip(comfy, load_file(request["clip_l"]), request["clip_config"])
    inputs = load_file(request["inputs"])
    with torch.no_grad():
        guidance = None if request["schnell"] else inputs["guidance"]
        out = model.model.diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], guidance)
    save_file({"out": out.contiguous()}, str(out_dir / "forward.safetensors"))
    report = {"load": load, "clip_load": clip_load, "loras": probe_loras(comfy, model, clip, request["loras"], out_dir)}
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
