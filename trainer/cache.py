"""Content-keyed cache of VAE latents and text embeddings, in memory and on disk (safetensors).

A latent entry's key covers the base model's VAE/text-encoder bytes, the image bytes and every transform
setting that shapes the pixels, so a re-run with the same inputs skips encoding and any change re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file

from .weights import safetensors_header

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tensors(path: str | Path, prefixes: tuple[str, ...]) -> str | None:
    """sha256 of the tensors of a .safetensors file whose names start with one of `prefixes`: each one's
    name, dtype and shape, then its bytes, in file order. None when the file is not safetensors or holds no
    such tensor. For a single-file checkpoint this covers the VAE and text encoder, a fifth of the file."""
    try:
        start, header = safetensors_header(path)
    except (OSError, ValueError):
        return None
    chosen = sorted((info["data_offsets"], name, info) for name, info in header.items() if name.startswith(prefixes))
    if not chosen:
        return None
    digest = hashlib.sha256(b"lora-foundry/tensors-v1")
    with open(path, "rb") as f:
        for (begin, end), name, info in chosen:
            digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
            f.seek(start + begin)
            _hash_range(f, end - begin, digest)
    return digest.hexdigest()


def _hash_range(f: BinaryIO, size: int, digest: Any) -> None:
    while size > 0:
        chunk = f.read(min(_CHUNK, size))
        if not chunk:
            raise ValueError(f"{f.name}: ends inside a tensor")
        digest.update(chunk)
        size -= len(chunk)


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FileHashes:
    """sha256 of files (or of some of their tensors), remembered by (path, size, mtime[, prefixes]) so a
    multi-GB checkpoint is hashed once."""

    def __init__(self, index_path: Path):
        self.index_path = index_path
        try:
            self._known: dict[str, str] = json.loads(index_path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def digest(self, path: str | Path, prefixes: tuple[str, ...] = ()) -> str:
        """sha256 of the file, or with `prefixes` of just those tensors of a .safetensors file (see
        sha256_tensors; the whole file when it is not one)."""
        stat = os.stat(path)
        key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if prefixes:
            key += "|" + ",".join(prefixes)
        if key not in self._known:
            self._known[key] = (sha256_tensors(path, prefixes) if prefixes else None) or sha256_file(path)
            self._save()
        return self._known[key]

    def _save(self) -> None:
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._known))
        os.replace(tmp, self.index_path)


class TensorCache:
    """dict of tensors per key: memory first, then RUN/cache/<kind>/<key>.safetensors."""

    def __init__(self, root: Path, kind: str):
        self.folder = root / kind
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a torn or foreign file: treat as a miss and re-encode
            return None
        self._memory[key] = tensors
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor], persist: bool = True) -> None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        self._memory[key] = tensors
        if persist:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            save_file(tensors, tmp)
            os.replace(tmp, self._path(key))
