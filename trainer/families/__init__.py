"""Model families. `family_for(model)` returns the family that trains a config's base model: the one its
`model.family` names, or, for "auto", the one detected from the weights (detect.py)."""

from __future__ import annotations

from ..config import ModelConfig
from .base import DENOISER, Components, ModelFamily, Objective
from .detect import FAMILY_LABELS, TRAINED_NAMES, UnsupportedModelError, detect_family, require_family


def get_family(name: str) -> ModelFamily:
    if name == "sd15":
        from .sd15 import SD15

        return SD15
    if name == "sdxl":
        from .sdxl import SDXL

        return SDXL
    if name == "flux":
        from .flux import FLUX

        return FLUX
    if name == "zimage":
        from .zimage import ZIMAGE

        return ZIMAGE
    raise ValueError(f"unknown model family {name!r}")


def family_resolutions() -> str:
    """Each family's own training resolution, for the nodes' tooltips: "SD 1.5: 512, SDXL: 1024"."""
    return ", ".join(f"{FAMILY_LABELS[name]}: {get_family(name).default_resolution}" for name in FAMILY_LABELS)


def family_for(model: ModelConfig) -> ModelFamily:
    """The family of the base model; UnsupportedModelError when no family trains it, or when the file is of
    another family than the config names."""
    if model.family == "auto":
        return get_family(detect_family(model.path)).for_model(model)
    require_family(model.path, model.family)
    return get_family(model.family).for_model(model)


__all__ = [
    "DENOISER", "FAMILY_LABELS", "TRAINED_NAMES", "Components", "ModelFamily", "Objective", "UnsupportedModelError",
    "detect_family", "family_for", "family_resolutions", "get_family",
]
