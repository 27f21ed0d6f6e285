"""Cancel in every phase of a run on a real ComfyUI server, then queue again: nothing trained is ever lost.

Loading, caching, training, sampling and saving a checkpoint: each is interrupted through ComfyUI's own
`POST /interrupt` while the trainer is in it (seen in the run's events). Wherever steps were trained, the step
the trainer stopped at has a checkpoint, and queueing again (with a reachable max_steps) continues from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_e2e_train import run_dirs, small_prompt, train_ui

# on the second ComfyUI the interrupt is checked by test_e2e_train's; these five phases are the trainer's
pytestmark = [pytest.mark.slow, pytest.mark.comfy_server, pytest.mark.first_comfyui_only]

# phase → the event that shows the trainer is in it, and extra Train inputs that make the phase last
PHASES = {
    "loading": ("loading", []),
    "caching": ("cache", []),
    "training": ("step", []),
    "sampling": ("sampling", ["4.sample_every_steps=2", "4.sample_steps=40"]),
    "saving": ("saving", ["4.save_every_steps=1"]),
}


def events_of(server, name: str) -> list[dict]:
    folders = [d for d in run_dirs(server) if d.name.startswith(f"{name}-")]
    if not folders:
        return []
    lines = (folders[0] / "events.jsonl").read_text(encoding="utf-8").splitlines() \
        if (folders[0] / "events.jsonl").exists() else []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return events


def wait_for(server, name: str, kind: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(e["type"] == kind for e in events_of(server, name)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {kind} event for {name}:\n{server.log_tail()}")


def phase_prompt(server, name: str, max_steps: int, extra: list[str]) -> dict:
    prompt = small_prompt(server, name, max_steps=max_steps)
    for override in extra:  # NODE.INPUT=INT
        node, rest = override.split(".", 1)
        key, value = rest.split("=", 1)
        prompt[node]["inputs"][key] = int(value)
    return prompt


@pytest.mark.parametrize("phase", list(PHASES))
def test_cancel_keeps_what_was_trained_and_queueing_again_continues(comfy_server, phase: str) -> None:
    name = f"e2e-cancel-{phase}"
    kind, extra = PHASES[phase]
    prompt = phase_prompt(comfy_server, name, 100000, extra)
    prompt_id = comfy_server.post_prompt(prompt)
    wait_for(comfy_server, name, kind)
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=300, check=False)
    assert "execution_interrupted" in [k for k, _ in entry["status"]["messages"]]
    left = comfy_server.wait_no_children(timeout=10)
    assert not left, f"trainer processes left after the interrupt in {phase}: {left}"

    events = events_of(comfy_server, name)
    trained = max((e["step"] for e in events if e["type"] == "step"), default=0)
    checkpoints = {e["step"] for e in events if e["type"] == "checkpoint"}
    if trained:
        cancelled = [e for e in events if e["type"] == "cancelled"]
        assert cancelled, f"stopped in {phase} after {trained} steps without saying so: {[e['type'] for e in events]}"
        assert cancelled[-1]["step"] in checkpoints, f"step {cancelled[-1]['step']} was trained and not kept"
    else:
        assert not checkpoints
    assert not (comfy_server.loras_dir / f"{name}.safetensors").exists()

    # queued again with a length it can reach: continues from the kept step (from 0 when nothing was trained)
    again = phase_prompt(comfy_server, name, trained + 2, extra)
    entry = comfy_server.run(again, timeout=900)
    lora = Path(train_ui(entry)["lora_path"][0])
    assert lora.is_file() and train_ui(entry)["steps"] == [trained + 2]
    events = events_of(comfy_server, name)
    resumed = [e["step"] for e in events if e["type"] == "resume"]
    assert resumed == ([max(checkpoints)] if trained else []), resumed
