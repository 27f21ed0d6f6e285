"""The main job, headless: start ComfyUI with the pack, run the train_and_validate example workflow through
its HTTP API on the sample dataset, and print where the LoRA, the loss curve and the compare grid went.

Uses the first SD 1.5 checkpoint in ComfyUI's models/checkpoints, with the workflow's own settings (on a CPU
shrunk to 64 px and 20 steps, so that it finishes in minutes). Without one it builds an SD1.5-shaped model with
random weights (cached): its pictures are noise whatever is trained, so the demo then trains what shows a
LoRA's effect on such a base (comfy_server.RANDOM_BASE_SETTINGS: 80 steps on four solid reds at 64 px, rank 8,
learning rate 1e-3, about 5 minutes on 2 CPU cores), and says in numbers what the LoRA did: how much closer the
sample at strength 1 sits to the training pictures' latents than the one at strength 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from comfy_server import SOLID_DATASET, ComfyServer, api_workflow, lora_effect, random_base_settings  # noqa: E402
from make_random_sd15 import default_path, ensure_random_sd15  # noqa: E402
from make_sample_dataset import SOLID_REDS, make_solid_dataset  # noqa: E402
from run_workflow import main as run_workflow  # noqa: E402

from trainer.families.detect import describe_checkpoint  # noqa: E402

WORKFLOW = ROOT / "workflows_api" / "train_and_validate.json"
CPU_OVERRIDES = [
    "2.resolution=64", "4.max_steps=20", "4.batch_size=2", "4.device=cpu", "4.mixed_precision=no",
    "4.save_every_steps=10", "4.sample_every_steps=10", "4.sample_steps=8", "13.width=64", "13.height=64",
    "14.steps=12", "15.steps=12", "18.cell=256",
]

def settings(on_gpu: bool, random_base: bool) -> list[str]:
    """The overrides of the workflow's widgets for this machine and base model."""
    if random_base:
        return random_base_settings(on_gpu)
    return [] if on_gpu else CPU_OVERRIDES


def report_effect(server: ComfyServer, prompt: dict) -> None:
    """On a random base the pictures cannot show much: say in numbers what the LoRA did to the samples."""
    off, on = lora_effect(server, prompt, SOLID_REDS)
    print(f"\nthe LoRA's effect on this random base: the sampled latent is {off:.1f} (RMS) from the nearest training "
          f"picture's latent at strength 0 and {on:.1f} at strength 1, {off / max(on, 1e-9):.1f}x closer")


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
    random_base = checkpoint is None
    on_gpu = torch.cuda.is_available()
    if random_base:
        print(f"No SD 1.5 checkpoint in {checkpoints_dir}: using an SD1.5-shaped model with RANDOM weights")
        print("(built once, cached). Its pictures are noise whatever is trained, so the demo trains what shows a")
        print("LoRA's effect on such a base: 80 steps on four solid reds at 64 px (about 5 minutes on 2 CPU cores),")
        print("and measures it at the end. With a real SD 1.5 file in models/checkpoints the demo trains the")
        print("workflow's own settings instead.")
        checkpoint = ensure_random_sd15()
    name = checkpoint.name
    overrides = [f"1.ckpt_name={name}", f"4.base_model={name}"] + settings(on_gpu, random_base)
    print(f"base model: {checkpoint}\nComfyUI:    {comfy} ({'GPU' if on_gpu else 'CPU'})")
    server = ComfyServer(comfy, checkpoints={name: checkpoint}, cpu=not on_gpu)
    make_solid_dataset(server.input_dir / SOLID_DATASET)
    with server:
        print(f"serving on {server.url}; log: {server.log_path}")
        args = [str(WORKFLOW), "--server", server.url] + [arg for item in overrides for arg in ("--set", item)]
        code = run_workflow(args)
        if code == 0 and random_base:
            report_effect(server, api_workflow(WORKFLOW.stem, overrides))
    if code == 0:
        runs = comfy / "output" / "lora-foundry" / "runs"
        print(f"\nrun folders: {runs} (config, events, log, checkpoints, samples, loss curve)")
    return code


if __name__ == "__main__":
    sys.exit(main())
