"""ours: the pack's trainer exactly as the Train node starts it (`accelerate launch trainer/run.py --config`).

Step times come from the trainer's own `step` events; time to first step is from this process's start to
the `start` event (the trainer emits it right before step 1: imports, load, cache hashing and encoding are
all before it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import OFFLINE_ENV, ROOT, Spec, read_events, steady, trainer_step_times

RUN_PY = ROOT / "trainer" / "run.py"


def trainer_config(spec: Spec, run_dir: Path, max_steps: int) -> dict[str, Any]:
    """A 1-process CPU fp32 run at the spec's size; validation sampling off, a fresh cache. Random flip is on
    (the default: the cache pass encodes every picture plain and mirrored) unless spec.extra turns it off; the
    LoRA is on the attention projections unless spec.extra names another target preset."""
    return {
        "run_dir": str(run_dir),
        "model": {"path": spec.checkpoint, "tokenizer_dir": spec.tokenizer_dir},
        "data": {"folder": spec.data, "resolution": spec.resolution,
                 "random_flip": bool(spec.extra.get("random_flip", True))},
        "lora": {"rank": spec.rank, "alpha": float(spec.rank), "targets": spec.extra.get("targets", "attention")},
        "train": {"batch_size": 1, "max_steps": max_steps, "mixed_precision": "no", "device": "cpu",
                  "seed": spec.seed, "cache_dir": str(run_dir / "cache")},
        "output": {"lora_path": str(run_dir / "lora.safetensors"), "overwrite": True},
    }


def launch_argv(config_path: Path) -> list[str]:
    """The argv nodes/launch.py builds for one process without an accelerate config file."""
    return [sys.executable, str(RUN_PY.parent / "launcher.py"), "--dynamo_backend", "no", "--num_machines", "1",
            "--num_processes", "1", str(RUN_PY), "--config", str(config_path)]


def summarize(events: list[dict[str, Any]], started: float, warmup: int) -> dict[str, Any]:
    """s/step, time to first step and the setup phases from a finished run's events."""
    first = {}
    for event in events:
        first.setdefault(event["type"], event["time"])
    if "done" not in first:
        errors = [e.get("message") for e in events if e["type"] == "error"]
        raise RuntimeError(f"the trainer did not finish: {errors or 'no error event'}")
    step_times = trainer_step_times(events)
    return {
        **steady(step_times, warmup),
        "step_times": step_times,
        "ttfs_s": first["start"] - started,
        "first_step_done_s": first["step"] - started,
        "to_loading_event_s": first["loading"] - started,  # interpreter, launcher and imports
        "setup_s": first["start"] - first["loading"],  # load, cache key hashing, encoding, LoRA, prepare
        "trainer_done_s": first["done"] - started,
    }


def run(spec: Spec, started: float) -> dict[str, Any]:
    run_dir = Path(spec.workdir) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(trainer_config(spec, run_dir, spec.steps), indent=2))
    with (run_dir / "trainer.log").open("wb") as log:
        code = subprocess.call(launch_argv(config_path), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV})
    if code != 0:
        raise RuntimeError(f"the trainer exited with {code}; see {run_dir / 'trainer.log'}")
    return summarize(read_events(run_dir / "events.jsonl"), started, spec.warmup)
