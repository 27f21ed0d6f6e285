"""The main job, headless: start ComfyUI with the pack, run the train_and_validate example workflow through
its HTTP API on the sample dataset, and print where the LoRA, the loss curve and the compare grid went.

Uses the first SD 1.5 checkpoint in ComfyUI's models/checkpoints; without one it builds an SD1.5-shaped
model with random weights (cached), which trains for real but draws noise. Without a GPU the workflow is
shrunk to 64 px and 20 steps so that it finishes in minutes on a CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from comfy_server import ComfyServer  # noqa: E402
from make_random_sd15 import default_path, ensure_random_sd15  # noqa: E402
from run_workflow import main as run_workflow  # noqa: E402

from trainer.families.detect import describe_checkpoint  # noqa: E402

WORKFLOW = ROOT / "workflows_api" / "train_and_validate.json"
CPU_OVERRIDES = [
    "2.resolution=64", "4.max_steps=20", "4.batch_size=2", "4.device=cpu", "4.mixed_precision=no",
    "4.save_every_steps=10", "4.sample_every_steps=10", "4.sample_steps=8", "13.width=64", "13.height=64",
    "14.steps=12", "15.steps=12", "18.cell=256",
]


def comfyui_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or ROOT / ".runtime" / "ComfyUI")


def find_sd15_checkpoint(folder: Path) -> Path | None:
    random_model = default_path().resolve()
    for path in sorted(folder.glob("*.safetensors")):
        if path.resolve() == random_model:
            continue
        try:
            if describe_checkpoint(path).key == "sd1":
                return path
        except Exception:
            continue
    return None


def main() -> int:
    import torch

    comfy = comfyui_dir()
    checkpoints_dir = comfy / "models" / "checkpoints"
    checkpoint = find_sd15_checkpoint(checkpoints_dir)
    if checkpoint is None:
        print(f"No SD 1.5 checkpoint in {checkpoints_dir}: using an SD1.5-shaped model with RANDOM weights")
        print("(built once, cached). The LoRA really trains, but every picture in this demo is noise.")
        checkpoint = ensure_random_sd15()
    name = checkpoint.name
    on_gpu = torch.cuda.is_available()
    overrides = [f"1.ckpt_name={name}", f"4.base_model={name}"] + ([] if on_gpu else CPU_OVERRIDES)
    print(f"base model: {checkpoint}\nComfyUI:    {comfy} ({'GPU' if on_gpu else 'CPU'})")
    server = ComfyServer(comfy, checkpoints={name: checkpoint}, cpu=not on_gpu)
    with server:
        print(f"serving on {server.url}; log: {server.log_path}")
        args = [str(WORKFLOW), "--server", server.url] + [arg for item in overrides for arg in ("--set", item)]
        code = run_workflow(args)
    if code == 0:
        runs = comfy / "output" / "lora-foundry" / "runs"
        print(f"\nrun folders: {runs} (config, events, log, checkpoints, samples, loss curve)")
    return code


if __name__ == "__main__":
    sys.exit(main())
