"""What fails a run before it costs anything, and the guard that stops a run whose numbers stop being numbers.

Each case was, before: a NaN LoRA written with exit 0; a run that trained and then failed at the save (a name
too long, a read-only or full drive); a rank that ran out of memory adding its adapters with no error event;
more processes than the machine holds. The trainer runs as a real process on the tiny model; the full and
read-only drives are real tmpfs mounts (root only: skipped with the reason elsewhere).
"""

from __future__ import annotations

import json
import math
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import read_events, run_trainer, tiny_config
from safetensors.torch import load_file
from test_bad_input import files_under, run_direct

from trainer.config import ConfigError, parse_config
from trainer.preflight import launch_problems, usable_cores


def error_of(cfg: dict) -> dict:
    events = read_events(Path(cfg["run_dir"]))
    assert events and events[-1]["type"] == "error", [e["type"] for e in events]
    return events[-1]


def assert_refused_before_training(cfg: dict, result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 1 with an error event holding `words`, no step trained, and no LoRA, temp file or checkpoint."""
    assert result.returncode == 1, result.stderr[-3000:]
    message = error_of(cfg)["message"]
    for word in words:
        assert word in message, message
    kinds = {e["type"] for e in read_events(Path(cfg["run_dir"]))}
    assert "step" not in kinds and "cache" not in kinds, kinds
    assert files_under(Path(cfg["output"]["lora_path"]).parent) == set()
    assert not (Path(cfg["run_dir"]) / "checkpoints").exists()
    return message


# ---- 1: NaN and infinities ------------------------------------------------------------------------------

@pytest.mark.parametrize("section, field, value", [
    ("train", "learning_rate", math.nan),
    ("train", "learning_rate", math.inf),
    ("lora", "alpha", math.nan),
    ("train", "max_grad_norm", -math.inf),
    ("data", "caption_dropout", math.nan),
    ("train", "text_encoder_learning_rate", math.nan),
])
def test_nan_and_infinities_are_refused_wherever_a_number_goes(section: str, field: str, value: float) -> None:
    raw = {"run_dir": "r", "model": {"path": "m"}, "data": {"folder": "d"}, "output": {"lora_path": "o.safetensors"}}
    raw[section] = {**raw.get(section, {}), field: value}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == [f"{section}.{field}: must be a finite number, got {value}"]


def test_a_nan_learning_rate_in_the_json_exits_2_before_anything_loads(tmp_path, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder,
                      train={"learning_rate": math.nan})
    assert "NaN" in json.dumps(cfg)  # what Python's JSON writer and reader make of it, as a user's file may hold
    result = run_direct(cfg)
    assert result.returncode == 2 and "train.learning_rate: must be a finite number" in result.stderr


def test_a_run_that_goes_non_finite_stops_and_keeps_the_last_finite_checkpoint(
        tmp_path, tiny_model_dir, two_image_folder) -> None:
    # 1e30 moves the zero-started up weights to ±1e30 at step 1 (finite); step 2's activations overflow
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder,
                      train={"learning_rate": 1e30, "save_every_steps": 1, "max_steps": 6})
    result = run_direct(cfg)
    assert result.returncode == 1, result.stderr[-3000:]
    error = error_of(cfg)
    assert error["kind"] == "NonFiniteTraining"
    message = error["message"]
    for words in ("at step 2", "not a finite number", "train.learning_rate 1e+30", "No LoRA was written",
                  "the checkpoint of step 1 is kept"):
        assert words in message, message
    assert not Path(cfg["output"]["lora_path"]).exists()
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000001"]
    for name in ("adapter.safetensors", "lora.safetensors"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(checkpoints[0] / name).values())


def test_a_learning_rate_of_1e308_writes_no_lora(tmp_path, tiny_model_dir, two_image_folder) -> None:
    # in fp32 the first update itself is infinite: the weights are checked after the step too
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"learning_rate": 1e308})
    result = run_direct(cfg)
    assert result.returncode == 1, result.stderr[-3000:]
    message = error_of(cfg)["message"]
    assert "at step 1: its update made the trained weights non-finite" in message, message
    assert "no checkpoint had been saved" in message, message
    assert files_under(Path(cfg["output"]["lora_path"]).parent) == set()


# ---- 2: what used to fail only after the training -------------------------------------------------------

@contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A real small or read-only drive at `folder` (tmpfs; needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()}): a full or read-only drive "
                    "needs root to make")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("where, options, words", [
    ("loras", "size=2m", ("not enough free disk space", "the LoRA in")),
    ("loras", "ro,size=2m", ("the LoRA's folder", "cannot be written")),
    ("run", "size=2m", ("not enough free disk space", "checkpoint(s) at once")),
])
def test_a_full_or_read_only_drive_is_refused_before_training(
        tmp_path, tiny_model_dir, two_image_folder, where: str, options: str, words: tuple[str, ...]) -> None:
    run_dir, loras = tmp_path / "run", tmp_path / "loras"
    cfg = tiny_config(run_dir, tiny_model_dir, two_image_folder,
                      output={"lora_path": str(loras / "style.safetensors")},
                      train={"cache_dir": str(tmp_path / "cache")})
    with mounted_tmpfs(loras if where == "loras" else run_dir, options):
        assert_refused_before_training(cfg, run_direct(cfg), *words)


@pytest.mark.parametrize("stem, words", [
    ("x" * 240, ("240 bytes", "at most 200")),
    ("CON", ("CON", "Windows")),
    ("ends in a space ", ("space",)),
])
def test_a_name_no_os_can_store_is_refused_before_training(tmp_path, two_image_folder, stem: str,
                                                           words: tuple[str, ...]) -> None:
    # refused before the model is read: the model path need not exist
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder,
                      output={"lora_path": str(tmp_path / "loras" / f"{stem}.safetensors")})
    assert_refused_before_training(cfg, run_direct(cfg), f"output name {stem!r}", *words)


def test_a_chinese_output_name_trains(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 1},
                      output={"lora_path": str(tmp_path / "loras" / "风格模型.safetensors")})
    result = run_direct(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "loras").iterdir()] == ["风格模型.safetensors"]


# ---- 4: more than the machine holds ---------------------------------------------------------------------

def test_a_rank_wider_than_the_layers_is_refused_before_the_adapters_are_added(
        tmp_path, tiny_model_dir, two_image_folder) -> None:
    # 100000 x the layers' widths in fp32 ran out of memory adding the adapters, without an error event
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, lora={"rank": 100000, "alpha": 1.0})
    assert_refused_before_training(cfg, run_direct(cfg), "lora.rank 100000 is larger than the SD 1.5 denoiser layer",
                                   "at most")


def test_more_processes_than_cores_are_refused_by_every_rank_before_the_group_forms(
        tmp_path, tiny_model_dir, two_image_folder) -> None:
    processes = usable_cores() + 1
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"batch_size": 1})
    result = run_trainer(cfg, num_processes=processes, timeout=300)
    assert result.returncode != 0
    message = error_of(cfg)["message"]
    assert f"{processes} training processes asked for" in message and "CPU core(s)" in message, message
    assert "loading" not in {e["type"] for e in read_events(tmp_path / "run")}


@pytest.mark.parametrize("asked, expected", [
    ((64, "cpu", None, 0, False), f"64 training processes asked for, but this machine has {usable_cores()} CPU"),
    ((3, "auto", None, 2, False), "3 training processes asked for, but this machine has 2 CUDA GPU(s)"),
    ((2, "auto", "0,1", 4, False), None),
    ((1, "auto", "3", 2, False), "gpu_ids 3: no GPU 3 here (this machine has GPUs 0-1)"),
    ((1, "auto", "0", 0, False), "gpu_ids 0: no GPU 0 here (this machine has no CUDA GPU)"),
    ((2, "mps", None, 0, True), "2 training processes asked for, but this machine has one Apple-silicon GPU"),
    ((1, "cuda", None, 0, False), "train.device is 'cuda' but no CUDA device is visible"),
])
def test_the_node_refuses_a_launch_the_machine_cannot_hold(asked: tuple, expected: str | None) -> None:
    # GPUs and Apple silicon cannot be had here: the counts are what torch would report on such machines
    problems = launch_problems(*asked)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_drive_that_fills_during_a_checkpoint_says_so_and_leaves_no_partial_folder(tmp_path) -> None:
    # the preflight sized the run; something else filled the drive afterwards
    import errno

    from trainer.resume import save_checkpoint
    from trainer.run import failure_message

    run_dir = tmp_path / "run"
    with mounted_tmpfs(run_dir, "size=1m"):
        with pytest.raises(OSError) as info:
            save_checkpoint(run_dir, 5, adapter={"w": torch.zeros(512, 1024)}, optimizer={"state": {},
                            "param_groups": []}, scheduler={}, scaler=None, write_lora=lambda path: None)
        assert info.value.errno == errno.ENOSPC
        message = failure_message(info.value)
        assert message.startswith("the disk is full writing ") and str(run_dir) in message, message
        assert list((run_dir / "checkpoints").iterdir()) == [], "a half-written checkpoint folder was left"


def test_on_windows_a_lora_path_over_max_path_is_refused(tmp_path) -> None:
    # Windows cannot run here: the rule is taken with windows=True on a path of Windows' length limit
    from trainer.preflight import output_problems

    deep = tmp_path / ("d" * 120)
    short, long_ = deep / "style.safetensors", deep / f"{'s' * 150}.safetensors"
    assert output_problems(short, tmp_path / "run", windows=True) == []
    (problem,) = output_problems(long_, tmp_path / "run", windows=True)
    assert "over Windows' 259" in problem and "shorter output name" in problem
    assert output_problems(long_, tmp_path / "run", windows=False) == []


def test_a_final_save_that_fails_keeps_the_training_and_a_requeue_saves_without_retraining(
        tmp_path, tiny_model_dir, two_image_folder) -> None:
    # the drive passed the preflight, then something else filled it while the run trained
    import threading
    import time

    loras, filler = tmp_path / "loras", tmp_path / "loras" / "someone-elses.bin"
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 3},
                      output={"lora_path": str(loras / "style.safetensors")})
    events = tmp_path / "run" / "events.jsonl"

    def fill_once_training() -> None:
        while '"type": "step"' not in (events.read_text() if events.exists() else ""):
            time.sleep(0.05)
        with filler.open("wb") as f:
            try:
                while True:
                    f.write(b"\0" * 1024 * 1024)
            except OSError:
                pass

    with mounted_tmpfs(loras, "size=24m"):
        filling = threading.Thread(target=fill_once_training, daemon=True)
        filling.start()
        failed = run_direct(cfg)
        filling.join(timeout=60)
        assert failed.returncode == 1, failed.stderr[-3000:]
        message = error_of(cfg)["message"]
        assert message.startswith("the disk is full writing ") and str(loras) in message, message
        assert sorted(p.name for p in loras.iterdir()) == ["someone-elses.bin"], "a partial LoRA was left"
        kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert kept == ["step-00000003"], kept

        filler.unlink()
        again = run_direct(cfg)
        assert again.returncode == 0, again.stderr[-3000:]
        second = read_events(tmp_path / "run")
        last_start = max(i for i, e in enumerate(second) if e["type"] == "start")
        assert second[last_start]["start_step"] == 3
        assert not [e for e in second[last_start:] if e["type"] == "step"], "the re-queue trained again"
        assert (loras / "style.safetensors").is_file()
