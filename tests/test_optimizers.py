"""Every optimizer trains the tiny model, resumes exactly, and is refused with a schedule it cannot take."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_events, run_trainer, tiny_config
from test_config import config_problems
from test_trainer import assert_ok, assert_resumed_run_matches_uninterrupted, denoising_loss

# each optimizer at the settings a user would start from, and the steps it takes to learn the tiny model
OPTIMIZERS = {
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},  # its estimate grows from 1e-6 for ~50 steps
    "adafactor (relative step)": {"optimizer": "adafactor", "lr_scheduler": "adafactor"},
    "adafactor": {"optimizer": "adafactor", "learning_rate": 1e-2},
    "adamw_schedulefree": {"optimizer": "adamw_schedulefree", "learning_rate": 1e-2, "lr_warmup_steps": 5},
}
LEARNING_STEPS = {"prodigy": 120, "adamw_schedulefree": 80}  # the others: 60, as AdamW (test_trainer)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_learns(tmp_path, tiny_model_dir, two_image_folder, name) -> None:
    steps = LEARNING_STEPS.get(name, 60)
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder,
                      train={"max_steps": steps, **OPTIMIZERS[name]})
    assert_ok(run_trainer(cfg))
    before = denoising_loss(tiny_model_dir, two_image_folder, None)
    after = denoising_loss(tiny_model_dir, two_image_folder, Path(cfg["output"]["lora_path"]))
    lrs = [e["lr"] for e in read_events(tmp_path / "run") if e["type"] == "step"]
    print(f"{name}: loss {before:.4f} -> {after:.4f} ({1 - after / before:.0%} lower)")
    assert after <= 0.7 * before, f"{name}: loss {before:.4f} -> {after:.4f}: less than 30% lower"
    assert len(lrs) == steps and all(lr > 0 for lr in lrs)  # the rate actually applied, never a placeholder 0
    if name == "prodigy":  # its estimate grows from d0 = 1e-6: the events show it, not the multiplier 1.0
        assert lrs[0] < 1e-5 and lrs[-1] > 1e-3


# each optimizer resumes with an adapter type of its own, so the adapters' resume is proven in the same runs
RESUMED_WITH = {"prodigy": {"adapter": "loha"}, "adafactor (relative step)": {"adapter": "lokr"},
                "adafactor": {}, "adamw_schedulefree": {"dora": True}}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_and_adapter_resumes_to_the_same_lora(tmp_path, tiny_model_dir, two_image_folder,
                                                             name) -> None:
    assert_resumed_run_matches_uninterrupted(tmp_path, tiny_model_dir, two_image_folder, train=OPTIMIZERS[name],
                                             lora=RESUMED_WITH[name])


def test_schedules_an_optimizer_cannot_take_are_refused() -> None:
    assert config_problems(train={"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}) == [
        "train.lr_scheduler: schedule-free AdamW replaces the schedule by averaging; use 'constant' (with "
        "lr_warmup_steps for a warmup), not 'cosine'"]
    refused = {
        "Adafactor's own relative step": {"lr_scheduler": "adafactor"},
        "own warmup": {"optimizer": "adafactor", "lr_scheduler": "adafactor", "lr_warmup_steps": 10},
        "about 1.0": {"optimizer": "prodigy", "learning_rate": 1e-4},
    }
    for words, train in refused.items():
        assert any(words in problem for problem in config_problems(train=train)), words
    for train in OPTIMIZERS.values():
        assert config_problems(train=train) == []
    assert config_problems(train={"optimizer": "adafactor", "lr_scheduler": "cosine", "learning_rate": 1e-3}) == []
