"""Tokenizer files, found offline: every CLIP-based family tokenizes with the same BPE files, and ComfyUI ships
T5's and Qwen's beside them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .detect import is_diffusers_folder

PACK_ROOT = Path(__file__).absolute().parents[2]


def tokenizer_search_path(model: ModelConfig) -> list[Path]:
    """Where the CLIP tokenizer files are looked for, first match wins.

    1. `model.tokenizer_dir` from the config;
    2. a diffusers base model's own `tokenizer/` folder;
    3. `$LORA_FOUNDRY_TOKENIZER_DIR`;
    4. ComfyUI's copy, `comfy/sd1_tokenizer`: of `$COMFYUI_DIR`, of the ComfyUI this pack sits in
       (`ComfyUI/custom_nodes/<pack>/`), and of the one `scripts/setup.sh` installs (`.runtime/ComfyUI`).
    """
    candidates = []
    if model.tokenizer_dir:
        candidates.append(Path(model.tokenizer_dir))
    if is_diffusers_folder(model.path):
        candidates.append(Path(model.path) / "tokenizer")
    if os.environ.get("LORA_FOUNDRY_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["LORA_FOUNDRY_TOKENIZER_DIR"]))
    comfy_roots = [Path(os.environ["COMFYUI_DIR"])] if os.environ.get("COMFYUI_DIR") else []
    comfy_roots += [PACK_ROOT.parent.parent, PACK_ROOT / ".runtime" / "ComfyUI"]
    candidates += [root / "comfy" / "sd1_tokenizer" for root in comfy_roots]
    return candidates


def text_encoder_tokenizer_search_path(model: ModelConfig, comfy_name: str, diffusers_name: str) -> list[Path]:
    """Where the tokenizer of another text encoder (T5, Qwen) is looked for: a diffusers base model's own
    subfolder, then ComfyUI's copy, `comfy/text_encoders/<comfy_name>`, beside the CLIP tokenizer folder of the
    config and in the ComfyUI roots the CLIP files are looked for in."""
    candidates = []
    if is_diffusers_folder(model.path):
        candidates.append(Path(model.path) / diffusers_name)
    if model.tokenizer_dir:
        candidates.append(Path(model.tokenizer_dir).parent / "text_encoders" / comfy_name)
    candidates += [folder.parent / "text_encoders" / comfy_name for folder in tokenizer_search_path(model)
                   if folder.name == "sd1_tokenizer"]
    return candidates


def _find_text_encoder_tokenizer(model: ModelConfig, comfy_name: str, diffusers_name: str, markers: tuple[str, ...],
                                 what: str) -> Path:
    candidates = text_encoder_tokenizer_search_path(model, comfy_name, diffusers_name)
    for folder in candidates:
        if any((folder / marker).is_file() for marker in markers):
            return folder
    looked = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(f"{what} tokenizer files ({markers[0]}) not found; ComfyUI has them in "
                            f"comfy/text_encoders/{comfy_name}. Looked in:\n{looked}")


def find_t5_tokenizer_dir(model: ModelConfig) -> Path:
    return _find_text_encoder_tokenizer(model, "t5_tokenizer", "tokenizer_2", ("tokenizer.json", "spiece.model"), "T5")


def find_qwen_tokenizer_dir(model: ModelConfig) -> Path:
    """Qwen's BPE files: Qwen3 reads the same vocabulary as the Qwen2.5 tokenizer ComfyUI ships."""
    return _find_text_encoder_tokenizer(model, "qwen25_tokenizer", "tokenizer", ("vocab.json",), "Qwen")


def find_tokenizer_dir(model: ModelConfig) -> Path:
    candidates = tokenizer_search_path(model)
    for folder in candidates:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    looked = "\n".join(f"  {c}" for c in candidates)
    raise FileNotFoundError(
        "CLIP tokenizer files (vocab.json, merges.txt) not found. Set model.tokenizer_dir or "
        f"LORA_FOUNDRY_TOKENIZER_DIR to a folder holding them (ComfyUI has one: comfy/sd1_tokenizer). "
        f"Looked in:\n{looked}"
    )


def clip_tokenizer(folder: Path, max_tokens: int, pad_token: str | None = None) -> Any:
    """A CLIP tokenizer from `folder` that pads/truncates to `max_tokens`; `pad_token` replaces the padding
    token (SDXL's second encoder pads with "!", id 0, where the first pads with the end token)."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token is not None else {}
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    tokenizer.model_max_length = max_tokens  # diffusers pipelines pad prompts to this
    return tokenizer


def tokenize(tokenizer: Any, captions: list[str], max_tokens: int) -> Any:
    return tokenizer(captions, max_length=max_tokens, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids
