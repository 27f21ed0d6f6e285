"""Reading weight files without loading them: a safetensors file's header, and the dtype its tensors are in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PathLike = str | Path
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")


def weight_files(root: Path, subfolders: tuple[str, ...]) -> list[str]:
    """The weight files of some components of a diffusers folder, sorted per subfolder."""
    files = []
    for sub in subfolders:
        files += sorted(str(p) for p in (root / sub).iterdir() if p.suffix in WEIGHT_FILE_SUFFIXES)
    return files


def safetensors_header(path: PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, tensor name -> {dtype, shape, data_offsets}) of a .safetensors file.

    Reads only the header: 8 bytes of length, then that much JSON. Raises ValueError for anything else.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        size = int.from_bytes(prefix, "little")
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file")
    header.pop("__metadata__", None)
    return 8 + size, header


def stored_float_dtype(path: PathLike) -> str | None:
    """The one floating-point dtype ("F16", "BF16", "F32", ...) every float tensor of a .safetensors file is
    stored in; None for a mixed or unreadable file."""
    try:
        _, header = safetensors_header(path)
    except (OSError, ValueError):
        return None
    dtypes = {info["dtype"] for info in header.values() if info["dtype"].startswith(("F", "BF"))}
    return dtypes.pop() if len(dtypes) == 1 else None
