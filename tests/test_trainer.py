"""The trainer end to end on the tiny model: real `accelerate launch` subprocesses, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    draw_image,
    kill_after_checkpoint,
    launch_args,
    read_events,
    run_trainer,
    tiny_config,
    trainer_env,
    wait_for_group_exit,
    write_config,
)
from safetensors.torch import load_file


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"trainer failed ({result.returncode}):\n{result.stderr[-4000:]}"


def lora_of(cfg: dict) -> dict[str, torch.Tensor]:
    return load_file(cfg["output"]["lora_path"])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def denoising_loss(model_dir: Path, data_folder: Path, lora: Path | None,
                   adapt: Callable[[torch.nn.Module], None] | None = None) -> float:
    """Mean denoising MSE of the tiny model on the two training images, over fixed (noise, t) pairs; with the
    LoRA file loaded by diffusers, or the UNet changed by `adapt` (an adapter diffusers cannot load)."""
    from diffusers import StableDiffusionPipeline

    from trainer.data import open_image, prepare_image

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, local_files_only=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    if adapt is not None:
        adapt(pipe.unet)
    g = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for name in ("red", "blue"):
            pixels = prepare_image(open_image(data_folder / f"{name}.png"), (64, 64), "center", None)
            latents = pipe.vae.encode(pixels[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer((data_folder / f"{name}.txt").read_text(), padding="max_length",
                                 max_length=77, truncation=True, return_tensors="pt").input_ids
            text = pipe.text_encoder(ids)[0]
            for _ in range(16):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.randint(0, 1000, (1,), generator=g)
                noisy = pipe.scheduler.add_noise(latents, noise, t)
                pred = pipe.unet(noisy, t, encoder_hidden_states=text).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return sum(losses) / len(losses)


def test_it_learns(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder,
                      train={"max_steps": 60, "learning_rate": 1e-2})
    assert_ok(run_trainer(cfg))
    lora = Path(cfg["output"]["lora_path"])
    before = denoising_loss(tiny_model_dir, two_image_folder, None)
    after = denoising_loss(tiny_model_dir, two_image_folder, lora)
    assert after <= 0.7 * before, f"loss {before:.4f} -> {after:.4f}: less than 30% lower"


def test_events_and_kohya_file(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder)
    result = run_trainer(cfg)
    assert_ok(result)
    events = read_events(tmp_path / "run")
    types = [e["type"] for e in events]
    assert types[0] == "loading" and types[-1] == "done"
    start = next(e for e in events if e["type"] == "start")
    assert start["total_steps"] == 4 and start["images"] == 2 and start["buckets"] == {"64x64": 2}
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert {"loss", "smoothed_loss", "lr", "images_per_s", "eta_s", "epoch"} <= e.keys()
        assert e["loss"] > 0 and e["lr"] == pytest.approx(1e-3)
    caches = [e for e in events if e["type"] == "cache"]
    assert caches[-1]["done"] == caches[-1]["total"] == 2
    assert events[-1]["lora"] == cfg["output"]["lora_path"]
    tensors = lora_of(cfg)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in tensors} == {
        "lora_down", "lora_up", "alpha"}
    assert "training" in result.stderr  # the tqdm bar on the terminal


def test_text_encoder_and_conv_lora_with_loss_options(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder,
                      lora={"targets": "all", "train_text_encoder": True, "rank": 2, "alpha": 1.0},
                      train={"max_steps": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05},
                      sample={"prompts": ["a red circle"], "negative_prompt": "blue", "steps": 2})
    assert_ok(run_trainer(cfg))
    tensors = lora_of(cfg)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in tensors.items() if k.endswith("lora_down.weight"))
    events = read_events(tmp_path / "run")
    assert all(e["loss"] == e["loss"] for e in events if e["type"] == "step")  # finite, not NaN
    (sample,) = [e for e in events if e["type"] == "sample"]
    assert sample["step"] == 2 and Path(sample["path"]).is_file()


def test_same_config_same_lora_bit_for_bit(tmp_path, tiny_model_dir, two_image_folder) -> None:
    runs = [tiny_config(tmp_path / f"run{i}", tiny_model_dir, two_image_folder, data={"random_flip": True})
            for i in range(2)]
    for cfg in runs:
        assert_ok(run_trainer(cfg))
    a, b = lora_of(runs[0]), lora_of(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """The proof that data parallel really syncs gradients: 2 x batch 1 == 1 x batch 2."""
    assert_two_processes_match_one(tmp_path, tiny_model_dir, two_image_folder)


def assert_two_processes_match_one(tmp_path: Path, model_dir: Path, data_folder: Path, **sections: dict) -> None:
    """Two processes at batch 1 train the LoRA one process trains at batch 2 (within 1e-5)."""
    train = sections.pop("train", {})
    one = tiny_config(tmp_path / "one", model_dir, data_folder, train={**train, "batch_size": 2}, **sections)
    two = tiny_config(tmp_path / "two", model_dir, data_folder, train={**train, "batch_size": 1}, **sections)
    assert_ok(run_trainer(one))
    assert_ok(run_trainer(two, num_processes=2))
    assert next(e for e in read_events(tmp_path / "two") if e["type"] == "start")["processes"] == 2
    assert max_diff(lora_of(one), lora_of(two)) < 1e-5
    # and the runs did train: the LoRA moved away from its zero-initialised up weights
    assert max(float(v.abs().max()) for k, v in lora_of(one).items() if "lora_up" in k or "lora_B" in k) > 1e-4


def test_killed_run_resumes_to_the_same_lora(tmp_path, tiny_model_dir, two_image_folder) -> None:
    assert_resumed_run_matches_uninterrupted(tmp_path, tiny_model_dir, two_image_folder)


def assert_resumed_run_matches_uninterrupted(tmp_path: Path, model_dir: Path, data_folder: Path,
                                            **sections: dict) -> None:
    """A run killed after its step-3 checkpoint, run again, resumes there and ends with the LoRA of the run
    never killed (within 1e-6)."""
    train = {**sections.pop("train", {}), "max_steps": 8, "save_every_steps": 3}
    whole = tiny_config(tmp_path / "whole", model_dir, data_folder, train=train, **sections)
    assert_ok(run_trainer(whole))

    cut = tiny_config(tmp_path / "cut", model_dir, data_folder, train=train, **sections)
    kill_after_checkpoint(cut, step=4)
    assert not Path(cut["output"]["lora_path"]).exists(), "the run finished before it could be killed"

    assert_ok(run_trainer(cut))
    resumed = [e for e in read_events(tmp_path / "cut") if e["type"] == "resume"]
    assert resumed and resumed[-1]["step"] == 3
    assert max_diff(lora_of(whole), lora_of(cut)) < 1e-6


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100000})
    proc = subprocess.Popen(launch_args(write_config(cfg)), start_new_session=True, env=trainer_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events_path = tmp_path / "run" / "events.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and '"step": 3,' not in (events_path.read_text() if events_path.exists() else ""):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    wait_for_group_exit(proc.pid)
    events = read_events(tmp_path / "run")
    cancelled = next(e for e in events if e["type"] == "cancelled")
    checkpoint = next(e for e in events if e["type"] == "checkpoint")
    assert checkpoint["step"] == cancelled["step"] >= 3
    assert Path(checkpoint["lora"]).is_file()
    assert not Path(cfg["output"]["lora_path"]).exists()


def test_clipping_bounds_the_update(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """With eps >> |g|, one AdamW step moves each weight by lr*g/eps, so ||update|| <= lr*max_norm/eps."""
    train = {"max_steps": 1, "learning_rate": 1.0, "adam_epsilon": 1.0, "weight_decay": 0.0}
    clipped = tiny_config(tmp_path / "clip", tiny_model_dir, two_image_folder,
                          train=train | {"max_grad_norm": 1e-3})
    free = tiny_config(tmp_path / "free", tiny_model_dir, two_image_folder, train=train | {"max_grad_norm": 0.0})
    for cfg in (clipped, free):
        assert_ok(run_trainer(cfg))

    def update_norm(cfg: dict) -> float:  # lora_up starts at zero (gaussian init), so it *is* the update
        ups = [v for k, v in lora_of(cfg).items() if "lora_up" in k]
        return float(torch.sqrt(sum((u.double() ** 2).sum() for u in ups)))

    grad_norm = next(e for e in read_events(tmp_path / "clip") if e["type"] == "step")["grad_norm"]
    assert grad_norm > 1e-3, "the test needs gradients larger than the clip threshold"
    assert update_norm(clipped) <= 1e-3 * 1.001
    assert update_norm(free) > 10 * update_norm(clipped)


def test_cache_is_reused_and_invalidated_by_content(tmp_path, tiny_model_dir, two_image_folder) -> None:
    train = {"max_steps": 1, "cache_dir": str(tmp_path / "cache")}
    cfg = tiny_config(tmp_path / "a", tiny_model_dir, two_image_folder, train=train)
    assert_ok(run_trainer(cfg))
    cfg2 = tiny_config(tmp_path / "b", tiny_model_dir, two_image_folder, train=train)
    assert_ok(run_trainer(cfg2))
    assert [e for e in read_events(tmp_path / "b") if e["type"] == "cache"][-1]["hits"] == 2
    draw_image(two_image_folder / "red.png", (64, 64), (200, 200, 30), "square")  # same name, new pixels
    cfg3 = tiny_config(tmp_path / "c", tiny_model_dir, two_image_folder, train=train)
    assert_ok(run_trainer(cfg3))
    assert [e for e in read_events(tmp_path / "c") if e["type"] == "cache"][-1]["hits"] == 1


def test_portrait_trains_as_portrait(tmp_path, tiny_model_dir) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    draw_image(folder / "tall.png", (128, 256), (10, 120, 10))
    (folder / "tall.txt").write_text("a tall green thing")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, folder,
                      data={"resolution": 128, "bucket_step": 32}, train={"batch_size": 1, "max_steps": 1})
    assert_ok(run_trainer(cfg))
    buckets = next(e for e in read_events(tmp_path / "run") if e["type"] == "start")["buckets"]
    ((size, count),) = buckets.items()
    width, height = map(int, size.split("x"))
    assert height > width and count == 1


def test_existing_lora_is_never_overwritten(tmp_path, tiny_model_dir, two_image_folder) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder)
    target = Path(cfg["output"]["lora_path"])
    target.parent.mkdir(parents=True)
    target.write_bytes(b"user's file")
    result = run_trainer(cfg)
    assert result.returncode == 1
    assert target.read_bytes() == b"user's file"
    error = read_events(tmp_path / "run")[-1]
    assert error["type"] == "error" and "overwrite" in error["message"]


def test_world_size_without_a_process_group_is_refused(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """WORLD_SIZE says 2 but no process group can form: an error, never two processes training alone."""
    import sys

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder)
    path = write_config(cfg)
    env = dict(trainer_env(), WORLD_SIZE="2")
    result = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "trainer" / "run.py"),
                             "--config", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert read_events(tmp_path / "run")[-1]["type"] == "error"
    assert not Path(cfg["output"]["lora_path"]).exists()


def test_one_process_in_a_world_of_two_is_refused() -> None:
    """The silent case measured with accelerate: launched as N processes, each alone (accelerator sees 1)."""
    from trainer.loop import require_one_group

    require_one_group(world_size=2, processes=2)
    require_one_group(world_size=1, processes=1)
    with pytest.raises(RuntimeError, match="did not form one group"):
        require_one_group(world_size=2, processes=1)


def test_adamw8bit_without_cuda_is_a_clear_error(tmp_path, tiny_model_dir, two_image_folder) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"optimizer": "adamw8bit"})
    assert run_trainer(cfg).returncode == 1
    assert "needs a CUDA GPU" in read_events(tmp_path / "run")[-1]["message"]


def test_cpu_threads_undo_accelerates_one_thread_default() -> None:
    from trainer.loop import cpu_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_threads("1", None) == cores  # what `accelerate launch` sets when not told otherwise
    assert cpu_threads(None, None) == cores
    assert cpu_threads("1", "2") == max(1, cores // 2)  # two local processes share the cores
    assert cpu_threads("3", "2") == 3  # a user's own choice stays
