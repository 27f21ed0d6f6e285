"""Dataset node: a folder of ComfyUI's input directory, a cached hub dataset, or IMAGE + captions → DATASET."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from comfy_api.latest import io

from ..trainer.cache import fingerprint
from ..trainer.data import DataError, Item, check_images, open_image, scan_folder, write_manifest
from . import paths
from .hub import export_cached_dataset
from .images import labelled_grid, to_image_batch, to_pil

Dataset = io.Custom("LORA_FOUNDRY_DATASET")
SOURCES = ["folder", "hub_cache", "images"]
PREVIEW_LIMIT = 16


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of every file: any change makes the node run again."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def captions_for(count: int, text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * count
    if len(lines) != count:
        raise ValueError(f"captions: {len(lines)} lines for {count} images; give one line per image, or one for all")
    return lines


def items_from_images(images, captions: str) -> tuple[list[Item], str]:
    """Write an IMAGE batch as PNGs into the pack's datasets folder (content-named, so reruns reuse them)."""
    texts = captions_for(images.shape[0], captions)
    digest = hashlib.sha256(images.cpu().numpy().tobytes() + json.dumps(texts).encode()).hexdigest()[:16]
    folder = paths.datasets_dir() / f"images-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index, (image, caption) in enumerate(zip(images, texts, strict=True)):
        path = folder / f"{index:04d}.png"
        if not path.exists():
            to_pil(image).save(path)
        items.append(Item(str(path), caption))
    return items, f"images-{digest}"


def preview(items: list[Item]) -> object:
    shown = items[:PREVIEW_LIMIT]
    pictures = [open_image(item.image) for item in shown]
    title = f"{len(items)} images" + (f" (first {PREVIEW_LIMIT} shown)" if len(items) > PREVIEW_LIMIT else "")
    return to_image_batch([labelled_grid(pictures, [i.caption for i in shown], cell=160, title=title)])


class LoraFoundryDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryDataset",
            display_name="LoRA Foundry Dataset",
            category="LoRA Foundry",
            description="Training images and captions, with how they are cropped, flipped and bucketed.",
            inputs=[
                io.Combo.Input("source", options=SOURCES, default="folder",
                               tooltip="folder: a subfolder of ComfyUI's input folder; hub_cache: a datasets id "
                               "already in the local Hugging Face cache; images: the IMAGE input with captions"),
                io.Combo.Input("folder", options=paths.dataset_folders() or [""],
                               tooltip="Subfolder of ComfyUI's input folder with images and same-name .txt captions "
                               "or a metadata.jsonl / metadata.csv"),
                io.String.Input("hub_dataset", default="", tooltip="Dataset id (owner/name), read from the local "
                                "cache only; nothing is downloaded"),
                io.String.Input("captions", default="", multiline=True,
                                tooltip="For source 'images': one caption per line, or one line for every image"),
                io.Int.Input("resolution", default=768, min=64, max=2048, step=8,
                             tooltip="Training resolution: side of the square bucket, in pixels"),
                io.Combo.Input("crop", options=["center", "random"], default="center",
                               tooltip="Where to crop when the picture does not fit its bucket"),
                io.Boolean.Input("random_flip", default=True, tooltip="Flip half of the samples left-right"),
                io.Boolean.Input("bucketing", default=True,
                                 tooltip="Train each picture at its own aspect ratio (buckets of equal area)"),
                io.Int.Input("top_rows", default=0, min=0, max=1_000_000, tooltip="Use only the first N (0: all)"),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="Times each picture appears per epoch"),
                io.Image.Input("images", optional=True, tooltip="For source 'images': the training pictures"),
            ],
            outputs=[
                Dataset.Output(display_name="dataset"),
                io.Image.Output(display_name="preview"),
                io.Int.Output(display_name="count"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, source: str, folder: str, **kwargs) -> str:
        if source == "folder":
            try:
                return folder_fingerprint(paths.resolve_dataset_folder(folder))
            except (paths.PathError, OSError):
                return ""
        return ""

    @classmethod
    def execute(
        cls, source: str, folder: str, hub_dataset: str, captions: str, resolution: int, crop: str,
        random_flip: bool, bucketing: bool, top_rows: int, repeats: int, images=None,
    ) -> io.NodeOutput:
        warnings: list[str] = []
        if source == "folder":
            resolved = paths.resolve_dataset_folder(folder)
            # images, captions and metadata alike: a symlink must not pull in a file from elsewhere
            paths.require_inside(sorted(resolved.iterdir()), paths.input_dir(), f"dataset folder {folder!r}")
            items, warnings = scan_folder(resolved)
            name = folder
        elif source == "hub_cache":
            items, name = export_cached_dataset(hub_dataset.strip(), paths.datasets_dir())
        elif images is not None:
            items, name = items_from_images(images, captions)
        else:
            raise ValueError("source 'images' needs the images input connected")
        if top_rows:
            items = items[:top_rows]
        try:
            check_images(items)
        except DataError as error:
            raise ValueError(str(error)) from None
        settings = {"resolution": resolution, "crop": crop, "random_flip": random_flip, "bucketing": bucketing,
                    "top_rows": 0, "repeats": repeats}
        key = fingerprint([(i.image, i.caption) for i in items], settings)[:16]
        manifest = paths.datasets_dir() / "manifests" / f"{name.replace('/', '_')}-{key}.json"
        write_manifest(items, manifest)
        value = {"manifest": str(manifest), "name": name, "count": len(items), "settings": settings,
                 "fingerprint": fingerprint(key, [Path(i.image).stat().st_mtime_ns for i in items]),
                 "warnings": warnings}
        return io.NodeOutput(value, preview(items), len(items))
