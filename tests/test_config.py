"""Config validation: every bad field is named in one error, and the CLI exits with code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import RUN_PY, read_events

from trainer.config import ConfigError, RunConfig, parse_config


def valid() -> dict:
    return {
        "run_dir": "/tmp/run",
        "model": {"path": "/models/sd15.safetensors"},
        "data": {"folder": "/data/set"},
        "output": {"lora_path": "/loras/out.safetensors"},
    }


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def config_problems(**sections: dict) -> list[str]:
    """The problems of a valid config with `sections` merged in ([] when it is still valid)."""
    raw = valid()
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    try:
        parse_config(raw)
    except ConfigError as exc:
        return exc.problems
    return []


def test_defaults_are_the_seed_chapters() -> None:
    cfg = parse_config(valid())
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.lora.targets) == (4, 4.0, "gaussian", "attention")
    t = cfg.train
    assert (t.learning_rate, t.adam_beta1, t.adam_beta2, t.weight_decay, t.adam_epsilon) == (
        1e-4, 0.9, 0.999, 1e-2, 1e-8,
    )
    assert (t.batch_size, t.gradient_accumulation_steps, t.epochs, t.lr_scheduler) == (4, 1, 200, "constant")
    assert (t.max_grad_norm, t.mixed_precision, t.optimizer) == (1.0, "fp16", "adamw")
    assert (cfg.data.resolution, cfg.data.crop, cfg.data.random_flip) == (0, "center", True)  # 0: the family's own
    assert (t.min_snr_gamma, t.noise_offset, cfg.lora.train_text_encoder) == (0.0, 0.0, False)


def test_round_trip_through_json() -> None:
    cfg = parse_config(valid())
    assert parse_config(json.loads(cfg.to_json())) == cfg
    assert isinstance(cfg, RunConfig)


def test_every_bad_field_is_named_at_once() -> None:
    raw = valid()
    raw["lora"] = {"rank": 0, "alpha": "four", "targets": "everything"}
    raw["train"] = {"learning_rate": 0, "batch_size": 2.5, "optimizer": "sgd", "bogus": 1}
    raw["data"] = {"folder": "/d", "resolution": 513}
    raw["output"] = {"lora_path": "/loras/out.ckpt"}
    problems = "\n".join(problems_of(raw))
    for field in (
        "lora.rank", "lora.alpha", "lora.targets", "train.learning_rate", "train.batch_size",
        "train.optimizer", "train.bogus", "data.resolution", "output.lora_path",
    ):
        assert field in problems, f"{field} not named in:\n{problems}"


def test_unknown_section_and_missing_required() -> None:
    problems = "\n".join(problems_of({"modle": {}, "data": {"folder": "/d", "manifest": "/m.json"}}))
    assert "modle: unknown key" in problems
    assert "model.path: required" in problems and "run_dir: required" in problems
    assert "exactly one of manifest, folder" in problems


def test_bool_is_not_an_int() -> None:
    raw = valid()
    raw["train"] = {"batch_size": True}
    assert any(p.startswith("train.batch_size") for p in problems_of(raw))


def test_cli_exits_2_and_lists_every_problem(tmp_path) -> None:
    raw = valid()
    raw["run_dir"] = str(tmp_path / "run")
    raw["lora"] = {"rank": -1}
    raw["train"] = {"learning_rate": -1.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    result = subprocess.run([sys.executable, str(RUN_PY), "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lora.rank" in result.stderr and "train.learning_rate" in result.stderr
    (event,) = read_events(tmp_path / "run")
    assert event["type"] == "error" and len(event["problems"]) == 2


def test_cli_reports_unreadable_json(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    result = subprocess.run([sys.executable, str(RUN_PY), "--config", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "not valid JSON" in result.stderr
