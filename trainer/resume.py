"""Training state on disk, without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder RUN_DIR/checkpoints/step-NNNNNNNN holds the LoRA in kohya form (usable as it is), the
adapter weights, the optimizer state, the LR scheduler and loss-scaler state and the step. It appears
under its final name only once complete (written beside it, then renamed), so a kill mid-save leaves the
previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

KEEP = 3
_PREFIX = "step-"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(_PREFIX) :])


def newest_checkpoint(run_dir: str | Path, at_most: int | None = None) -> Path | None:
    """The complete checkpoint with the highest step (not above `at_most` when given), or None."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    if at_most is not None:
        done = [p for p in done if checkpoint_step(p) <= at_most]
    return max(done, key=checkpoint_step, default=None)


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(index)][name] = value
    return tensors, plain


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    scaler: dict[str, Any] | None,
    write_lora: Any,
) -> Path:
    """Write a complete checkpoint; `write_lora(path)` writes the kohya LoRA file into it."""
    root = checkpoint_root(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    staging = root / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        adapter_tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.items()}
        write_file(staging / "adapter.safetensors", safetensors_bytes(adapter_tensors))
        opt_tensors, opt_plain = optimizer_to_files(optimizer)
        write_file(staging / "optimizer.safetensors", safetensors_bytes(opt_tensors))
        write_lora(staging / "lora.safetensors")
        state = {"step": step, "optimizer": opt_plain, "scheduler": scheduler, "scaler": scaler}
        write_file(staging / "state.json", json.dumps(state, default=_jsonable).encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed save leaves no half-written folder behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _prune(root)
    return final


def write_file(path: Path, data: bytes) -> None:
    """Written by Python rather than safetensors' own writer: a full disk is an OSError naming the file, which
    the trainer reports as the disk being full (run.failure_message), not a SafetensorError."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


# checkpoints of SD 1.5 runs written before the parts were named by their LoRA prefix
_LEGACY_PART_NAMES = {"unet.": "lora_unet.", "text_encoder.": "lora_te."}


def _current_names(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in adapter.items():
        old = next((prefix for prefix in _LEGACY_PART_NAMES if key.startswith(prefix)), None)
        renamed[_LEGACY_PART_NAMES[old] + key[len(old):] if old else key] = value
    return renamed


def load_checkpoint(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / "state.json").read_text())
    return {
        "step": state["step"],
        "adapter": _current_names(load_file(folder / "adapter.safetensors")),
        "optimizer": optimizer_from_files(load_file(folder / "optimizer.safetensors"), state["optimizer"]),
        "scheduler": state["scheduler"],
        "scaler": state["scaler"],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return None  # callables (schedule lambdas) are rebuilt from the config, not stored


def _prune(root: Path) -> None:
    done = sorted(
        (p for p in root.iterdir() if p.name.startswith(_PREFIX)), key=checkpoint_step
    )
    for old in done[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
