"""The SDXL example workflow on a real ComfyUI server (CPU), on the full-structure random SDXL checkpoint
(scripts/make_random_sdxl.py) at 64 px and a few steps: it trains, loads the LoRA at strength 0 and 1, samples
and saves the compare grid.

Memory is what decides how this runs on a 24 GiB machine. The server gets a model of its own (the session's
SD 1.5 server is paused meanwhile) and holds SDXL in 16-bit (`--bf16-unet --bf16-vae`; its text encoders are
fp16 on the CPU already); the trainer trains in bf16. The Train node runs before the checkpoint loader, so the
trainer's copy and ComfyUI's never sit side by side: the printed peak says what the whole machine used.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from scripts.comfy_server import ComfyServer, api_workflow, tiny_train_and_validate

CHECKPOINT = "sdxl-random-fp16.safetensors"
CELL = 128
pytestmark = [pytest.mark.slow, pytest.mark.comfy_server, pytest.mark.usefixtures("whole_machine")]


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory: pytest.TempPathFactory, comfy_dir: Path) -> Iterator[ComfyServer]:
    from scripts.make_random_sdxl import ensure_random_sdxl

    server = ComfyServer(tmp_path_factory.mktemp("comfy-sdxl"), checkpoints={CHECKPOINT: ensure_random_sdxl()},
                         comfy_dir=comfy_dir, extra_args=("--bf16-unet", "--bf16-vae"))
    with server:
        yield server


class PeakMemory:
    """The machine's used memory, sampled every 0.2 s while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sdxl_prompt(output_name: str) -> dict:
    overrides = tiny_train_and_validate(CHECKPOINT, output_name, steps=3) + [
        "4.batch_size=1", "4.mixed_precision=bf16", "4.learning_rate=0.001", "14.steps=3", "15.steps=3",
        f"18.cell={CELL}",
    ]
    return api_workflow("sdxl_train_and_validate", overrides)


def test_sdxl_example_workflow_end_to_end(sdxl_server: ComfyServer) -> None:
    prompt = sdxl_prompt("e2e-sdxl")
    before = psutil.virtual_memory().used
    with PeakMemory() as memory:
        entry = sdxl_server.run(prompt, timeout=1500)
    print(f"machine memory used: {before / 2**30:.1f} GiB before, {memory.peak / 2**30:.1f} GiB at the peak")

    (ui,) = [out for out in entry["outputs"].values() if "lora_path" in out]
    lora = Path(ui["lora_path"][0])
    assert lora == sdxl_server.loras_dir / "e2e-sdxl.safetensors" and lora.is_file()
    from trainer.lora_file import read_lora_file

    tensors, metadata = read_lora_file(lora)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert any(name.startswith("lora_unet_input_blocks_") for name in tensors)

    run_dir = Path(ui["run_dir"][0])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "done" and events[-1]["steps"] == 3

    grid_node = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    (saved,) = entry["outputs"][grid_node]["images"]
    grid = np.asarray(Image.open(sdxl_server.output_dir / saved["subfolder"] / saved["filename"]), np.float32)
    left, right = grid[:, :CELL], grid[:, CELL:2 * CELL]
    assert np.abs(left - right).mean() > 0.5, "strength 0 and strength 1 gave the same picture"
    log = sdxl_server.log_path.read_text(errors="replace")
    assert "lora key not loaded" not in log, log[-2000:]
