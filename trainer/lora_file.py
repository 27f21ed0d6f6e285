"""The LoRA file: peft LoRA layers → kohya-format tensors, kohya/modelspec metadata, an atomic write.

The kohya ("sd-scripts") layout is what ComfyUI, A1111/Forge and diffusers' `load_lora_weights` all read:
for each adapted module `lora_<part>_<module path with . → _>` holds `.lora_down.weight` (peft's lora_A),
`.lora_up.weight` (peft's lora_B) and a scalar `.alpha`; the applied delta is up @ down * alpha / rank,
which is exactly peft's B @ A * lora_alpha / r.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .config import RunConfig
from .families.base import ModelFamily

ADAPTER = "default"
KOHYA_NETWORK_MODULE = "networks.lora"
# kohya's sai_model_spec writes "diffusers" as the implementation of SD v1/v2 LoRAs
MODELSPEC_IMPLEMENTATION = "diffusers"
MODELSPEC_VERSION = "1.0.0"
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- tensors -------------------------------------------------------------------------------------------


def kohya_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    alpha: float,
    prefixes: dict[str, str],
    adapter: str = ADAPTER,
) -> dict[str, torch.Tensor]:
    """The kohya-format tensors (fp32, contiguous, CPU) of the peft LoRA layers of an unwrapped UNet and,
    when given, text encoder. Raises ValueError when a layer cannot be written faithfully."""
    tensors: dict[str, torch.Tensor] = {}
    parts = [("unet", unet, _unet_path)]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, _text_encoder_path))
    for part, model, kohya_path in parts:
        _check_init(model, part, adapter)
        layers = list(_lora_layers(model, adapter))
        if not layers:
            raise ValueError(f"no LoRA layers (adapter {adapter!r}) found in the {part}")
        for path, layer in layers:
            name = f"{prefixes[part]}_{kohya_path(path).replace('.', '_')}"
            tensors.update(_layer_tensors(name, layer, adapter, alpha))
    return tensors


def _unet_path(path: str) -> str:
    return path


def _text_encoder_path(path: str) -> str:
    # transformers 5 flattened CLIPTextModel (its modules are `encoder.layers...`, no `text_model.`);
    # kohya names keep the original checkpoint layout `text_model.encoder.layers...`.
    return path if path.startswith("text_model.") else f"text_model.{path}"


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


def _lora_layers(model: torch.nn.Module, adapter: str) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield path, module


def _layer_tensors(name: str, layer: Any, adapter: str, alpha: float) -> dict[str, torch.Tensor]:
    _check_layer(name, layer, adapter, alpha)
    down = layer.lora_A[adapter].weight
    up = layer.lora_B[adapter].weight
    return {
        f"{name}.lora_down.weight": _export(down),
        f"{name}.lora_up.weight": _export(up),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def _check_layer(name: str, layer: Any, adapter: str, alpha: float) -> None:
    """kohya's format holds plain LoRA with delta = up @ down * alpha / rank, nothing else."""
    from peft.tuners.lora import Conv2d, Linear

    problems = []
    if type(layer) not in (Linear, Conv2d):
        problems.append(f"layer type {type(layer).__name__} (only Linear and Conv2d are supported)")
    if getattr(layer, "use_rslora", {}).get(adapter, False):
        problems.append("use_rslora (scaling alpha/sqrt(r) is not expressible as alpha/rank)")
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        problems.append("a LoRA variant such as DoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        problems.append("lora_bias")
    if abs(layer.lora_alpha[adapter] - alpha) > 1e-6 * max(1.0, abs(alpha)):
        problems.append(f"lora_alpha {layer.lora_alpha[adapter]} differs from the configured alpha {alpha}")
    if problems:
        raise ValueError(f"{name}: cannot write as a kohya LoRA: " + "; ".join(problems))


def _export(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


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


def lora_metadata(
    cfg: RunConfig,
    *,
    family: ModelFamily,
    num_train_images: int,
    steps: int,
    epoch: int,
    tag_frequency: dict[str, dict[str, int]],
    started_at: float,
    finished_at: float,
    max_train_steps: int = 0,
) -> dict[str, str]:
    """The safetensors metadata of a LoRA file: kohya's `ss_*` keys, modelspec keys and the full config.

    `tag_frequency` is kohya's nested shape (see `count_tags`); `max_train_steps` is the planned total
    (0: cfg.train.max_steps, or `steps` when epochs decide).
    """
    _check_tag_frequency(tag_frequency)
    values = {
        **_kohya_network(cfg),
        **_kohya_training(cfg, steps=steps, max_train_steps=max_train_steps or cfg.train.max_steps or steps),
        **_kohya_dataset(cfg, num_train_images=num_train_images, tag_frequency=tag_frequency),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": Path(cfg.model.path).name,
        "ss_output_name": _title(cfg),
        "ss_epoch": epoch,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        **_modelspec(cfg, family, finished_at),
        "lora_foundry.config": cfg.to_json(),
    }
    return {key: _as_text(value) for key, value in values.items()}


def _check_tag_frequency(tag_frequency: dict[str, dict[str, int]]) -> None:
    for name, counts in tag_frequency.items():
        if not isinstance(counts, dict):
            raise TypeError(
                f"tag_frequency[{name!r}]: expected {{tag: count}}; the shape is {{dataset: {{tag: count}}}}"
            )


def _kohya_network(cfg: RunConfig) -> dict[str, Any]:
    lo = cfg.lora
    values: dict[str, Any] = {
        "ss_network_module": KOHYA_NETWORK_MODULE,
        "ss_network_dim": lo.rank,
        "ss_network_alpha": lo.alpha,
        "ss_network_dropout": lo.dropout,
        "ss_network_train_unet_only": not lo.train_text_encoder,
        "ss_network_train_text_encoder_only": False,
    }
    if lo.targets == "all":
        # kohya's LoCon switch: network_args conv_dim/conv_alpha, values as strings as its CLI parses them
        values["ss_network_args"] = json.dumps({"conv_dim": str(lo.rank), "conv_alpha": str(lo.alpha)})
    return values


def _kohya_training(cfg: RunConfig, *, steps: int, max_train_steps: int) -> dict[str, Any]:
    t = cfg.train
    te_lr = (t.text_encoder_learning_rate or t.learning_rate) if cfg.lora.train_text_encoder else None
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
        "ss_num_epochs": t.epochs,
        "ss_v2": False,
    }


def _optimizer_name(cfg: RunConfig) -> str:
    t = cfg.train
    cls = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit"}[t.optimizer]
    args = f"weight_decay={t.weight_decay},betas=({t.adam_beta1}, {t.adam_beta2}),eps={t.adam_epsilon}"
    return f"{cls}({args})"


def _kohya_dataset(
    cfg: RunConfig, *, num_train_images: int, tag_frequency: dict[str, dict[str, int]]
) -> dict[str, Any]:
    d = cfg.data
    return {
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": 0,
        "ss_resolution": str((d.resolution, d.resolution)),
        "ss_enable_bucket": d.bucketing,
        "ss_flip_aug": d.random_flip,
        "ss_random_crop": d.crop == "random",
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
    }


def _modelspec(cfg: RunConfig, family: ModelFamily, finished_at: float) -> dict[str, Any]:
    resolution = cfg.data.resolution
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": _title(cfg),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(finished_at, tz=timezone.utc).isoformat(timespec="seconds"),
    }


def _title(cfg: RunConfig) -> str:
    return cfg.output.name or Path(cfg.output.lora_path).stem


def _as_text(value: Any) -> str:
    # safetensors metadata values must be strings; kohya writes str(value) (so None → "None")
    return value if isinstance(value, str) else str(value)


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
