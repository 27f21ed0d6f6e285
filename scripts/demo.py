"""The main job, from the command line: train a LoRA on the sample dataset and say where everything went.

Uses the first SD 1.5 checkpoint in ComfyUI's models/checkpoints; without one it builds an SD1.5-shaped
model with random weights (cached), which trains for real but draws noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from make_random_sd15 import ensure_random_sd15  # noqa: E402
from make_sample_dataset import make_sample_dataset  # noqa: E402

from trainer.checkpoint import describe_checkpoint  # noqa: E402


def comfyui_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or ROOT / ".runtime" / "ComfyUI")


def find_sd15_checkpoint(folder: Path) -> Path | None:
    for path in sorted(folder.glob("*.safetensors")):
        try:
            if describe_checkpoint(path).key == "sd1":
                return path
        except Exception:
            continue
    return None


def main() -> int:
    comfy = comfyui_dir()
    checkpoint = find_sd15_checkpoint(comfy / "models" / "checkpoints")
    on_gpu = _has_cuda()
    if checkpoint is None:
        print(f"No SD 1.5 checkpoint in {comfy / 'models' / 'checkpoints'}: using an SD1.5-shaped model with")
        print("RANDOM weights (built once, cached). The LoRA really trains, but any picture it draws is noise.")
        checkpoint = ensure_random_sd15()
    print(f"base model: {checkpoint}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dataset = make_sample_dataset(comfy / "input" / "lora-foundry-sample")
    run_dir = comfy / "output" / "lora-foundry" / f"demo-{stamp}"
    config = {
        "run_dir": str(run_dir),
        "model": {"path": str(checkpoint)},
        "data": {"folder": str(dataset), "resolution": 512 if on_gpu else 64},
        "lora": {"rank": 4, "alpha": 4.0},
        "train": {
            "batch_size": 4 if on_gpu else 2,
            "max_steps": 200 if on_gpu else 20,
            "mixed_precision": "fp16" if on_gpu else "no",
            "save_every_steps": 100 if on_gpu else 10,
        },
        "sample": {"prompts": ["lfstyle, a red circle, flat colour, thick outline"], "steps": 20 if on_gpu else 4},
        "output": {"lora_path": str(comfy / "models" / "loras" / f"lora-foundry-demo-{stamp}.safetensors")},
    }
    run_dir.mkdir(parents=True)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", str(ROOT / "trainer" / "run.py"), "--config", str(config_path)]
    print("running:", " ".join(command))
    result = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        print(f"training failed (exit {result.returncode}); see {run_dir / 'events.jsonl'}", file=sys.stderr)
        return result.returncode
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    samples = [e["path"] for e in events if e["type"] == "sample"]
    done = events[-1]
    print()
    print(f"LoRA:     {done['lora']}  ({done['steps']} steps, {done['seconds']:.0f} s)")
    print(f"run dir:  {run_dir}  (config.json, events.jsonl, checkpoints/, samples/)")
    print(f"samples:  {', '.join(samples) or 'none'}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
