"""Loads Z-Image LoRA files the way ComfyUI's LoraLoader node does, on ComfyUI's own Z-Image model (NextDiT)
built with tiny sizes, and reports what ComfyUI made of them.

ComfyUI derives Z-Image's hyper-parameters only at its full width (3840: anything else is read as Lumina 2),
so the probe builds ComfyUI's Z-Image model class (supported_models.ZImage) with the tiny sizes and loads the
tiny file into it. Run with ComfyUI's folder as the working directory:

    python comfy_zimage_probe.py < REQUEST.json

The request: {"transformer": file in ComfyUI's layout, "sizes": {...}, "loras": {case: file}, "inputs":
safetensors of x / timestep / context, "out_dir": folder}. Writes OUT_DIR/report.json,
OUT_DIR/forward.safetensors and, per case, OUT_DIR/delta-CASE.safetensors (see comfy_flux_probe.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from comfy_flux_probe import probe_loras
from comfy_lora_probe import CPU, import_comfy
from safetensors.torch import load_file, save_file


def zimage_unet_config(sizes: dict) -> dict:
    return {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": sizes["dim"],
        "n_layers": sizes["layers"], "n_refiner_layers": sizes["refiners"], "n_heads": sizes["heads"],
        "n_kv_heads": sizes["heads"], "qk_norm": True, "cap_feat_dim": sizes["caption"],
        "axes_dims": sizes["axes"], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    }


def build_zimage(comfy, weights: dict[str, torch.Tensor], sizes: dict) -> tuple[object, dict]:
    model_config = comfy.supported_models.ZImage(zimage_unet_config(sizes))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    result = model.diffusion_model.load_state_dict(model_config.process_unet_state_dict(dict(weights)), strict=False)
    # 0.3.75's NextDiT holds a final norm its forward never uses (real Z-Image files lack it too)
    missing = sorted(key for key in result.missing_keys if key != "norm_final.weight")
    load = {"missing": missing, "unexpected": sorted(result.unexpected_keys)}
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), load


def main() -> None:
    comfy = import_comfy()
    request = json.loads(sys.stdin.read())
    out_dir = Path(request["out_dir"])
    model, load = build_zimage(comfy, load_file(request["transformer"]), request["sizes"])
    inputs = load_file(request["inputs"])
    with torch.no_grad():
        context = inputs["context"]
        out = model.model.diffusion_model(inputs["x"], inputs["timestep"], context, context.shape[1])
    save_file({"out": out.contiguous()}, str(out_dir / "forward.safetensors"))
    report = {"load": load, "loras": probe_loras(comfy, model, None, request["loras"], out_dir)}
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
