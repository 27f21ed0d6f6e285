"""Checks that fail a run before it costs anything: where the files go, the disk space they take, and the
processes the machine can hold. Each returns messages (empty: fine); `require` raises them all at once.

The node runs the output and process checks before it writes or launches anything; the trainer runs them again
(a run started by hand gets the same messages), then the disk check once the base model's layers are known
(the adapter's size comes from them) and before the first picture is encoded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .names import output_stem_problem
from .resume import KEEP as CHECKPOINTS_KEPT

MB = 1024 * 1024
# optimizer state tensors kept per trained parameter (fp32 each; 8-bit AdamW keeps two 1-byte states)
OPTIMIZER_STATES = {"adamw": 2.0, "adamw8bit": 0.5, "prodigy": 4.0, "adafactor": 1.0, "adamw_schedulefree": 2.0}
HEADROOM = 1.1  # metadata, file system blocks, and an estimate's error
HEADROOM_BYTES = 16 * MB


class PreflightError(ValueError):
    """Every reason the run cannot start, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def require(problems: list[str]) -> None:
    if problems:
        raise PreflightError(problems)


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists (what a run would create its folders in)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def writable_problem(folder: Path, what: str) -> str | None:
    """Can a file be created in `folder` (or, while it does not exist yet, in the folder it would be made in)?
    Tried with a real file, removed at once: permissions, read-only drives and ACLs all answer the same way."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{what} {folder}: {existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".lora-foundry-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        return f"{what} {folder} cannot be written ({exc.strerror or exc}): choose a folder you can write to"
    return None


# Windows' MAX_PATH: a longer path fails unless long paths are enabled in the registry, which Python cannot ask
WINDOWS_MAX_PATH = 259
# the longest file the run writes beside the LoRA: its temp file, ".{name}.{8 hex}.tmp" (trainer/lora_file.py)
TEMP_NAME_EXTRA = len("..12345678.tmp")


def output_problems(lora_path: Path, run_dir: Path, windows: bool = os.name == "nt") -> list[str]:
    """The LoRA's name can be stored on every OS, its folder and the run folder can be written, and (on
    Windows) the temp file's whole path is within MAX_PATH."""
    problems = []
    name = output_stem_problem(lora_path.stem)
    if name:
        problems.append(f"output name {lora_path.stem!r}: {name}")
    for folder, what in ((lora_path.parent, "the LoRA's folder"), (run_dir, "the run folder")):
        problem = writable_problem(folder, what)
        if problem:
            problems.append(problem)
    longest = len(str(Path(lora_path).absolute())) + TEMP_NAME_EXTRA
    if windows and longest > WINDOWS_MAX_PATH:
        problems.append(f"the LoRA's path would be {longest} characters with its temp file, over Windows' "
                        f"{WINDOWS_MAX_PATH}: choose a shorter output name ({lora_path.stem!r}), or move ComfyUI "
                        "to a shorter folder")
    return problems


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_device(requested: str, has_cuda: bool, has_mps: bool) -> str:
    """'auto' → cuda, then mps (Apple silicon), then cpu; an explicit choice the machine lacks is an error."""
    if requested == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    if requested == "cuda" and not has_cuda:
        raise PreflightError(["train.device is 'cuda' but no CUDA device is visible to the trainer"])
    if requested == "mps" and not has_mps:
        raise PreflightError(["train.device is 'mps' but this machine has no Apple-silicon GPU (torch.backends.mps)"])
    return requested


def process_problems(processes: int, device: str, gpus: int) -> list[str]:
    """Too many processes for one machine: one per GPU on CUDA; on the CPU at most one per core (each process
    needs its own copy of the model, so memory usually ends it sooner); Apple silicon has one GPU."""
    if device == "cuda":
        limit, what = gpus, f"{gpus} CUDA GPU(s) visible"
    elif device == "mps":
        limit, what = 1, "one Apple-silicon GPU"
    else:
        limit, what = usable_cores(), f"{usable_cores()} CPU core(s)"
    if processes > limit:
        return [f"{processes} training processes asked for, but this machine has {what}: at most {limit} "
                "(each process holds a whole copy of the model)"]
    return []


def machine_devices() -> tuple[int, bool]:
    """(the CUDA GPUs torch sees, whether Apple silicon's mps is there): what the device checks are given."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.device_count(), bool(mps and mps.is_available())


def launch_problems(processes: int, requested_device: str, gpu_ids: str | None, cuda_gpus: int,
                    has_mps: bool) -> list[str]:
    """What the node checks before it launches: the device exists, the chosen GPUs exist, and the machine
    holds that many processes. `gpu_ids`: the CUDA_VISIBLE_DEVICES value ("0,2"), or None for all."""
    try:
        device = choose_device(requested_device, cuda_gpus > 0, has_mps)
    except PreflightError as error:
        return error.problems
    visible = cuda_gpus
    if gpu_ids is not None:
        ids = [int(i) for i in gpu_ids.split(",")]
        missing = [i for i in ids if i >= cuda_gpus]
        if missing:
            have = f"GPUs 0-{cuda_gpus - 1}" if cuda_gpus else "no CUDA GPU"
            return [f"gpu_ids {gpu_ids}: no GPU {', '.join(map(str, missing))} here (this machine has {have}); "
                    "training would not go where you asked"]
        visible = len(ids)
    return process_problems(processes, device, visible)


def human_size(size: float) -> str:
    return f"{size / MB:.0f} MB" if size < 1024 * MB else f"{size / (1024 * MB):.1f} GB"


def run_bytes(adapter_parameters: int, optimizer: str, checkpoints: int) -> tuple[int, int]:
    """(the LoRA file, the run folder's checkpoints at their peak) in bytes.

    Everything trained is written in fp32. A checkpoint holds the adapter, the optimizer state and a LoRA file;
    up to `resume.KEEP` are kept, and a new one is complete before the oldest goes."""
    lora = 4 * adapter_parameters
    checkpoint = lora + 4 * adapter_parameters * OPTIMIZER_STATES[optimizer] + lora
    return int(lora * HEADROOM) + HEADROOM_BYTES, int(checkpoint * checkpoints * HEADROOM) + HEADROOM_BYTES


def checkpoints_at_peak(save_every_steps: int) -> int:
    """The checkpoint folders on disk at once: the final one alone, or with periodic saves KEEP and the one
    being written (the oldest goes once the new one is complete)."""
    return CHECKPOINTS_KEPT + 1 if save_every_steps else 1


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(nearest_existing(folder)).free


def disk_problems(needs: dict[Path, tuple[int, str]]) -> list[str]:
    """`needs`: folder -> (bytes, what they are). Folders on one drive add up."""
    by_drive: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, (size, what) in needs.items():
        by_drive.setdefault(nearest_existing(folder).stat().st_dev, []).append((folder, size, what))
    problems = []
    for entries in by_drive.values():
        needed = sum(size for _, size, _ in entries)
        free = free_bytes(entries[0][0])
        if needed > free:
            parts = "; ".join(f"{what} in {folder}: about {human_size(size)}" for folder, size, what in entries)
            problems.append(f"not enough free disk space: the run writes {parts}, {human_size(needed)} in all, "
                            f"and {human_size(free)} are free there. Free some space, or save fewer checkpoints")
    return problems
