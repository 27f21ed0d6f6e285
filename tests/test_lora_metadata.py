"""The LoRA file's metadata: kohya's keys in kohya's formats, A1111's hashes, and no path of the user's machine.

A1111 and Civitai identify a LoRA by `sshs_model_hash`; kohya sd-scripts writes it, and A1111 recomputes it from
the file when it is missing. The tests compute every hash a second way, from the saved file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from pathlib import Path, PurePath

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import trainer.lora_file as lora_file
from trainer.config import DataConfig, LoraConfig, ModelConfig, OutputConfig, RunConfig, TrainConfig, parse_config
from trainer.families.sd15 import SD15
from trainer.lora_file import (
    addnet_hashes,
    base_model_hashes,
    count_tags,
    epochs_spanned,
    lora_metadata,
    read_lora_file,
    save_lora_file,
)

RANK, ALPHA = 4, 2.0
MIB = 0x100000
BUCKETS = {(512, 768): 2, (640, 640): 1}  # (width, height): images, repeats not counted
REPEATS = 2
# every key lora_metadata writes for an "all" LoRA of a single-file base model with the buckets known
EXPECTED_KEYS = set(
    """ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_network_train_unet_only
    ss_network_train_text_encoder_only ss_network_args ss_learning_rate ss_unet_lr ss_text_encoder_lr
    ss_lr_scheduler ss_lr_warmup_steps ss_optimizer ss_batch_size_per_device ss_gradient_accumulation_steps
    ss_gradient_checkpointing ss_mixed_precision ss_max_grad_norm ss_noise_offset ss_min_snr_gamma ss_seed
    ss_steps ss_max_train_steps ss_clip_skip ss_v2 ss_zero_terminal_snr ss_epoch ss_num_epochs ss_num_batches_per_epoch
    ss_num_train_images ss_num_reg_images ss_resolution ss_enable_bucket ss_flip_aug ss_random_crop
    ss_shuffle_caption ss_keep_tokens ss_caption_dropout_rate
    ss_tag_frequency ss_dataset_dirs ss_bucket_info ss_base_model_version ss_sd_model_name ss_sd_model_hash
    ss_new_sd_model_hash ss_output_name ss_training_started_at ss_training_finished_at sshs_model_hash
    sshs_legacy_hash modelspec.sai_model_spec modelspec.architecture modelspec.implementation modelspec.title
    modelspec.resolution modelspec.date modelspec.prediction_type lora_foundry.config""".split()
)
JSON_KEYS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_network_args", "lora_foundry.config")
# an absolute path: POSIX (a separator, a name, a separator) or Windows (a drive letter)
ABSOLUTE_PATH = re.compile(r"(^|[\s\"'(\[{,:=])/[^/\s\"']+/|\b[A-Za-z]:[\\/]")


# --- building blocks -----------------------------------------------------------------------------------


def _base_model(folder: Path) -> Path:
    """A stand-in single-file base model: 1.5 MiB of seeded bytes (more than A1111's legacy window needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "v1-5-pruned.safetensors"
    path.write_bytes(torch.randint(0, 256, (3 * MIB // 2,), generator=torch.Generator().manual_seed(3),
                                   dtype=torch.uint8).numpy().tobytes())
    return path


def _cfg(home: Path, *, manifest: bool = False, name: str = "", targets: str = "all", **data) -> RunConfig:
    """A config whose every path lies under `home`, a user's folder."""
    data_source = {"manifest": str(home / "datasets" / "cats.json")} if manifest else {
        "folder": str(home / "datasets" / "cats")}
    return RunConfig(
        run_dir=str(home / "runs" / "cat-run"),
        model=ModelConfig(path=str(_base_model(home / "models")), tokenizer_dir=str(home / "tokenizer")),
        data=DataConfig(resolution=768, repeats=REPEATS, **data_source, **data),
        lora=LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, train_text_encoder=True),
        train=TrainConfig(max_steps=10, epochs=200, cache_dir=str(home / "cache")),
        output=OutputConfig(lora_path=str(home / "loras" / "cat_lora.safetensors"), name=name, run_id="abc123"),
    )


def _tensors() -> dict[str, torch.Tensor]:
    """kohya-named tensors, about 1.3 MB: larger than the 1 MiB + 64 KiB that A1111's legacy hash reads."""
    generator = torch.Generator().manual_seed(5)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(RANK, 40_000, generator=generator),
        "lora_unet_a.lora_up.weight": torch.randn(40_000, RANK, generator=generator),
        "lora_unet_a.alpha": torch.tensor(ALPHA),
    }


def _metadata(cfg: RunConfig, tags: dict | None = None, **overrides) -> dict[str, str]:
    kwargs = dict(
        family=SD15,
        num_train_images=3 * REPEATS,
        steps=7,
        tag_frequency=tags if tags is not None else count_tags(["a cat, sitting", "a cat"], "cats"),
        started_at=1_700_000_000.5,
        finished_at=1_700_000_600.25,
        max_train_steps=10,
        batches_per_epoch=3,
        bucket_counts=BUCKETS,
        base_hashes=base_model_hashes(cfg.model.path),
        prediction_type="epsilon",
        tensors=_tensors(),
    )
    return lora_metadata(cfg, **{**kwargs, **overrides})


def _config_paths(cfg: RunConfig) -> list[str]:
    d = cfg.data
    paths = [cfg.run_dir, cfg.model.path, cfg.model.tokenizer_dir, d.manifest, d.folder, cfg.train.cache_dir,
             cfg.output.lora_path]
    return [p for p in paths if p]


def _header(data: bytes) -> tuple[int, dict]:
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _legacy(data: bytes) -> str:
    return _sha256(data[MIB : MIB + 0x10000])[:8]


def _is_hex(value: str, length: int) -> bool:
    return re.fullmatch(f"[0-9a-f]{{{length}}}", value) is not None


# --- keys and formats ----------------------------------------------------------------------------------


def test_metadata_key_set_and_formats(tmp_path):
    cfg = _cfg(tmp_path / "home")
    metadata = _metadata(cfg)
    assert set(metadata) == EXPECTED_KEYS
    assert all(isinstance(v, str) for v in metadata.values())
    for key in JSON_KEYS:
        json.loads(metadata[key])
    assert _is_hex(metadata["sshs_model_hash"], 64) and _is_hex(metadata["sshs_legacy_hash"], 8)
    assert _is_hex(metadata["ss_new_sd_model_hash"], 64) and _is_hex(metadata["ss_sd_model_hash"], 8)
    assert metadata["ss_clip_skip"] == "None"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.implementation"] == "diffusers"  # kohya's value for an SD v1 LoRA
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"cats": {"n_repeats": REPEATS, "img_count": 3}}
    assert json.loads(metadata["ss_bucket_info"]) == {"buckets": {
        "0": {"resolution": [512, 768], "count": 2 * REPEATS},
        "1": {"resolution": [640, 640], "count": 1 * REPEATS},
    }}
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": str(ALPHA)}
    for key in ("ss_epoch", "ss_num_epochs", "ss_steps", "ss_max_train_steps", "ss_num_batches_per_epoch",
                "ss_num_train_images", "ss_network_dim", "ss_seed"):
        int(metadata[key])
    for key in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_grad_norm", "ss_noise_offset",
                "ss_min_snr_gamma", "ss_network_alpha", "ss_training_started_at", "ss_training_finished_at"):
        float(metadata[key])


def test_metadata_values(tmp_path):
    cfg = _cfg(tmp_path / "home")
    tags = count_tags(["a cat, sitting ,  red", "a cat,,", "dog"], "cats")
    assert tags == {"cats": {"a cat": 2, "sitting": 1, "red": 1, "dog": 1}}
    metadata = _metadata(cfg, tags)
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == (str(RANK), ALPHA)
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert metadata["ss_resolution"] == "(768, 768)" and metadata["modelspec.resolution"] == "768x768"
    assert (metadata["ss_steps"], metadata["ss_num_train_images"]) == ("7", str(3 * REPEATS))
    assert json.loads(metadata["ss_tag_frequency"]) == tags
    assert float(metadata["ss_training_started_at"]) == 1_700_000_000.5
    assert float(metadata["ss_training_finished_at"]) == 1_700_000_600.25
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "cat_lora"
    assert math.isclose(datetime.fromisoformat(metadata["modelspec.date"]).timestamp(), 1_700_000_600, abs_tol=1)
    assert float(metadata["ss_learning_rate"]) == cfg.train.learning_rate


def test_metadata_variants(tmp_path):
    cfg = _cfg(tmp_path / "home", name="My Cat", targets="attention")
    metadata = _metadata(cfg, {"cats": {}}, prediction_type="v_prediction")
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "My Cat"
    assert metadata["modelspec.prediction_type"] == "v"
    assert "ss_network_args" not in metadata  # no conv layers: plain kohya LoRA
    with pytest.raises(TypeError, match="dataset"):
        _metadata(cfg, {"a cat": 2})


def test_bucket_info_is_null_without_bucketing_and_left_out_when_unknown(tmp_path):
    # kohya: json.dumps(dataset.bucket_info), which stays None when bucketing is off
    assert _metadata(_cfg(tmp_path / "a", bucketing=False))["ss_bucket_info"] == "null"
    assert "ss_bucket_info" not in _metadata(_cfg(tmp_path / "b"), bucket_counts=None)


def test_metadata_round_trips_through_the_file(tmp_path):
    metadata = _metadata(_cfg(tmp_path / "home"))
    save_lora_file(tmp_path / "m.safetensors", _tensors(), metadata, overwrite=False)
    assert read_lora_file(tmp_path / "m.safetensors")[1] == metadata


# --- epochs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "batches_per_epoch", "accumulation", "epoch"),
    [(0, 5, 1, 0), (1, 5, 1, 1), (5, 5, 1, 1), (6, 5, 1, 2), (3, 5, 2, 2), (5, 5, 2, 2), (10, 4, 2, 5)],
)
def test_epochs_spanned_is_one_based(steps, batches_per_epoch, accumulation, epoch):
    # the loop's epoch index of the last batch is (steps * accumulation - 1) // batches_per_epoch; kohya counts
    # from 1
    assert epochs_spanned(steps, batches_per_epoch, accumulation) == epoch


def test_epoch_and_epoch_count_follow_the_steps_not_the_config(tmp_path):
    cfg = _cfg(tmp_path / "home")  # max_steps 10 decides; epochs 200 is configured and meaningless
    metadata = _metadata(cfg, steps=7, max_train_steps=10, batches_per_epoch=3)
    assert (metadata["ss_epoch"], metadata["ss_num_epochs"], metadata["ss_num_batches_per_epoch"]) == ("3", "4", "3")
    cfg.train.gradient_accumulation_steps = 2  # a step takes two batches
    metadata = _metadata(cfg, steps=7, max_train_steps=10, batches_per_epoch=3)
    assert (metadata["ss_epoch"], metadata["ss_num_epochs"]) == ("5", "7")
    first = _metadata(cfg, steps=1, max_train_steps=10, batches_per_epoch=3)
    assert first["ss_epoch"] == "1"  # the first epoch is 1, as kohya writes it


def test_epoch_given_directly_still_works_but_not_with_batches_per_epoch(tmp_path):
    cfg = _cfg(tmp_path / "home")
    metadata = _metadata(cfg, epoch=4, batches_per_epoch=0)
    assert (metadata["ss_epoch"], metadata["ss_num_epochs"]) == ("4", "4")
    assert "ss_num_batches_per_epoch" not in metadata
    with pytest.raises(ValueError, match="not both"):
        _metadata(cfg, epoch=4, batches_per_epoch=3)


# --- no path of the user's machine ---------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [False, True], ids=["folder", "manifest"])
def test_no_value_holds_an_absolute_path(tmp_path, manifest):
    home = tmp_path / "home" / "alice"
    cfg = _cfg(home, manifest=manifest)
    metadata = _metadata(cfg, tags=count_tags(["a cat"], lora_file.dataset_name(cfg.data)))
    forbidden = {str(tmp_path), str(home)}
    for path in _config_paths(cfg):
        assert PurePath(path).is_absolute()
        forbidden |= {path} | {str(parent) for parent in PurePath(path).parents if parent != PurePath(parent.anchor)}
    for key, value in metadata.items():
        leaks = sorted(p for p in forbidden if p in value)
        assert not leaks, f"{key} holds {leaks}"
        assert not ABSOLUTE_PATH.search(value), f"{key} holds an absolute path: {value[:200]}"


@pytest.mark.parametrize("manifest", [False, True], ids=["folder", "manifest"])
def test_stored_config_parses_with_names_instead_of_paths(tmp_path, manifest):
    cfg = _cfg(tmp_path / "home", manifest=manifest)
    stored = parse_config(json.loads(_metadata(cfg)["lora_foundry.config"]))
    assert (stored.run_dir, stored.model.path, stored.output.lora_path) == (
        "cat-run", "v1-5-pruned.safetensors", "cat_lora.safetensors")
    assert (stored.data.manifest, stored.data.folder) == (("cats.json", None) if manifest else (None, "cats"))
    assert stored.model.tokenizer_dir is None and stored.train.cache_dir is None  # locations only: dropped
    # what is not a path is kept whole: the run's identity, the training settings, the samples
    assert (stored.output.run_id, stored.lora, stored.train.max_steps, stored.sample) == (
        cfg.output.run_id, cfg.lora, cfg.train.max_steps, cfg.sample)


def test_windows_paths_are_cut_to_their_names_too(tmp_path):
    cfg = _cfg(tmp_path / "home")
    cfg.run_dir = "C:\\Users\\alice\\runs\\cat-run"
    cfg.data.folder = "D:\\pictures\\cats"
    cfg.output.lora_path = "C:\\Users\\alice\\loras\\cat_lora.safetensors"
    metadata = _metadata(cfg, tags={"cats": {}})
    stored = json.loads(metadata["lora_foundry.config"])
    assert (stored["run_dir"], stored["data"]["folder"], stored["output"]["lora_path"]) == (
        "cat-run", "cats", "cat_lora.safetensors")
    assert metadata["modelspec.title"] == "cat_lora"
    assert not any("alice" in v or "pictures" in v for v in metadata.values())


# --- A1111's hashes ------------------------------------------------------------------------------------


def _saved(tmp_path: Path) -> tuple[bytes, dict[str, str], dict[str, torch.Tensor]]:
    tensors = _tensors()
    metadata = _metadata(_cfg(tmp_path / "home"), tensors=tensors)
    path = tmp_path / "cat_lora.safetensors"
    save_lora_file(path, tensors, metadata, overwrite=False)
    return path.read_bytes(), read_lora_file(path)[1], tensors


def test_sshs_model_hash_is_what_a1111_computes_from_the_file(tmp_path):
    data, stored, tensors = _saved(tmp_path)
    # A1111's addnet hash of a .safetensors LoRA: skip the 8-byte header length and the header, hash the rest
    length, header = _header(data)
    assert stored["sshs_model_hash"] == _sha256(data[8 + length :])
    # the same bytes a second way: each tensor's own bytes, in the order of the file's data offsets
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    assert stored["sshs_model_hash"] == _sha256(b"".join(tensors[k].numpy().tobytes() for k in order))
    # the written file holds more than the ss_ keys (modelspec, ours, sshs_ itself): the hash does not care
    assert any(not k.startswith("ss_") for k in header["__metadata__"])


def test_sshs_legacy_hash_is_of_the_copy_with_only_ss_keys(tmp_path):
    """The subtlety: the legacy hash reads 64 KiB at offset 1 MiB of the file, so the header's length shifts it.
    kohya hashes a copy holding only the `ss_` keys, so adding or editing other keys does not change the value;
    the legacy hash of the written file itself (a longer header) is a different one."""
    data, stored, tensors = _saved(tmp_path)
    ss_only = safetensors_bytes(tensors, metadata={k: v for k, v in stored.items() if k.startswith("ss_")})
    assert stored["sshs_legacy_hash"] == _legacy(ss_only)
    assert _header(data)[0] > _header(ss_only)[0] and len(data) > MIB + 0x10000
    assert _legacy(data) != stored["sshs_legacy_hash"]
    # a user's edit of a non-ss key leaves both hashes as they were
    edited = {**stored, "modelspec.title": "renamed", "user.note": "x" * 500}
    assert addnet_hashes(tensors, edited) == {k: stored[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}


def test_base_model_hashes_as_kohya_and_a1111(tmp_path, monkeypatch):
    path = _base_model(tmp_path)
    data = path.read_bytes()
    expected = {"ss_sd_model_hash": _legacy(data), "ss_new_sd_model_hash": _sha256(data)}
    assert base_model_hashes(path) == expected
    monkeypatch.setattr(lora_file, "HASH_CHUNK", 1000)  # read in small chunks: the same hash
    assert base_model_hashes(path) == expected
    # a diffusers folder has no single file a loader or Civitai could match: the keys are left out
    assert base_model_hashes(tmp_path) == {}
    cfg = _cfg(tmp_path / "home")
    cfg.model.path = str(tmp_path)
    metadata = _metadata(cfg, base_hashes=base_model_hashes(cfg.model.path))
    assert not {"ss_sd_model_hash", "ss_new_sd_model_hash"} & set(metadata)
    assert metadata["ss_sd_model_name"] == tmp_path.name
