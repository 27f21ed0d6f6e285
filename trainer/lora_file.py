"""The LoRA file: peft LoRA layers → kohya-format tensors, kohya/modelspec metadata, an atomic write.

The metadata holds kohya's `ss_*` keys and A1111's `sshs_*` hashes as kohya sd-scripts writes them, and no
path of the user's machine: file and folder names only.

The kohya ("sd-scripts") layout is what ComfyUI, A1111/Forge and diffusers' `load_lora_weights` all read:
for each adapted module `lora_<part>_<module path with . → _>` holds `.lora_down.weight` (peft's lora_A),
`.lora_up.weight` (peft's lora_B) and a scalar `.alpha`; the applied delta is up @ down * alpha / rank,
which is exactly peft's B @ A * lora_alpha / r.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PureWindowsPath
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .adapters import adapter_layers, layer_tensors, network_metadata
from .captions import kept_tags
from .config import DataConfig, RunConfig
from .families.base import ModelFamily

ADAPTER = "default"
KOHYA_NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"  # kohya's sai_model_spec BASE_METADATA
HASHED_PREFIX = "ss_"  # kohya hashes the tensors saved with only these keys (see addnet_hashes)
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000  # A1111's old hash: 64 KiB at 1 MiB
HASH_CHUNK = 4 << 20
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- tensors -------------------------------------------------------------------------------------------


def kohya_state_dict(
    parts: Mapping[str, torch.nn.Module],
    family: ModelFamily,
    *,
    alpha: float,
    adapter: str = ADAPTER,
) -> dict[str, torch.Tensor]:
    """The kohya-format tensors (fp32, contiguous, CPU) of the peft LoRA layers of unwrapped models, given by
    their LoRA prefix (`family.kohya_name` names each layer). Raises ValueError when a layer cannot be written
    faithfully."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, model in parts.items():
        _check_init(model, prefix, adapter)
        layers = list(adapter_layers(model, adapter))
        if not layers:
            raise ValueError(f"no LoRA layers (adapter {adapter!r}) found in {prefix}")
        for path, layer in layers:
            name = family.kohya_name(prefix, model, path)
            layer_tensors = _layer_tensors(name, layer, adapter, alpha, family.lora_weight_names)
            if f"{name}.dora_scale" in layer_tensors:
                layer_tensors[f"{name}.dora_scale"] = family.dora_scale_rows(prefix, path,
                                                                             layer_tensors[f"{name}.dora_scale"])
            tensors.update(layer_tensors)
    return tensors


def _check_init(model: torch.nn.Module, part: str, adapter: str) -> None:
    # these inits move part of the base weight into the adapter (W_base -= B0 @ A0 * scaling): A and B alone
    # applied to the original base model are not what was trained
    config = getattr(model, "peft_config", {}).get(adapter)
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"the {part} LoRA was initialized with {init!r}, which changes the base weights; "
            "a kohya LoRA file of it would need the initial A/B too (rank 2r), which is not supported"
        )


def _layer_tensors(
    name: str, layer: Any, adapter: str, alpha: float, weight_names: tuple[str, str] = ("lora_down", "lora_up")
) -> dict[str, torch.Tensor]:
    """`weight_names`: what the family's loaders call the down and up matrices (kohya: lora_down / lora_up,
    diffusers' peft layout: lora_A / lora_B); the alpha is written beside them in either layout."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        _check_layer(name, layer, adapter, alpha)
    return layer_tensors(name, layer, adapter, weight_names)


def _check_layer(name: str, layer: Any, adapter: str, alpha: float) -> None:
    """kohya's format holds LoRA with delta = up @ down * alpha / rank (and DoRA's magnitude), nothing else."""
    from peft.tuners.lora import Conv2d, Linear

    problems = []
    # plain LoRA on a quantized frozen base (torchao int8, bitsandbytes 4/8-bit) is the same A and B
    quantized_bases = ("TorchaoLoraLinear", "Linear4bit", "Linear8bitLt")
    if type(layer) not in (Linear, Conv2d) and type(layer).__name__ not in quantized_bases:
        problems.append(f"layer type {type(layer).__name__} (only Linear and Conv2d are supported)")
    if getattr(layer, "use_rslora", {}).get(adapter, False):
        problems.append("use_rslora (scaling alpha/sqrt(r) is not expressible as alpha/rank)")
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not getattr(layer, "use_dora", {}).get(adapter, False):
        problems.append(f"the LoRA variant {type(variant).__name__} (DoRA is the one written)")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        problems.append("lora_bias")
    if abs(layer.lora_alpha[adapter] - alpha) > 1e-6 * max(1.0, abs(alpha)):
        problems.append(f"lora_alpha {layer.lora_alpha[adapter]} differs from the configured alpha {alpha}")
    if problems:
        raise ValueError(f"{name}: cannot write as a kohya LoRA: " + "; ".join(problems))


# --- metadata ------------------------------------------------------------------------------------------


def count_tags(captions: Iterable[str], dataset_name: str) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency shape, {dataset_name: {tag: occurrences}}; a tag is a stripped, non-empty
    comma-separated part of a caption."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {dataset_name: counts}


def dataset_name(data: DataConfig) -> str:
    """The dataset's name in the metadata (the key of ss_tag_frequency and ss_dataset_dirs): the image folder's
    name, or the manifest's file stem."""
    if data.folder:
        return _name(data.folder)
    return PureWindowsPath(data.manifest).stem if data.manifest else "dataset"


def epochs_spanned(steps: int, batches_per_epoch: int, accumulation: int = 1) -> int:
    """The 1-based epoch that optimizer step number `steps` ends in (0 before the first step): kohya's ss_epoch,
    the number of epochs begun. A step takes `accumulation` batches, an epoch holds `batches_per_epoch`."""
    if batches_per_epoch < 1 or accumulation < 1:
        raise ValueError(f"batches_per_epoch ({batches_per_epoch}) and accumulation ({accumulation}): 1 or more")
    return (steps * accumulation + batches_per_epoch - 1) // batches_per_epoch


def lora_metadata(
    cfg: RunConfig,
    *,
    family: ModelFamily,
    num_train_images: int,
    steps: int,
    tag_frequency: dict[str, dict[str, int]],
    started_at: float,
    finished_at: float,
    epoch: int | None = None,
    max_train_steps: int = 0,
    batches_per_epoch: int = 0,
    bucket_counts: Mapping[tuple[int, int], int] | None = None,
    base_hashes: Mapping[str, str] | None = None,
    prediction_type: str | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, str]:
    """The safetensors metadata of a LoRA file: kohya's `ss_*` keys, A1111's `sshs_*` hashes, modelspec keys and
    the config with every path cut to its last part (see `shareable_config`). No value holds a folder of the
    user's machine.

    - `num_train_images`: images times repeats, as kohya's ss_num_train_images;
    - `tag_frequency`: kohya's nested shape (see `count_tags`);
    - `max_train_steps`: the planned total (0: cfg.train.max_steps, or `steps` when epochs decide);
    - `batches_per_epoch` (global batches): ss_epoch and ss_num_epochs follow from the steps (`epochs_spanned`);
      without it `epoch` is taken as ss_epoch (1-based) and as ss_num_epochs;
    - `bucket_counts`: {(width, height) in pixels: images, repeats not counted} for ss_bucket_info
      (None with bucketing on: the key is left out);
    - `base_hashes`: `base_model_hashes(cfg.model.path)`, computed once per run (None: left out);
    - `prediction_type`: the noise scheduler's, "epsilon" or "v_prediction" (None: cfg.model's, else epsilon);
    - `tensors`: the LoRA tensors as they are saved; with them sshs_model_hash and sshs_legacy_hash are added.
    """
    _check_tag_frequency(tag_frequency)
    planned = max_train_steps or cfg.train.max_steps or steps
    values = {
        **_kohya_network(cfg),
        **_kohya_training(cfg, steps=steps, max_train_steps=planned),
        **_kohya_epochs(cfg, steps=steps, planned=planned, epoch=epoch, batches_per_epoch=batches_per_epoch),
        **_kohya_dataset(
            cfg, num_train_images=num_train_images, tag_frequency=tag_frequency, bucket_counts=bucket_counts
        ),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": _name(cfg.model.path),
        **(base_hashes or {}),
        "ss_output_name": _title(cfg),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        **_modelspec(cfg, family, finished_at, prediction_type),
        "lora_foundry.config": shareable_config(cfg).to_json(),
    }
    metadata = {key: _as_text(value) for key, value in values.items()}
    if tensors is not None:
        metadata |= addnet_hashes(tensors, metadata)
    return metadata


def shareable_config(cfg: RunConfig) -> RunConfig:
    """The run config as the LoRA file keeps it: each path cut to its file or folder name (the tokenizer and
    cache folders, mere locations, dropped), so that sharing the file shares no directory names. It still
    parses as a config (`parse_config`), naming what was used without saying where it was."""
    d = cfg.data
    return dataclasses.replace(
        cfg,
        run_dir=_name(cfg.run_dir),
        model=dataclasses.replace(cfg.model, path=_name(cfg.model.path), tokenizer_dir=None,
                                  text_encoders=[_name(p) for p in cfg.model.text_encoders],
                                  vae=_optional_name(cfg.model.vae)),
        data=dataclasses.replace(d, manifest=_optional_name(d.manifest), folder=_optional_name(d.folder)),
        train=dataclasses.replace(cfg.train, cache_dir=None),
        output=dataclasses.replace(cfg.output, lora_path=_name(cfg.output.lora_path)),
    )


def _name(path: str) -> str:
    # the last part whatever the separator, so a Windows path is cut on a POSIX machine too
    return PureWindowsPath(path).name


def _optional_name(path: str | None) -> str | None:
    return _name(path) if path else path


def _check_tag_frequency(tag_frequency: dict[str, dict[str, int]]) -> None:
    for name, counts in tag_frequency.items():
        if not isinstance(counts, dict):
            raise TypeError(
                f"tag_frequency[{name!r}]: expected {{tag: count}}; the shape is {{dataset: {{tag: count}}}}"
            )


def _kohya_network(cfg: RunConfig) -> dict[str, Any]:
    lo = cfg.lora
    network = network_metadata(lo, KOHYA_NETWORK_MODULE, convolutions=lo.targets == "all" or lo.adapter == "locon")
    if "ss_network_args" in network:
        network["ss_network_args"] = json.dumps(network["ss_network_args"])
    values: dict[str, Any] = {
        **network,
        "ss_network_dim": lo.rank,
        "ss_network_alpha": lo.alpha,
        "ss_network_dropout": lo.dropout,
        "ss_network_train_unet_only": not (lo.train_text_encoder or lo.train_text_encoder_2),
        "ss_network_train_text_encoder_only": False,
    }
    return values


def _kohya_training(cfg: RunConfig, *, steps: int, max_train_steps: int) -> dict[str, Any]:
    t = cfg.train
    trains_text = cfg.lora.train_text_encoder or cfg.lora.train_text_encoder_2
    te_lr = (t.text_encoder_learning_rate or t.learning_rate) if trains_text else None
    return {
        "ss_learning_rate": t.learning_rate,
        "ss_unet_lr": t.learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_lr_warmup_steps": t.lr_warmup_steps,
        "ss_optimizer": _optimizer_name(cfg),
        "ss_batch_size_per_device": t.batch_size,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_mixed_precision": t.mixed_precision,
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_noise_offset": t.noise_offset,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_seed": t.seed,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_clip_skip": None,  # the last CLIP layer is used; kohya writes str(None) when clip skip is unset
        "ss_v2": False,
        "ss_zero_terminal_snr": cfg.model.zero_terminal_snr,
    }


def _kohya_epochs(
    cfg: RunConfig, *, steps: int, planned: int, epoch: int | None, batches_per_epoch: int
) -> dict[str, Any]:
    """ss_epoch: the epochs begun (1-based, kohya's epoch number); ss_num_epochs: the epochs the planned steps
    span, as kohya's num_train_epochs (max_train_steps over steps per epoch), never the configured epoch count,
    which means nothing when max_steps decides."""
    if batches_per_epoch:
        if epoch is not None:
            raise ValueError("give batches_per_epoch or epoch, not both: the epoch follows from the steps")
        accumulation = cfg.train.gradient_accumulation_steps
        return {
            "ss_epoch": epochs_spanned(steps, batches_per_epoch, accumulation),
            "ss_num_epochs": epochs_spanned(planned, batches_per_epoch, accumulation),
            "ss_num_batches_per_epoch": batches_per_epoch,
        }
    if epoch is None:
        raise ValueError("lora_metadata needs batches_per_epoch (or the 1-based epoch)")
    return {"ss_epoch": epoch, "ss_num_epochs": epoch}


def _optimizer_name(cfg: RunConfig) -> str:
    """kohya's ss_optimizer: the class's full name and the arguments it was built with."""
    t = cfg.train
    adam = f"weight_decay={t.weight_decay},betas=({t.adam_beta1}, {t.adam_beta2}),eps={t.adam_epsilon}"
    relative = t.lr_scheduler == "adafactor"
    cls, args = {
        "adamw": ("torch.optim.adamw.AdamW", adam),
        "adamw8bit": ("bitsandbytes.optim.adamw.AdamW8bit", adam),
        "prodigy": ("prodigyopt.prodigy.Prodigy", f"{adam},use_bias_correction=True"),
        "adafactor": ("transformers.optimization.Adafactor",
                      f"weight_decay={t.weight_decay},relative_step={relative},scale_parameter=False,"
                      "warmup_init=False"),
        "adamw_schedulefree": ("schedulefree.adamw_schedulefree.AdamWScheduleFree",
                               f"{adam},warmup_steps={t.lr_warmup_steps}"),
    }[t.optimizer]
    return f"{cls}({args})"


def _kohya_dataset(
    cfg: RunConfig,
    *,
    num_train_images: int,
    tag_frequency: dict[str, dict[str, int]],
    bucket_counts: Mapping[tuple[int, int], int] | None,
) -> dict[str, Any]:
    d = cfg.data
    values = {
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": 0,
        "ss_resolution": str((d.resolution, d.resolution)),
        "ss_enable_bucket": d.bucketing,
        "ss_flip_aug": d.random_flip,
        "ss_random_crop": d.crop == "random",
        "ss_shuffle_caption": d.shuffle_tags,
        "ss_keep_tokens": kept_tags(d),
        "ss_caption_dropout_rate": d.caption_dropout,
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        # kohya's {image dir name: {"n_repeats", "img_count"}}; img_count does not count repeats
        "ss_dataset_dirs": json.dumps(
            {dataset_name(d): {"n_repeats": d.repeats, "img_count": num_train_images // d.repeats}},
            ensure_ascii=False,
        ),
    }
    bucket_info = _bucket_info(cfg, bucket_counts)
    if bucket_info is not None:
        values["ss_bucket_info"] = bucket_info
    return values


def _bucket_info(cfg: RunConfig, bucket_counts: Mapping[tuple[int, int], int] | None) -> str | None:
    """kohya's ss_bucket_info: {"buckets": {index: {"resolution": [w, h], "count": images with repeats}}}, or
    JSON null without bucketing (kohya's bucket_info stays None then). kohya also writes mean_img_ar_error,
    an aspect error the trainer does not measure, so it is left out. None: the buckets are not known."""
    if not cfg.data.bucketing:
        return json.dumps(None)
    if bucket_counts is None:
        return None
    buckets = {
        index: {"resolution": [width, height], "count": count * cfg.data.repeats}
        for index, ((width, height), count) in enumerate(sorted(bucket_counts.items()))
    }
    return json.dumps({"buckets": buckets})


def _modelspec(
    cfg: RunConfig, family: ModelFamily, finished_at: float, prediction_type: str | None
) -> dict[str, Any]:
    resolution = cfg.data.resolution
    # the trainer's target is the noise for "epsilon", the flow velocity (noise - picture) for the
    # flow-matching families, and the DDPM velocity for anything else: modelspec's "v"
    prediction = prediction_type or cfg.model.prediction_type or "epsilon"
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": _title(cfg),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(finished_at, tz=timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": prediction if prediction in ("epsilon", "flow") else "v",
    }


def _title(cfg: RunConfig) -> str:
    return cfg.output.name or PureWindowsPath(cfg.output.lora_path).stem


def _as_text(value: Any) -> str:
    # safetensors metadata values must be strings; kohya writes str(value) (so None → "None")
    return value if isinstance(value, str) else str(value)


# --- hashes --------------------------------------------------------------------------------------------


def addnet_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash as kohya sd-scripts computes them: over the bytes the tensors
    serialize to with only the `ss_*` keys of `metadata`.

    A1111 (extensions-builtin/Lora) takes sshs_model_hash as the LoRA's hash (its first 12 digits go into the
    "Lora hashes" of generation parameters, which Civitai reads) and, when the key is missing, computes the same
    "addnet" hash itself: the sha256 of the file after the 8-byte header length and the header, i.e. of the
    tensor bytes only. That does not depend on the metadata, so it equals the hash of the file as written.
    The legacy hash reads 64 KiB at a fixed offset of the whole file, which moves with the header's length:
    kohya takes it of a copy holding only the training (`ss_`) keys, so other keys (modelspec, ours, a user's
    edits, and `sshs_` itself, which does not start with `ss_`) leave it unchanged. It is not the legacy hash
    of the written file.
    """
    hashed = {key: value for key, value in metadata.items() if key.startswith(HASHED_PREFIX)}
    stream = io.BytesIO(safetensors_bytes(dict(tensors), metadata=hashed))
    return {"sshs_model_hash": addnet_model_hash(stream), "sshs_legacy_hash": legacy_hash(stream)}


def addnet_model_hash(stream: BinaryIO) -> str:
    """The sha256 (64 hex digits) of a safetensors stream's tensor bytes: all after the 8-byte little-endian
    header length and the JSON header."""
    stream.seek(0)
    header_length = int.from_bytes(stream.read(8), "little")
    stream.seek(8 + header_length)
    return _sha256(stream)


def legacy_hash(stream: BinaryIO) -> str:
    """A1111's old model hash (8 hex digits): the sha256 of the 64 KiB at offset 1 MiB; of nothing when the
    stream is shorter, as A1111 and kohya compute it too."""
    stream.seek(LEGACY_HASH_OFFSET)
    return hashlib.sha256(stream.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


def base_model_hashes(path: str | Path) -> dict[str, str]:
    """kohya's hashes of the base model file, as A1111 and Civitai identify a checkpoint: ss_sd_model_hash
    (A1111's legacy hash) and ss_new_sd_model_hash (the sha256 of the whole file). Reads the whole file in
    chunks, seconds for a few GB: compute it once per run.

    A diffusers folder gives {}: there is no single file whose hash a loader or Civitai could match (kohya
    writes "IsADirectory" there), so the keys are left out rather than filled with a hash of our own making.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        legacy = legacy_hash(f)
        f.seek(0)
        full = _sha256(f)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": full}


def _sha256(stream: BinaryIO) -> str:
    """The sha256 of the rest of the stream, read in chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


# --- the file ------------------------------------------------------------------------------------------


def save_lora_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, overwrite: bool
) -> None:
    """Write the LoRA atomically: a hidden temp file in the same folder, fsynced, renamed into place.

    An existing file is left untouched when anything fails; with `overwrite=False` it raises
    FileExistsError before writing anything.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (set output.overwrite to replace it)")
    data = safetensors_bytes(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    # hidden and not ".safetensors": ComfyUI's loras list never shows a half-written file
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_synced(temp, data)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.filename is None and exc.errno is not None:  # a failed write names no file: name the user's LoRA
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    # makes the rename itself durable; best effort: the file is already complete and in place, and
    # Windows (and some network file systems) cannot fsync a directory
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the metadata of a LoRA file."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata() or {}
    return tensors, metadata
