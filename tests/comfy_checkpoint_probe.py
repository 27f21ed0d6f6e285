"""Loads a checkpoint the way ComfyUI's CheckpointLoaderSimple does and reports what ComfyUI made of it.

Run in a subprocess with ComfyUI's folder as the working directory (ComfyUI's imports have global side
effects, so the test process never imports it):

    python comfy_checkpoint_probe.py CHECKPOINT PROMPT OUT.safetensors

Writes the prompt's CLIP conditioning to OUT and prints one JSON line: the prompt's token ids and, per
component, how many of the file's tensors ComfyUI's model holds with identical values.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# file prefix -> (ComfyUI attribute path, ComfyUI state-dict prefix)
COMPONENTS = {
    "model.diffusion_model.": ("model.model.diffusion_model", ""),
    "first_stage_model.": ("vae.first_stage_model", ""),
    "cond_stage_model.transformer.": ("clip.cond_stage_model", "clip_l.transformer."),
}


def import_comfy_sd():
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd

    return comfy.sd


def compare(handle, file_prefix: str, module: torch.nn.Module, comfy_prefix: str) -> dict:
    state = module.state_dict()
    keys = [key for key in handle.keys() if key.startswith(file_prefix)]
    missing, different = [], []
    for key in keys:
        comfy_key = comfy_prefix + key[len(file_prefix) :]
        if comfy_key not in state:
            missing.append(key)
        elif not torch.equal(state[comfy_key].float().flatten(), handle.get_tensor(key).float().flatten()):
            different.append(key)
    return {
        "file_tensors": len(keys),
        "missing": missing[:5],
        "n_missing": len(missing),
        "different": different[:5],
        "n_different": len(different),
    }


def main(checkpoint: str, prompt: str, out: str) -> None:
    comfy_sd = import_comfy_sd()
    model, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    loaded = {"model": model, "clip": clip, "vae": vae}
    report = {}
    with safe_open(checkpoint, framework="pt", device="cpu") as handle:
        for file_prefix, (attribute, comfy_prefix) in COMPONENTS.items():
            root, *path = attribute.split(".")
            module = loaded[root]
            for name in path:
                module = getattr(module, name)
            report[file_prefix] = compare(handle, file_prefix, module, comfy_prefix)
    tokens = clip.tokenize(prompt)
    cond = clip.encode_from_tokens(tokens)
    save_file({"cond": cond.float().contiguous()}, out)
    report["token_ids"] = [int(pair[0]) for pair in tokens["l"][0]]
    report["clip_dtypes"] = sorted({str(p.dtype) for p in clip.cond_stage_model.parameters()})
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
