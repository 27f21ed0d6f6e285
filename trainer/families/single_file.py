"""Single-file checkpoints (what ComfyUI's models/checkpoints holds) through a diffusers pipeline's
`from_single_file`, offline, with the config folder a family ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..weights import stored_float_dtype

STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def load_pipeline(pipeline_class: Any, path: str, config_dir: Path, dtype: torch.dtype, **components: Any) -> Any:
    """The pipeline's models in `dtype`; `components` are passed through (tokenizers, None for parts left out).

    A file stored in 16 bits that is wanted in fp32 is read in its own dtype, without a memory map, and upcast
    one tensor at a time: the same values (the cast is exact), but the peak resident memory is about the fp32
    models instead of the fp32 models plus the mapped file (6.8 -> 4.9 GiB for SD 1.5 in fp16)."""
    stored = STORED_DTYPES.get(stored_float_dtype(path) or "")
    upcast = dtype == torch.float32 and stored is not None
    pipe = pipeline_class.from_single_file(
        path,
        config=str(config_dir),
        local_files_only=True,
        torch_dtype=stored if upcast else dtype,
        disable_mmap=upcast,
        **components,
    )
    for module in pipe.components.values() if upcast else ():
        if isinstance(module, torch.nn.Module):
            module.to(dtype)  # parameter by parameter: each 16-bit copy is freed as its fp32 one appears
    return pipe
