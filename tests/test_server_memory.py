"""What ComfyUI holds in memory while the trainer runs beside it, measured on the real server (CPU).

The Train node unloads ComfyUI's models (every device's, through comfy.model_management) before it starts the
trainer, so the trainer's own copy of the base model does not sit beside ComfyUI's. Measured here with the
SD1.5-shaped checkpoint (the server's resident memory, GiB; idle ≈ 0.9 on both versions):

                                               ComfyUI 0.3.75    ComfyUI 0.33.0
    after a prompt that sampled with it             4.71              4.76
    a new graph's Train node running                1.25              1.31
    train_and_validate, first run, training         1.26              1.32
    the same graph queued again, training           4.71              5.22

On the CPU, unloading moves weights to the offload device, which is the CPU: what frees the memory of a model
no graph uses any more is ComfyUI's cache dropping the outputs of nodes the new prompt lacks. A graph that
samples with the checkpoint after training (train_and_validate) runs the Train node before the checkpoint
loader, so its first run trains with nothing loaded; queued again, the loader's cached output stays resident
while the trainer runs (on a GPU the unload still frees the VRAM). The test keeps those figures with generous
bounds on whichever ComfyUI the suite runs against.
"""

from __future__ import annotations

import time

import psutil
import pytest

from scripts.comfy_server import ComfyServer, api_workflow, tiny_train_and_validate

pytestmark = [pytest.mark.slow, pytest.mark.comfy_server]
GIB = 2**30


def sample_prompt(checkpoint: str) -> dict:
    """Load the checkpoint and draw one 64 px picture with it (ComfyUI then holds the model)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def train_only_prompt(checkpoint: str, output_name: str) -> dict:
    return api_workflow("train_only", [
        "1.resolution=64", f"3.base_model={checkpoint}", f"3.output_name={output_name}", "3.max_steps=2",
        "3.batch_size=1", "3.device=cpu", "3.mixed_precision=no", "3.save_every_steps=0",
        "3.sample_every_steps=0", '3.validation_prompts=""', "3.overwrite=true"])


def resident(server: ComfyServer) -> float:
    return psutil.Process(server.process.pid).memory_info().rss / GIB


def resident_while_training(server: ComfyServer, prompt: dict) -> list[float]:
    """The server's resident memory, sampled while the prompt's trainer process is alive."""
    prompt_id = server.post_prompt(prompt)
    seen: list[float] = []
    while "status" not in server.history(prompt_id).get(prompt_id, {}):
        if server.child_processes():
            seen.append(resident(server))
        time.sleep(0.2)
    server.wait(prompt_id, timeout=30)
    assert seen, "the trainer was never seen running"
    return seen


@pytest.fixture
def fresh_server(comfy_server: ComfyServer) -> ComfyServer:
    """The session's server, restarted: in a long-lived process, memory freed by Python is not always handed
    back to the system (the allocator keeps it), so resident memory says what is held only from a fresh start.
    Restarting, rather than starting a second server, keeps one SD1.5-sized server on this machine at a time."""
    comfy_server.stop()
    comfy_server.start()
    return comfy_server


def test_comfyui_holds_no_model_beside_the_trainer_of_a_new_graph(fresh_server: ComfyServer) -> None:
    comfy_server = fresh_server
    checkpoint = comfy_server.checkpoint_name
    comfy_server.run(sample_prompt(checkpoint), timeout=600)
    loaded = resident(comfy_server)
    during = resident_while_training(comfy_server, train_only_prompt(checkpoint, "memory-train-only"))
    print(f"resident memory: {loaded:.2f} GiB with the model loaded, {max(during):.2f} while training")
    # measured 4.7 -> 1.3 GiB on both versions: the SD1.5 model (3.4 GiB in ComfyUI's fp32) is gone
    assert max(during) < loaded - 2.0, f"{loaded:.2f} GiB with the model loaded, {max(during):.2f} while training"


def unrelated_prompt() -> dict:
    """A prompt with no model: ComfyUI's cache then drops what the earlier prompts loaded."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def test_train_and_validate_trains_before_it_loads_the_checkpoint(fresh_server: ComfyServer) -> None:
    comfy_server = fresh_server
    checkpoint = comfy_server.checkpoint_name
    comfy_server.run(unrelated_prompt(), timeout=60)
    empty = resident(comfy_server)
    prompt = api_workflow("train_and_validate", tiny_train_and_validate(checkpoint, "memory-validate", 2))
    first = resident_while_training(comfy_server, prompt)
    # measured 1.25 -> 1.26 GiB on 0.3.75: the checkpoint loader runs after the Train node
    assert max(first) < empty + 1.0, f"{empty:.2f} GiB with no model, {max(first):.2f} while training"
    after = resident(comfy_server)  # the checkpoint loaded for the validation samplers
    assert after > empty + 2.0, f"{after:.2f} GiB after sampling: the model was never loaded?"
    again = resident_while_training(comfy_server, api_workflow(
        "train_and_validate", tiny_train_and_validate(checkpoint, "memory-validate", 3)))
    print(f"resident memory: {empty:.2f} GiB with no model, {max(first):.2f} while training, {after:.2f} after "
          f"sampling, {max(again):.2f} while training again")
    # queued again, the loader's cached output stays (see the module docstring); freeing adds nothing to it
    assert max(again) < after + 0.5, f"{after:.2f} GiB before the second run, {max(again):.2f} while training"
