"""Loads a full SDXL checkpoint the way CheckpointLoaderSimple does, then LoRA files the way LoraLoader does, and
reports what ComfyUI made of them.

Run in a subprocess with ComfyUI's folder as the working directory (ComfyUI's imports have global side
effects, so the test process never imports it):

    python comfy_sdxl_probe.py < REQUEST.json

The request: {"checkpoint": file, "loras": {case: LoRA file}, "probe_vectors": file, "prompt": text,
"size": [width, height], "out_dir": folder}.

The UNet is held in fp16 (what the file stores) and the text encoders in fp32, so the probe fits beside the
test's own process on a 24 GiB machine and its text encodings are exact. Writes OUT_DIR/report.json,
OUT_DIR/encoding.safetensors (CLIPTextEncodeSDXL's conditioning and pooled output for the prompt), and per case
OUT_DIR/CASE.safetensors: for each LoRA module name, the delta ComfyUI applies at strength 1, flattened to
(out, in * kernel) and multiplied by the probe vectors of that width (a full fp32 copy of every delta of the
"all" preset would be larger than the UNet).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch
from comfy_lora_probe import apply_lora, unconsumed
from safetensors.torch import load_file, save_file

PROBE_COLUMNS = 4


def import_comfy():
    sys.argv = ["main.py", "--cpu", "--fp16-unet", "--fp32-text-enc"]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL

    return comfy, CLIPTextEncodeSDXL


def encode(node, clip, prompt: str, width: int, height: int) -> dict[str, torch.Tensor]:
    """The prompt through ComfyUI's CLIPTextEncodeSDXL node, both encoders given the same text."""
    result = node.execute(clip=clip, width=width, height=height, crop_w=0, crop_h=0, target_width=width,
                          target_height=height, text_g=prompt, text_l=prompt)
    outputs = getattr(result, "result", result)  # V3 NodeOutput (0.3.75 and later) or a plain tuple
    cond, extras = outputs[0][0]
    return {"hidden": cond.float().contiguous(), "pooled": extras["pooled_output"].float().contiguous()}


class ProbeVectors(dict):
    """Unit-length random columns per flattened weight width (made on first use, seeded by the width): a delta
    that differs anywhere changes its sketch, and a per-element difference e changes the sketch by about e."""

    def __missing__(self, width: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(width.encode()))
        columns = torch.randn(int(width), PROBE_COLUMNS, generator=generator)
        self[width] = (columns / columns.norm(dim=0)).contiguous()
        return self[width]


def sketch(delta: torch.Tensor, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The delta, flattened to (out, in * kernel), times the probe vectors of that width. Detached: a trainable
    adapter's delta carries an autograd graph that would keep every full-size delta alive."""
    flat = delta.detach().float().reshape(delta.shape[0], -1)
    return (flat @ vectors[str(flat.shape[1])]).contiguous()


def probe_lora(comfy, model, clip, path: str, vectors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    applied = apply_lora(comfy, model, clip, path)
    sketches = {name: sketch(delta, vectors) for name, _, delta in applied.deltas(comfy)}
    unet_patched = sum(key.startswith("diffusion_model.") for key in applied.patches)
    report = {
        "modules": len(applied.names),
        "patched_unet": unet_patched,
        "patched_clip": len(applied.patches) - unet_patched,
        "unconsumed": unconsumed(applied.warnings),
        "unmapped": [name for name in applied.names if applied.key_map.get(name) not in applied.patches][:10],
    }
    return report, sketches


def main() -> None:
    comfy, text_node = import_comfy()
    request = json.loads(sys.stdin.read())
    out_dir = Path(request["out_dir"])
    vectors = load_file(request["probe_vectors"])
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(request["checkpoint"], output_vae=False)
    report = {
        "model_class": type(model.model).__name__,
        "unet_dtype": str(model.model.get_dtype()),
        "clip_dtypes": sorted({str(p.dtype) for p in clip.cond_stage_model.parameters()}),
        "loras": {},
    }
    width, height = request["size"]
    save_file(encode(text_node, clip, request["prompt"], width, height), str(out_dir / "encoding.safetensors"))
    for case, path in request["loras"].items():
        report["loras"][case], sketches = probe_lora(comfy, model, clip, path, vectors)
        save_file(sketches, str(out_dir / f"{case}.safetensors"))
    (out_dir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
