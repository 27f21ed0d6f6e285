"""No run is ever lost: stop requests seen everywhere, a trainer that outlives nobody, samples that cannot cost
the training, bf16 end to end, and runs that continue or re-sample instead of starting over.

Real `accelerate launch` subprocesses on the tiny model (tests/tiny_model.py), real files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, launch_args, read_events, run_trainer, tiny_config, trainer_env, write_config
from test_trainer import assert_ok, lora_of, max_diff

from trainer.stop import PARENT_PID_ENV, request_stop


def types_of(run_dir: Path) -> list[str]:
    return [e["type"] for e in read_events(run_dir)]


def wait_for_event(run_dir: Path, kind: str, timeout: float = 300, **fields: object) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in read_events(run_dir) if (run_dir / "events.jsonl").exists() else []:
            if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                return event
        time.sleep(0.05)
    raise TimeoutError(f"no {kind} event {fields} in {timeout} s: {types_of(run_dir)}")


def start_trainer(cfg: dict, **env: str) -> subprocess.Popen:
    return subprocess.Popen(launch_args(write_config(cfg)), start_new_session=True, env=trainer_env() | env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tree_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in psutil.process_iter(["environ"]) if _in_run(p, pid)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _in_run(process: psutil.Process, marker_pid: int) -> bool:
    try:
        return (process.info["environ"] or {}).get(PARENT_PID_ENV) == str(marker_pid)
    except (psutil.Error, KeyError):
        return False


# ---- stop requests -----------------------------------------------------------------------------------------

def test_stop_file_ends_the_run_with_a_checkpoint(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100000})
    proc = start_trainer(cfg)
    wait_for_event(tmp_path / "run", "step", step=3)
    request_stop(tmp_path / "run")
    assert proc.wait(timeout=60) != 0  # accelerate launch reports its child's 143 as 1
    events = read_events(tmp_path / "run")
    cancelled = next(e for e in events if e["type"] == "cancelled")
    checkpoint = next(e for e in events if e["type"] == "checkpoint")
    assert "stop file" in cancelled["reason"]
    assert checkpoint["step"] == cancelled["step"] >= 3 and Path(checkpoint["lora"]).is_file()


def test_trainer_stops_with_a_checkpoint_when_its_parent_is_killed(tmp_path, tiny_model_dir,
                                                                   two_image_folder) -> None:
    """ComfyUI killed with SIGKILL (or crashed): its trainer must not train on, holding the GPU."""
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100000})
    config_path = write_config(cfg)
    # a stand-in for ComfyUI: starts the trainer the way the node does (its own session, our pid in the env)
    parent_script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = dict(os.environ, {PARENT_PID_ENV}=str(os.getpid()))
        subprocess.Popen({launch_args(config_path)!r}, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_script], env=trainer_env(), cwd=ROOT)
    try:
        wait_for_event(tmp_path / "run", "step", step=3)
    finally:
        parent.kill()  # SIGKILL: the parent gets no chance to stop its child
        parent.wait()
    killed_at = time.monotonic()
    assert tree_gone(parent.pid, timeout=30), "the trainer went on training after its parent was killed"
    events = read_events(tmp_path / "run")
    cancelled = next(e for e in events if e["type"] == "cancelled")
    assert f"pid {parent.pid}" in cancelled["reason"] and "gone" in cancelled["reason"]
    assert any(e["type"] == "checkpoint" and e["step"] == cancelled["step"] for e in events)
    assert time.monotonic() - killed_at < 30


def test_stop_while_sampling_ends_the_sample_and_keeps_a_checkpoint(tmp_path, tiny_model_dir,
                                                                    two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100000},
                      sample={"prompts": ["a red circle"] * 4, "every_steps": 2, "steps": 500})
    proc = start_trainer(cfg)
    sampling = wait_for_event(tmp_path / "run", "sampling")
    request_stop(tmp_path / "run")
    began = time.monotonic()
    assert proc.wait(timeout=120) != 0
    assert time.monotonic() - began < 60, "sampling 4 x 500 steps went on after the stop"
    events = read_events(tmp_path / "run")
    cancelled = next(e for e in events if e["type"] == "cancelled")
    assert cancelled["step"] == sampling["step"]
    assert len([e for e in events if e["type"] == "sample"]) < 4
    assert any(e["type"] == "checkpoint" and e["step"] == sampling["step"] for e in events)


# ---- samples never cost the training -----------------------------------------------------------------------

def test_bf16_run_trains_samples_checkpoints_resumes_and_saves(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """bf16 with validation prompts used to train every step, then die in vae.decode and write no LoRA."""
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder,
                      train={"max_steps": 4, "save_every_steps": 2, "mixed_precision": "bf16"},
                      sample={"prompts": ["a red circle"], "steps": 2})
    assert_ok(run_trainer(cfg))
    events = read_events(tmp_path / "run")
    start = next(e for e in events if e["type"] == "start")
    assert start["mixed_precision"] == "bf16"
    assert not [e for e in events if e["type"] == "warning"], [e["message"] for e in events if e["type"] == "warning"]
    assert [e["step"] for e in events if e["type"] == "sample"] == [4]
    first = lora_of(cfg)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in first.values())

    cfg["train"]["max_steps"] = 6  # continue the same run
    cfg["output"]["overwrite"] = True
    assert_ok(run_trainer(cfg))
    events = read_events(tmp_path / "run")
    assert [e["step"] for e in events if e["type"] == "resume"] == [4]
    assert events[-1]["type"] == "done" and events[-1]["steps"] == 6
    assert max_diff(first, lora_of(cfg)) > 0, "two more steps changed nothing"


def test_a_failing_sample_is_a_warning_and_the_lora_is_saved(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 3},
                      sample={"prompts": ["a red circle"], "every_steps": 2, "steps": 2})
    config_path = write_config(cfg)
    # out of memory cannot be provoked on purpose here: the sampler is replaced by one that raises it
    script = textwrap.dedent(f"""
        import sys, torch
        import trainer.loop
        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        trainer.loop.render_samples = out_of_memory
        from trainer.run import main
        sys.exit(main(["--config", {str(config_path)!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=trainer_env(), capture_output=True,
                            text=True, timeout=600)
    assert_ok(result)
    events = read_events(tmp_path / "run")
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert len(warnings) == 2 and all("sample" in w and "OutOfMemoryError" in w for w in warnings)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert events[-1]["type"] == "done" and Path(cfg["output"]["lora_path"]).is_file()


def test_the_lora_is_saved_before_the_last_sample(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 2},
                      sample={"prompts": ["a red circle"], "steps": 2})
    assert_ok(run_trainer(cfg))
    events = read_events(tmp_path / "run")
    order = [e["type"] for e in events if e["type"] in ("checkpoint", "sampling", "sample", "done")]
    assert order == ["checkpoint", "sampling", "sample", "done"]
    sample_time = next(e["time"] for e in events if e["type"] == "sampling")
    assert os.path.getmtime(cfg["output"]["lora_path"]) <= sample_time + 0.01


# ---- continue and re-sample --------------------------------------------------------------------------------

def test_raising_max_steps_continues_to_the_same_lora(tmp_path, tiny_model_dir, two_image_folder) -> None:
    whole = tiny_config(tmp_path / "whole", tiny_model_dir, two_image_folder, train={"max_steps": 6})
    assert_ok(run_trainer(whole))
    short = tiny_config(tmp_path / "grown", tiny_model_dir, two_image_folder, train={"max_steps": 4})
    assert_ok(run_trainer(short))
    short["train"]["max_steps"], short["output"]["overwrite"] = 6, True
    assert_ok(run_trainer(short))
    events = read_events(tmp_path / "grown")
    assert [e["step"] for e in events if e["type"] == "resume"] == [4]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert max_diff(lora_of(whole), lora_of(short)) < 1e-6


def test_new_prompts_resample_without_training(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 3},
                      sample={"prompts": ["a red circle"], "steps": 2})
    assert_ok(run_trainer(cfg))
    trained = lora_of(cfg)
    steps_before = types_of(tmp_path / "run").count("step")
    cfg["sample"]["prompts"], cfg["output"]["overwrite"] = ["a blue square", "a red square"], True
    assert_ok(run_trainer(cfg))
    events = read_events(tmp_path / "run")
    assert [e["type"] for e in events].count("step") == steps_before, "re-sampling trained again"
    assert [e["step"] for e in events if e["type"] == "resume"] == [3]
    assert len([e for e in events if e["type"] == "sample"]) == 1 + 2
    assert max_diff(trained, lora_of(cfg)) == 0


# ---- devices and precision ---------------------------------------------------------------------------------

def test_auto_device_prefers_cuda_then_mps_then_cpu() -> None:
    # CUDA and Apple silicon cannot run here: the choice is tested on what the machine would report
    from trainer.preflight import PreflightError, choose_device

    assert choose_device("auto", has_cuda=True, has_mps=True) == "cuda"
    assert choose_device("auto", has_cuda=False, has_mps=True) == "mps"
    assert choose_device("auto", has_cuda=False, has_mps=False) == "cpu"
    assert choose_device("mps", has_cuda=False, has_mps=True) == "mps"
    with pytest.raises(PreflightError, match="Apple-silicon"):
        choose_device("mps", has_cuda=True, has_mps=False)
    with pytest.raises(PreflightError, match="no CUDA device"):
        choose_device("cuda", has_cuda=False, has_mps=True)


def test_auto_precision_fits_the_device() -> None:
    from trainer.loop import choose_precision

    said: list[str] = []
    assert choose_precision("auto", "cuda", True, said.append) == "bf16"
    assert choose_precision("auto", "cuda", False, said.append) == "fp16"
    assert choose_precision("auto", "cpu", False, said.append) == "no"
    assert choose_precision("auto", "mps", False, said.append) == "no"
    assert not said
    assert choose_precision("fp16", "cpu", False, said.append) == "no"
    assert choose_precision("bf16", "cpu", False, said.append) == "bf16"
    assert len(said) == 1 and "fp16" in said[0] and "fp32" in said[0]


def test_the_start_event_names_the_device(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 1, "device": "auto",
                                                                        "mixed_precision": "fp16"})
    assert_ok(run_trainer(cfg))
    start = next(e for e in read_events(tmp_path / "run") if e["type"] == "start")
    assert start["device"] == "cpu" and start["mixed_precision"] == "no"  # fp16 (the default) → fp32 here
    assert any("fp16" in e["message"] for e in read_events(tmp_path / "run") if e["type"] == "warning")


def test_lora_weights_stay_fp32_over_16_bit_frozen_weights(tiny_model_dir) -> None:
    """What fp16 training relies on, checked where the CPU can run it: the adapters train in fp32 while every
    frozen weight stays in the 16-bit storage dtype."""
    from trainer.config import parse_config
    from trainer.families import get_family
    from trainer.loop import add_lora

    family = get_family("sd15")
    cfg = parse_config({"run_dir": "r", "model": {"path": str(tiny_model_dir)}, "data": {"folder": "d"},
                        "lora": {"train_text_encoder": True}, "output": {"lora_path": "x.safetensors"}})
    for dtype in (torch.float16, torch.bfloat16):
        components = family.load(cfg.model, dtype)
        params = [p for group in add_lora(cfg, family, components).values() for p in group]
        trainable = {id(p) for p in params}
        assert params and all(p.dtype == torch.float32 for p in params)
        frozen = [p for m in components.parts().values() for p in m.parameters()
                  if id(p) not in trainable]
        assert frozen and all(p.dtype == dtype and not p.requires_grad for p in frozen)
