"""Optional features of ComfyUI's V3 node API, detected once, so the schemas use them where the running ComfyUI
has them and stay valid where it does not (0.3.75's classes raise TypeError on keywords they do not know)."""

from __future__ import annotations

import dataclasses
import inspect

from comfy_api.latest import io


def _takes_keyword(function: object, name: str) -> bool:
    return name in inspect.signature(function).parameters


HAS_ADVANCED_INPUTS = _takes_keyword(io.Int.Input.__init__, "advanced")
HAS_SEARCH_ALIASES = "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}


def advanced() -> dict[str, bool]:
    """Keywords of an input that the node shows only when its advanced inputs are opened."""
    return {"advanced": True} if HAS_ADVANCED_INPUTS else {}


def search_aliases(*aliases: str) -> dict[str, list[str]]:
    """Keywords of a schema that the node search box also finds the node by."""
    return {"search_aliases": list(aliases)} if HAS_SEARCH_ALIASES else {}
