"""A real ComfyUI server for the native and Train-node contenders, with time-stamped websocket messages."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import Spec
from scripts.comfy_server import ComfyServer, WsRecorder

CHECKPOINT_NAME = "sd15-bench.safetensors"


class StampedRecorder(WsRecorder):
    """WsRecorder that notes when each message arrived (`received`, seconds since the epoch)."""

    def _add(self, message: dict) -> None:
        super()._add({**message, "received": time.time()})


def start_server(spec: Spec, dataset_name: str) -> ComfyServer:
    """A ComfyUI server in the contender's workdir, the checkpoint linked, the pictures in input/<name>."""
    server = ComfyServer(Path(spec.workdir) / "comfy", checkpoints={CHECKPOINT_NAME: spec.checkpoint},
                         comfy_dir=spec.comfy_root)
    server.prepare()
    target = server.input_dir / dataset_name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(spec.data, target)
    return server.start()


def listen(server: ComfyServer) -> StampedRecorder:
    recorder = StampedRecorder(server.url, "lora-foundry-bench")
    recorder.start()
    return recorder


def node_started(recorder: StampedRecorder, prompt_id: str, node_id: str) -> float:
    """When the server said it began executing `node_id` of the prompt."""
    for message in recorder.messages:
        data = message.get("data", {})
        if message.get("type") == "executing" and data.get("prompt_id") == prompt_id and data.get("node") == node_id:
            return message["received"]
    raise RuntimeError(f"no 'executing' message for node {node_id}")


def progress_times(recorder: StampedRecorder, prompt_id: str, node_id: str) -> list[float]:
    """Arrival times of the node's progress updates, one per distinct value (the first arrival of each)."""
    seen: dict[int, float] = {}
    for message in recorder.messages:
        data = message.get("data", {})
        if message.get("type") == "progress" and data.get("prompt_id") == prompt_id and data.get("node") == node_id:
            seen.setdefault(data["value"], message["received"])
    return [seen[v] for v in sorted(seen) if v > 0]
