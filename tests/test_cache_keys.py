"""The cache key of a single-file checkpoint covers its VAE and text encoder bytes, not the UNet's."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from trainer.cache import FileHashes, sha256_tensors
from trainer.weights import safetensors_header, stored_float_dtype

PREFIXES = ("first_stage_model.", "cond_stage_model.")


def checkpoint(path, unet: float = 0.0, vae: float = 0.0, dtype: torch.dtype = torch.float16):
    tensors = {
        "model.diffusion_model.conv_in.weight": torch.full((4, 4), unet, dtype=dtype),
        "first_stage_model.encoder.conv_in.weight": torch.full((3, 2), vae, dtype=dtype),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.ones(5, 2, dtype=dtype),
        "model.diffusion_model.step": torch.tensor([1], dtype=torch.int64),
    }
    save_file(tensors, str(path))
    return path


def test_only_the_encoders_bytes_count(tmp_path) -> None:
    base = sha256_tensors(checkpoint(tmp_path / "a.safetensors"), PREFIXES)
    other_unet = sha256_tensors(checkpoint(tmp_path / "b.safetensors", unet=1.0), PREFIXES)
    other_vae = sha256_tensors(checkpoint(tmp_path / "c.safetensors", vae=1.0), PREFIXES)
    assert base == other_unet
    assert base != other_vae


def test_no_matching_tensors_or_not_safetensors_gives_none(tmp_path) -> None:
    assert sha256_tensors(checkpoint(tmp_path / "a.safetensors"), ("nothing.",)) is None
    (tmp_path / "x.ckpt").write_bytes(b"not safetensors at all")
    assert sha256_tensors(tmp_path / "x.ckpt", PREFIXES) is None


def test_file_hashes_fall_back_to_the_whole_file(tmp_path) -> None:
    (tmp_path / "x.ckpt").write_bytes(b"not safetensors at all")
    hashes = FileHashes(tmp_path / "index.json")
    whole = hashes.digest(tmp_path / "x.ckpt")
    assert hashes.digest(tmp_path / "x.ckpt", PREFIXES) == whole
    path = checkpoint(tmp_path / "a.safetensors")
    assert hashes.digest(path, PREFIXES) != hashes.digest(path)  # two entries, remembered apart
    assert FileHashes(tmp_path / "index.json").digest(path, PREFIXES) == sha256_tensors(path, PREFIXES)


def test_header_and_stored_dtype(tmp_path) -> None:
    start, header = safetensors_header(checkpoint(tmp_path / "a.safetensors"))
    assert start > 8 and "first_stage_model.encoder.conv_in.weight" in header and "__metadata__" not in header
    assert stored_float_dtype(tmp_path / "a.safetensors") == "F16"
    assert stored_float_dtype(checkpoint(tmp_path / "b.safetensors", dtype=torch.float32)) == "F32"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / "mixed.safetensors"))
    assert stored_float_dtype(tmp_path / "mixed.safetensors") is None
