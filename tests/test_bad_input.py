"""The trainer under bad input: a clear error or warning naming the file or field, and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUN_PY, draw_image, read_events, tiny_config, write_config


def run_direct(cfg: dict) -> subprocess.CompletedProcess:
    """One process without the accelerate launcher: the same trainer, a faster start for error cases."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(RUN_PY), "--config", str(write_config(cfg))],
                          capture_output=True, text=True, timeout=300, env=env)


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def assert_failed_cleanly(cfg: dict, result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    error = read_events(Path(cfg["run_dir"]))[-1]
    assert error["type"] == "error"
    for word in words:
        assert word in error["message"], error["message"]
    out = Path(cfg["output"]["lora_path"]).parent
    assert files_under(out) == set(), f"left behind: {files_under(out)}"
    return error["message"]


def test_missing_checkpoint_is_named(tmp_path, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "nowhere.safetensors", two_image_folder)
    assert_failed_cleanly(cfg, run_direct(cfg), "nowhere.safetensors")


def test_corrupt_checkpoint_is_named(tmp_path, two_image_folder) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    cfg = tiny_config(tmp_path / "run", broken, two_image_folder)
    assert_failed_cleanly(cfg, run_direct(cfg), "broken.safetensors")


def test_batch_larger_than_the_data_is_refused(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"batch_size": 3})
    assert_failed_cleanly(cfg, run_direct(cfg), "train.batch_size", "2 images")


def test_unreadable_images_are_all_named(tmp_path, tiny_model_dir, two_image_folder) -> None:
    (two_image_folder / "zero.png").write_bytes(b"")
    (two_image_folder / "text.png").write_text("hello")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder)
    assert_failed_cleanly(cfg, run_direct(cfg), "zero.png", "text.png")


def test_long_caption_is_truncated_with_a_warning(tmp_path, tiny_model_dir, two_image_folder) -> None:
    (two_image_folder / "red.txt").write_text(", ".join(f"word{i}" for i in range(120)))
    (two_image_folder / "blue.txt").write_text("a blue square, 日本語のキャプション, 🟦")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 1})
    result = run_direct(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [e["message"] for e in read_events(tmp_path / "run") if e["type"] == "warning"]
    assert "1 caption(s) longer than 77 tokens were truncated" in warnings


def test_images_without_captions_train_with_a_warning(tmp_path, tiny_model_dir, two_image_folder) -> None:
    (two_image_folder / "red.txt").unlink()
    draw_image(two_image_folder / "green.png", (64, 64), (20, 160, 20))
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 1})
    result = run_direct(cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = " ".join(e["message"] for e in read_events(tmp_path / "run") if e["type"] == "warning")
    assert "2" in warnings and "caption" in warnings


@pytest.mark.parametrize("field, value, named", [
    ("rank", 0, "lora.rank"),
    ("learning_rate", 0.0, "train.learning_rate"),
    ("resolution", 100, "data.resolution"),
])
def test_out_of_range_values_exit_2_before_anything_loads(tmp_path, two_image_folder, field, value, named) -> None:
    section = {"rank": "lora", "learning_rate": "train", "resolution": "data"}[field]
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder, **{section: {field: value}})
    result = run_direct(cfg)
    assert result.returncode == 2 and named in result.stderr
    assert files_under(tmp_path / "run") == {tmp_path / "run" / "config.json", tmp_path / "run" / "events.jsonl"}
