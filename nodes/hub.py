"""A datasets hub id, resolved from the local Hugging Face cache only, exported as image files + captions."""

from __future__ import annotations

import re
from pathlib import Path

from ..trainer.data import CAPTION_COLUMNS, Item

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def cached_snapshot(hub_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not _HUB_ID.match(hub_id):
        raise ValueError(f"hub_dataset {hub_id!r}: give a dataset id like owner/name")
    try:
        return Path(snapshot_download(hub_id, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"dataset {hub_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            "nothing is downloaded here: fetch it on a machine with access, then copy that cache folder"
        ) from None


def pick_columns(features: dict) -> tuple[str, str]:
    """The image column by type, the caption column by name (or the only text column)."""
    from datasets import Image as ImageFeature
    from datasets import Value

    images = [name for name, feature in features.items() if isinstance(feature, ImageFeature)]
    texts = [name for name, f in features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    if len(images) != 1:
        raise ValueError(f"dataset has {len(images)} image columns ({', '.join(images) or 'none'}); need exactly one")
    named = [name for name in texts if name.lower() in CAPTION_COLUMNS]
    if named:
        return images[0], named[0]
    if len(texts) == 1:
        return images[0], texts[0]
    raise ValueError(f"cannot tell the caption column among {', '.join(texts) or 'no text columns'}")


def export_cached_dataset(hub_id: str, datasets_root: Path) -> tuple[list[Item], str]:
    from datasets import load_dataset

    snapshot = cached_snapshot(hub_id)
    dataset = load_dataset(str(snapshot), split="train")
    image_column, caption_column = pick_columns(dataset.features)
    folder = datasets_root / f"hub-{hub_id.replace('/', '--')}-{snapshot.name[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index, row in enumerate(dataset):
        path = folder / f"{index:06d}.png"
        if not path.exists():
            row[image_column].convert("RGB").save(path)
        items.append(Item(str(path), str(row[caption_column] or "")))
    return items, f"hub-{hub_id.replace('/', '--')}"
