"""Caption dropout, tag shuffling and the trigger word: what each sample trains on, drawn from the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import draw_image, run_trainer, tiny_config
from safetensors import safe_open
from test_config import config_problems
from test_trainer import assert_ok, assert_two_processes_match_one, lora_of, max_diff

from trainer.captions import caption_at, with_trigger
from trainer.config import DataConfig

CAPTION = "portrait, red hair, smiling, outdoors, blue sky, film grain"


def captions_over_epochs(data: DataConfig, seed: int = 0, epochs: int = 50) -> list[str]:
    return [caption_at(CAPTION, data, seed, epoch, slot) for epoch in range(epochs) for slot in range(4)]


def test_shuffling_keeps_the_leading_tags_and_every_tag() -> None:
    data = DataConfig(shuffle_tags=True, keep_tags=2)
    seen = captions_over_epochs(data)
    tags = CAPTION.split(", ")
    for caption in seen:
        parts = caption.split(", ")
        assert parts[:2] == tags[:2] and sorted(parts) == sorted(tags)
    assert len(set(seen)) == 24  # really reordered: all 4! orders of the four shuffled tags, in 200 draws


def test_the_trigger_word_comes_first_and_stays_first() -> None:
    captioned = with_trigger(CAPTION, " zxq ")
    assert captioned == f"zxq, {CAPTION}" and with_trigger("", "zxq") == "zxq" and with_trigger(CAPTION, "") == CAPTION
    data = DataConfig(shuffle_tags=True, trigger_word="zxq")
    assert all(caption_at(captioned, data, 3, e, 0).startswith("zxq, ") for e in range(40))


def test_dropout_drops_about_the_share_asked_and_nothing_else_changes() -> None:
    seen = captions_over_epochs(DataConfig(caption_dropout=0.25), epochs=250)
    dropped = seen.count("")
    assert 0.2 < dropped / len(seen) < 0.3
    assert set(seen) == {"", CAPTION}  # without shuffling a kept caption is the caption as written (cached)


def test_the_draws_are_a_function_of_the_seed() -> None:
    data = DataConfig(caption_dropout=0.2, shuffle_tags=True, keep_tags=1)
    assert captions_over_epochs(data, seed=5) == captions_over_epochs(data, seed=5)
    assert captions_over_epochs(data, seed=5) != captions_over_epochs(data, seed=6)


def test_caption_settings_out_of_range_are_refused() -> None:
    problems = config_problems(data={"caption_dropout": 1.0, "keep_tags": 2, "trigger_word": "a\nb"})
    assert problems == ["data.caption_dropout: in [0, 1)", "data.keep_tags: only means something with shuffle_tags on",
                        "data.trigger_word: one line"]


@pytest.fixture
def tagged_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tagged"
    folder.mkdir()
    for name, colour, shape in (("red", (220, 30, 30), "circle"), ("blue", (30, 30, 220), "square")):
        draw_image(folder / f"{name}.png", (64, 64), colour, shape)
        (folder / f"{name}.txt").write_text(f"{name}, {shape}, flat colour, centred, plain background")
    return folder


CAPTION_TRICKS = {"caption_dropout": 0.3, "shuffle_tags": True, "keep_tags": 1, "trigger_word": "zxq"}


def test_shuffled_and_dropped_captions_two_processes_match_one(tmp_path, tiny_model_dir, tagged_folder) -> None:
    assert_two_processes_match_one(tmp_path, tiny_model_dir, tagged_folder, data=CAPTION_TRICKS,
                                   train={"max_steps": 6})


def test_caption_tricks_repeat_bit_for_bit_and_change_the_lora(tmp_path, tiny_model_dir, tagged_folder) -> None:
    runs = {name: tiny_config(tmp_path / name, tiny_model_dir, tagged_folder, data=data)
            for name, data in (("plain", {}), ("tricks", CAPTION_TRICKS), ("again", CAPTION_TRICKS),
                               ("dropout", {"caption_dropout": 0.5}))}
    for cfg in runs.values():
        assert_ok(run_trainer(cfg))
    tricks, again = lora_of(runs["tricks"]), lora_of(runs["again"])
    assert all(torch.equal(tricks[k], again[k]) for k in tricks)
    assert max_diff(lora_of(runs["plain"]), tricks) > 1e-6  # the captions really changed what was trained
    assert max_diff(lora_of(runs["plain"]), lora_of(runs["dropout"])) > 1e-6  # dropout alone, through the cache
    with safe_open(runs["tricks"]["output"]["lora_path"], "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_shuffle_caption"], metadata["ss_keep_tokens"], metadata["ss_caption_dropout_rate"]) == (
        "True", "2", "0.3")
    tags = json.loads(metadata["ss_tag_frequency"])
    assert next(iter(tags.values()))["zxq"] == 2  # the trigger word was in both captions
