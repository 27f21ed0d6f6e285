"""The SDXL family on a full-structure SDXL checkpoint with random weights (scripts/make_random_sdxl.py: the
single-file layout ComfyUI's models/checkpoints holds, fp16, cached outside the repo).

What a user of an SDXL LoRA notices, checked on the real sizes and names: ComfyUI's stock loader uses every
tensor of the LoRA, for every target preset and both text encoders, and of LoCon, LoHa, LoKr and DoRA files;
the change it makes to each weight is the change the trained adapter makes; diffusers' SDXL pipeline adapts
every module of a LoRA file; and the prompt encoding the trainer caches is what ComfyUI's CLIPTextEncodeSDXL
gives the UNet for the same file.

Deltas are compared through sketches (each flattened delta times fixed random unit vectors, see
comfy_sdxl_probe.py): a full fp32 copy of every delta of the "all" preset would be larger than the UNet.

Memory: two processes, one after the other. The pack's side (sdxl_lora_probe.py) loads the checkpoint in fp16,
its dtype in the file; ComfyUI's (comfy_sdxl_probe.py) holds the UNet in fp16 and the text encoders in fp32,
and peaks at 15.7 GiB (its loader keeps the whole file beside the models it builds). The session's server is
paused meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_cases import ADAPTERS, CONV_ADAPTERS
from safetensors.torch import load_file

from trainer.families import DENOISER

HERE = Path(__file__).resolve().parent
PRESETS = ("attention", "attention_ff", "all")
# the other adapter types, each on the attention preset with both text encoders (tests/adapter_cases.py)
ADAPTER_CASES = {**ADAPTERS, "locon": CONV_ADAPTERS["locon"]}
ADAPTER_PRESET = "attention"
CASES = (*PRESETS, *ADAPTER_CASES)
PROMPT = "a watercolor fox resting in tall grass, soft morning light"
SIZE = (832, 1216)  # a portrait bucket: the size conditioning ComfyUI attaches must leave the encoding alone
TOLERANCE = 1e-5

# runs on each ComfyUI the suite covers; needs the machine's memory to itself
pytestmark = [pytest.mark.comfy_code, pytest.mark.usefixtures("whole_machine")]


def run_probe(script: str, request: dict, cwd: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(HERE / script)], input=json.dumps(request), capture_output=True,
                            text=True, cwd=cwd, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def random_sdxl() -> Path:
    from scripts.make_random_sdxl import ensure_random_sdxl

    return ensure_random_sdxl()


@pytest.fixture(scope="module")
def ours(random_sdxl: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-ours")
    run_probe("sdxl_lora_probe.py", {"checkpoint": str(random_sdxl), "tokenizer_dir": str(tokenizer_dir),
                                     "presets": list(PRESETS), "adapters": ADAPTER_CASES,
                                     "adapter_preset": ADAPTER_PRESET, "prompt": PROMPT, "out_dir": str(out)}, HERE)
    return out


@pytest.fixture(scope="module")
def comfy(ours: Path, random_sdxl: Path, comfy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-comfy")
    run_probe("comfy_sdxl_probe.py", {
        "checkpoint": str(random_sdxl), "loras": {case: str(ours / f"{case}.safetensors") for case in CASES},
        "probe_vectors": str(ours / "probe_vectors.safetensors"), "prompt": PROMPT, "size": list(SIZE),
        "out_dir": str(out)}, comfy_dir)
    return out


def test_the_builder_still_writes_the_cached_layout(random_sdxl: Path) -> None:
    # the cached file outlives changes to the builder; a change to its names or shapes must not go unseen
    from scripts import make_random_sd15, make_random_sdxl

    planned = make_random_sd15.planned_layout(make_random_sdxl.parts())
    assert len(planned) == 2514
    assert planned == make_random_sd15.file_layout(random_sdxl)


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_comfyui_reads_the_file_as_sdxl(comfy: Path) -> None:
    loaded = report(comfy)
    assert loaded["model_class"] == "SDXL"
    assert loaded["unet_dtype"] == "torch.float16"
    assert loaded["clip_dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("preset", CASES)
def test_comfyui_uses_every_tensor_of_each_preset(ours: Path, comfy: Path, preset: str) -> None:
    loaded = report(comfy)["loras"][preset]
    counts = report(ours)["modules"][preset]
    assert counts["lora_te1"] > 0 and counts["lora_te2"] > 0, counts
    assert loaded["unconsumed"] == [], loaded["unconsumed"][:5]
    assert loaded["unmapped"] == []
    assert loaded["modules"] == sum(counts.values())
    assert loaded["patched_unet"] == counts[DENOISER]
    assert loaded["patched_clip"] == counts["lora_te1"] + counts["lora_te2"]


def test_presets_grow_to_the_whole_unet(ours: Path) -> None:
    counts = report(ours)["modules"]
    unet = [counts[preset][DENOISER] for preset in PRESETS]
    assert unet[0] < unet[1] < unet[2], unet
    assert counts["attention"]["lora_te2"] == 32 * 4  # each of CLIP-G's 32 layers: q, k, v, out
    assert counts["all"]["lora_te2"] == 32 * 6  # ... and fc1, fc2


@pytest.mark.parametrize("preset", CASES)
def test_comfyui_applies_peft_delta(ours: Path, comfy: Path, preset: str) -> None:
    peft = load_file(str(ours / f"peft-{preset}.safetensors"))
    theirs = load_file(str(comfy / f"{preset}.safetensors"))
    assert sorted(theirs) == sorted(peft)
    assert min(value.abs().max().item() for value in peft.values()) > 100 * TOLERANCE  # no vacuous zero deltas
    worst = max((peft[name] - theirs[name]).abs().max().item() for name in peft)
    print(f"{preset}: {len(peft)} modules, largest difference of ComfyUI's delta from peft's {worst:.2e}")
    assert worst < TOLERANCE, worst


@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_pipeline_adapts_every_module(ours: Path, preset: str) -> None:
    peft = load_file(str(ours / f"peft-{preset}.safetensors"))
    loaded = load_file(str(ours / f"diffusers-{preset}.safetensors"))
    assert sorted(loaded) == sorted(peft)
    # diffusers keeps a loaded LoRA in the base model's dtype, fp16 here: equal to fp16 precision
    worst = max(((loaded[name] - peft[name]).abs().max() / peft[name].abs().max()).item() for name in peft)
    print(f"{preset}: diffusers' delta within {worst:.2e} of peft's, relative")
    assert worst < 2e-3, worst


def test_encoding_equals_comfyui_clip_text_encode_sdxl(ours: Path, comfy: Path) -> None:
    mine = load_file(str(ours / "encoding.safetensors"))
    theirs = load_file(str(comfy / "encoding.safetensors"))
    assert mine["hidden"].shape == theirs["hidden"].shape == (1, 77, 2048)
    assert mine["pooled"].shape == theirs["pooled"].shape == (1, 1280)
    assert not torch.equal(mine["hidden"][0, 1], mine["hidden"][0, 2])  # the tokens are told apart
    hidden = (mine["hidden"] - theirs["hidden"]).abs().max().item()
    pooled = (mine["pooled"] - theirs["pooled"]).abs().max().item()
    print(f"encoding vs CLIPTextEncodeSDXL: hidden states within {hidden:.2e}, pooled within {pooled:.2e}")
    assert hidden < 1e-3 and pooled < 1e-3, (hidden, pooled)
