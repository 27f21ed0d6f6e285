"""Loading a 16-bit single-file checkpoint for fp32 training: the same weights as diffusers' own fp32 load,
with a lower peak resident memory (each load runs in its own process so its peak is its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LOADER = r"""
import hashlib, json, sys
import torch
sys.path.insert(0, sys.argv[1])
path, tokenizer_dir, way = sys.argv[2], sys.argv[3], sys.argv[4]
if way == "trainer":
    from trainer.config import ModelConfig
    from trainer.families.sd15 import SD15
    c = SD15.load(ModelConfig(path=path, tokenizer_dir=tokenizer_dir), torch.float32)
    models = (c.denoiser, c.vae, c.text_encoders["lora_te"])
else:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from trainer.families.sd15 import CONFIG_DIR
    pipe = StableDiffusionPipeline.from_single_file(
        path, config=str(CONFIG_DIR), tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), safety_checker=None,
        feature_extractor=None, local_files_only=True, torch_dtype=torch.float32)
    models = (pipe.unet, pipe.vae, pipe.text_encoder)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report pytest's own peak
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
digests = []
for model in models:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + str(value.dtype).encode())
        h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    digests.append(h.hexdigest())
print(json.dumps({"peak_kib": peak, "digests": digests}))
"""


def load_in_process(way: str, checkpoint: Path, tokenizer_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOADER, str(ROOT), str(checkpoint), str(tokenizer_dir), way],
                         capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fp16_file_loads_for_fp32_with_the_same_weights_and_less_memory(tokenizer_dir: Path) -> None:
    from scripts.make_random_sd15 import ensure_random_sd15

    checkpoint = ensure_random_sd15()
    ours = load_in_process("trainer", checkpoint, tokenizer_dir)
    plain = load_in_process("diffusers", checkpoint, tokenizer_dir)
    assert ours["digests"] == plain["digests"]
    assert ours["peak_kib"] < 0.85 * plain["peak_kib"], (ours["peak_kib"], plain["peak_kib"])
