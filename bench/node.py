"""node: the LoRA Foundry Train node on a real ComfyUI server, to measure what ComfyUI adds around the trainer.

A Dataset -> LoRA Config -> Train graph (the same settings as `ours`, `node_steps` steps) is posted to the
server; the wall time runs from the POST to the websocket's `execution_success`. The trainer's own time is
the lifetime of the `accelerate launch` process the node starts (its creation time from the kernel, its end
seen by polling every 0.1 s). Their difference is ComfyUI's overhead: prompt handling, the Dataset node, the
Train node's own work before the launch and after the exit (config, loss curve, outputs), and event polling.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.comfy import CHECKPOINT_NAME, listen, start_server
from bench.common import Spec, read_events, steady, trainer_step_times
from scripts.comfy_server import ComfyServer

DATASET = "bench-node"
POLL_S = 0.1


class LauncherWatch(threading.Thread):
    """Notes when the server's `accelerate launch` child was first and last seen alive (every 0.1 s).

    Polling rather than the kernel's creation time: psutil derives that from the boot time, which /proc
    gives in whole seconds. First-seen is at most one poll late, so the trainer's time comes out a little
    short and the overhead a little long, never the other way round."""

    def __init__(self, server: ComfyServer):
        super().__init__(daemon=True)
        self.server = server
        self.created: float | None = None
        self.last_seen: float | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for child in self.server.child_processes():
                try:
                    if any(arg.endswith("launcher.py") for arg in child.cmdline()):  # nodes/launch.py LAUNCHER_PY
                        self.created = self.created or time.time()
                        self.last_seen = time.time()
                except psutil.Error:
                    continue
            time.sleep(POLL_S)


def node_prompt(spec: Spec) -> dict[str, Any]:
    dataset = {"source": "folder", "folder": DATASET, "hub_dataset": "", "captions": "",
               "resolution": spec.resolution, "crop": "center", "random_flip": True, "bucketing": True,
               "top_rows": 0, "repeats": 1}
    lora = {"rank": spec.rank, "alpha": float(spec.rank), "init": "gaussian", "targets": "attention",
            "dropout": 0.0, "train_text_encoder": False}
    train = {
        "base_model": CHECKPOINT_NAME, "output_name": "bench-node", "overwrite": True, "learning_rate": 1e-4,
        "batch_size": 1, "gradient_accumulation_steps": 1, "epochs": 0, "max_steps": spec.node_steps,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw", "max_grad_norm": 1.0,
        "mixed_precision": "no", "gradient_checkpointing": False, "min_snr_gamma": 0.0, "noise_offset": 0.0,
        "seed": spec.seed, "save_every_steps": 0, "validation_prompts": "", "negative_prompt": "",
        "sample_every_steps": 0, "sample_steps": 20, "device": "cpu", "num_processes": 1, "gpu_ids": "",
        "accelerate_config": "none", "dataset": ["1", 0], "lora_config": ["2", 0],
    }
    return {
        "1": {"class_type": "LoraFoundryDataset", "inputs": dataset},
        "2": {"class_type": "LoraFoundryLoraConfig", "inputs": lora},
        "3": {"class_type": "LoraFoundryTrain", "inputs": train},
    }


def trainer_steps(server: ComfyServer) -> list[float]:
    (run_dir,) = sorted((server.output_dir / "lora-foundry" / "runs").glob("bench-node-*"))
    return trainer_step_times(read_events(Path(run_dir) / "events.jsonl"))


def run(spec: Spec, started: float) -> dict[str, Any]:
    server = start_server(spec, DATASET)
    try:
        recorder, watch = listen(server), LauncherWatch(server)
        watch.start()
        try:
            posted = time.time()
            prompt_id = server.post_prompt(node_prompt(spec), client_id=recorder.client_id)
            finished = recorder.wait_done(prompt_id, timeout=3600)
        finally:
            watch.stopping.set()
            watch.join()
            recorder.stop()
        if finished["type"] != "execution_success":
            raise RuntimeError(f"the Train node's prompt ended with {finished['type']}: {finished.get('data')}")
        step_times = trainer_steps(server)
    finally:
        server.stop()
    if watch.created is None or watch.last_seen is None:
        raise RuntimeError("never saw the Train node's accelerate launch process")
    wall = finished["received"] - posted
    trainer = watch.last_seen - watch.created
    return {
        **steady(step_times, spec.warmup), "step_times": step_times, "node_steps": spec.node_steps,
        "prompt_wall_s": wall, "trainer_s": trainer, "overhead_s": wall - trainer,
        "overhead_fraction": (wall - trainer) / wall, "before_launch_s": watch.created - posted,
        "after_exit_s": finished["received"] - watch.last_seen,
    }
