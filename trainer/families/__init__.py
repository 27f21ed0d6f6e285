"""Model families. `get_family(name)` returns the family object for a config's `model.family`."""

from __future__ import annotations

from .base import Components, ModelFamily


def get_family(name: str) -> ModelFamily:
    if name == "sd15":
        from .sd15 import SD15

        return SD15
    raise ValueError(f"unknown model family {name!r}")


__all__ = ["Components", "ModelFamily", "get_family"]
