"""Dataset node: a folder of ComfyUI's input directory, a cached hub dataset, or IMAGE + captions → DATASET."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from ..trainer.cache import fingerprint, sha256_file
from ..trainer.config import DataConfig
from ..trainer.data import (
    MASK_SUFFIX,
    DataError,
    Item,
    check_images,
    list_dataset_files,
    open_image,
    scan_folder,
    write_manifest,
)
from ..trainer.families import family_resolutions
from . import paths
from .api_features import advanced
from .hub import export_cached_dataset
from .images import labelled_grid, mask_to_pil, to_image_batch, to_pil

Dataset = io.Custom("LORA_FOUNDRY_DATASET")
SOURCES = ["folder", "hub_cache", "images"]
PREVIEW_LIMIT = 16
DIGEST_INDEX = "file-digests.json"
CONTENT_VERSION = "dataset-content-v1"


def file_stamp(path: str | Path) -> list[int]:
    """What tells that a file may have changed without reading it. The mtime alone does not: copy tools keep
    it and a user can set it. The ctime (inode change time) cannot be set and moves with every write, and a
    file replaced by a rename has a new inode."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def folder_fingerprint(folder: Path) -> str:
    """Names and stamps of every file the scan reads: any change makes the node run again. Hidden and system files
    are left out, so Finder rewriting .DS_Store does not run the node (and the training after it) again."""
    files, _ = list_dataset_files(folder)
    entries = [(p.name, file_stamp(p)) for p in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


class FileDigests:
    """sha256 of picture files, kept in a JSON index (resolved path -> stamp and digest) so an unchanged file
    is not read again on the next queue. A changed stamp means reading the file again."""

    def __init__(self, index_path: Path):
        self.index_path = index_path
        self.hashed = 0  # files read in full by this instance (the rest came from the index)
        self._known = self._load()
        self._dirty = False

    def _load(self) -> dict[str, list]:
        try:
            known = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing or torn: start again, it is only a cache
            return {}
        return known if isinstance(known, dict) else {}

    def digest(self, path: str | Path) -> str:
        resolved = str(Path(path).resolve())
        stamp = file_stamp(resolved)
        known = self._known.get(resolved)
        if isinstance(known, list) and known[:-1] == stamp:
            return known[-1]
        digest = sha256_file(resolved)
        self.hashed += 1
        self._known[resolved] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the index once per run of the node (not per file), without the files that are gone."""
        if not self._dirty:
            return
        self._known = {path: entry for path, entry in self._known.items() if os.path.exists(path)}
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_name(f".{self.index_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._known), encoding="utf-8")
        os.replace(tmp, self.index_path)
        self._dirty = False


def content_key(items: list[Item], settings: dict, digests: FileDigests) -> str:
    """sha256 over every picture's bytes and caption, in order, and the settings. Paths and times are left
    out, so the same pictures give the same key wherever they live, and a replaced picture a new one."""
    pictures = [[digests.digest(item.image), item.caption] + ([digests.digest(item.mask)] if item.mask else [])
                for item in items]
    return fingerprint(CONTENT_VERSION, pictures, settings)


def dataset_content(items: list[Item], settings: dict, index_path: Path) -> str:
    digests = FileDigests(index_path)
    key = content_key(items, settings, digests)
    digests.save()
    return key


def first(value: Any) -> Any:
    """With is_input_list every input arrives as a list: a widget's list holds its one value."""
    return value[0] if isinstance(value, list) else value


def captions_for(count: int, text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * count
    if len(lines) != count:
        raise ValueError(f"captions: {len(lines)} lines for {count} images; give one line per image, or one for all")
    return lines


def captions_for_pictures(count: int, captions: list[str]) -> list[str]:
    """A STRING list of one caption per picture (ComfyUI's dataset loaders), or one text as captions_for reads."""
    if len(captions) == 1:
        return captions_for(count, captions[0])
    if len(captions) != count:
        raise ValueError(f"captions: {len(captions)} captions for {count} images; give one caption per image, "
                         "or one text")
    return [caption.strip() for caption in captions]


def pictures_of(batches: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Every [H, W, C] picture of a list of IMAGE batches, in order; the batches may differ in size (a list
    output, such as ComfyUI's dataset loaders, gives one batch per picture)."""
    return [picture for batch in batches if batch is not None for picture in batch]


def pictures_digest(pictures: list[torch.Tensor], captions: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(captions).encode())
    for picture in pictures:
        digest.update(json.dumps(list(picture.shape)).encode())  # equal bytes at other sizes are other pictures
        digest.update(picture.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def masks_for_pictures(pictures: list[torch.Tensor], mask_batches: list[torch.Tensor | None] | None
                       ) -> list[torch.Tensor | None]:
    """One [H, W] mask per picture from MASK batches aligned with the IMAGE batches (none: no masks); a mask
    must have its picture's size."""
    masks = pictures_of(mask_batches or [])
    if not masks:
        return [None] * len(pictures)
    if len(masks) != len(pictures):
        raise ValueError(f"masks: {len(masks)} masks for {len(pictures)} images; give one mask per image")
    wrong = [f"{i} ({m.shape[-1]}x{m.shape[-2]} for {p.shape[1]}x{p.shape[0]})"
             for i, (p, m) in enumerate(zip(pictures, masks, strict=True)) if tuple(m.shape[-2:]) != tuple(p.shape[:2])]
    if wrong:
        raise ValueError(f"masks: a mask must be its picture's size; not so for picture {', '.join(wrong)}")
    return masks


def items_from_images(batches: list[torch.Tensor | None], captions: list[str],
                      mask_batches: list[torch.Tensor | None] | None = None) -> tuple[list[Item], str]:
    """Write the pictures (and their masks, as NAME_mask.png) as PNGs into the pack's datasets folder
    (content-named, so reruns reuse them)."""
    pictures = pictures_of(batches)
    if not pictures:
        raise ValueError("source 'images': the images input holds no pictures")
    texts = captions_for_pictures(len(pictures), captions)
    masks = masks_for_pictures(pictures, mask_batches)
    digest = pictures_digest(pictures + [m for m in masks if m is not None], texts)
    folder = paths.datasets_dir() / f"images-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for index, (image, caption, mask) in enumerate(zip(pictures, texts, masks, strict=True)):
        path = folder / f"{index:04d}.png"
        if not path.exists():
            to_pil(image).save(path)
        mask_path = None
        if mask is not None:
            mask_path = folder / f"{index:04d}{MASK_SUFFIX}.png"
            if not mask_path.exists():
                mask_to_pil(mask).save(mask_path)
        items.append(Item(str(path), caption, None if mask_path is None else str(mask_path)))
    return items, f"images-{digest}"


def preview(items: list[Item]) -> object:
    shown = items[:PREVIEW_LIMIT]
    pictures = [open_image(item.image) for item in shown]
    title = f"{len(items)} images" + (f" (first {PREVIEW_LIMIT} shown)" if len(items) > PREVIEW_LIMIT else "")
    return to_image_batch([labelled_grid(pictures, [i.caption for i in shown], cell=160, title=title)])


def gather_items(source: str, folder: str, hub_dataset: str, captions: list[str],
                 images: list[torch.Tensor | None] | None, masks: list[torch.Tensor | None] | None = None,
                 ) -> tuple[list[Item], str, list[str]]:
    """The pictures and captions of the chosen source, its name, and warnings about it."""
    if source == "folder":
        resolved = paths.resolve_dataset_folder(folder)
        # images, captions and metadata alike: a symlink must not pull in a file from elsewhere
        paths.require_inside(sorted(resolved.iterdir()), paths.input_dir(), f"dataset folder {folder!r}")
        items, warnings = scan_folder(resolved)
        return items, folder, warnings
    if source == "hub_cache":
        items, name = export_cached_dataset(hub_dataset.strip(), paths.datasets_dir())
        return items, name, []
    if images:
        items, name = items_from_images(images, captions, masks)
        return items, name, []
    raise ValueError("source 'images' needs the images input connected")


def caption_settings(trigger_word: str, caption_dropout: float, shuffle_tags: bool, keep_tags: int) -> dict:
    """The caption settings that differ from the defaults, so a dataset without them keeps its content key (the
    Train node checks them with the rest of the run's config)."""
    chosen = {"trigger_word": trigger_word.strip(), "caption_dropout": caption_dropout, "shuffle_tags": shuffle_tags,
              "keep_tags": keep_tags}
    return {key: value for key, value in chosen.items() if value != getattr(DataConfig, key)}


def dataset_value(items: list[Item], name: str, settings: dict, warnings: list[str]) -> dict:
    """The DATASET output: the manifest the trainer reads, and the keys that tell runs on it apart."""
    key = fingerprint([(i.image, i.caption) for i in items], settings)[:16]
    manifest = paths.datasets_dir() / "manifests" / f"{name.replace('/', '_')}-{key}.json"
    write_manifest(items, manifest)
    return {
        "manifest": str(manifest),
        "name": name,
        "count": len(items),
        "settings": settings,
        # the run identity's data part: picture bytes and captions, not where they are (see content_key)
        "content": dataset_content(items, settings, paths.datasets_dir() / DIGEST_INDEX),
        "warnings": warnings,
    }


def show_warnings(warnings: list[str], node_id: str | None) -> dict:
    """Make the dataset's warnings seen: each goes to ComfyUI's console log (logging.warning), all of them to the
    node's progress text in the graph when the node id is known; the returned UI output puts them in the prompt's
    history too (outputs[node id]["warnings"]), for a user of the API."""
    for message in warnings:
        logging.warning("LoRA Foundry Dataset: %s", message)
    if warnings and node_id is not None:
        from server import PromptServer

        PromptServer.instance.send_progress_text("\n".join(f"warning: {m}" for m in warnings), node_id)
    return {"warnings": warnings}


class LoraFoundryDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryDataset",
            display_name="LoRA Foundry Dataset",
            category="LoRA Foundry",
            description="Training images and captions, with how they are cropped, flipped and bucketed.",
            # a list output (ComfyUI's Load Image Dataset from Folder nodes: one IMAGE and one STRING per
            # picture) must reach this node whole, in one run, not one run per picture
            is_input_list=True,
            inputs=[
                io.Combo.Input(
                    "source",
                    options=SOURCES,
                    default="folder",
                    tooltip="folder: a subfolder of ComfyUI's input folder; hub_cache: a datasets id already in the "
                    "local Hugging Face cache; images: the IMAGE input with captions",
                ),
                io.Combo.Input(
                    "folder",
                    options=paths.dataset_folders() or [""],
                    tooltip="Subfolder of ComfyUI's input folder with images and same-name .txt captions or a "
                    "metadata.jsonl / metadata.csv",
                ),
                io.String.Input(
                    "hub_dataset",
                    default="",
                    tooltip="Dataset id (owner/name), read from the local cache only; nothing is downloaded",
                ),
                io.String.Input(
                    "captions",
                    default="",
                    multiline=True,
                    tooltip="For source 'images': one caption per line, or one line for every image; or a list "
                    "of captions, one per image (the texts of Load Image and Text Dataset from Folder)",
                ),
                io.Int.Input(
                    "resolution",
                    default=0,
                    min=0,
                    max=2048,
                    step=8,
                    tooltip="Training resolution: side of the square bucket, in pixels (0: the base model's own, "
                    f"{family_resolutions()})",
                ),
                io.Combo.Input(
                    "crop",
                    options=["center", "random"],
                    default="center",
                    tooltip="Where to crop when the picture does not fit its bucket",
                ),
                io.Boolean.Input(
                    "random_flip",
                    default=True,
                    tooltip="Flip half of the samples left-right",
                ),
                io.Boolean.Input(
                    "bucketing",
                    default=True,
                    tooltip="Train each picture at its own aspect ratio (buckets of equal area)",
                ),
                io.Int.Input(
                    "top_rows",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Use only the first N (0: all)",
                    **advanced(),
                ),
                io.Int.Input(
                    "repeats",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Times each picture appears per epoch",
                ),
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip="For source 'images': the training pictures, as a batch or a list of pictures of "
                    "any sizes",
                ),
                io.String.Input(
                    "trigger_word",
                    default="",
                    optional=True,
                    tooltip="Put first in every caption (and kept first when tags are shuffled); empty: none",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    optional=True,
                    tooltip="Share of the samples trained with an empty caption (the LoRA then also works "
                    "without its words)",
                    **advanced(),
                ),
                io.Boolean.Input(
                    "shuffle_tags",
                    default=False,
                    optional=True,
                    tooltip="Shuffle each caption's comma-separated tags at every step (captions are then "
                    "encoded every step instead of cached)",
                    **advanced(),
                ),
                io.Int.Input(
                    "keep_tags",
                    default=0,
                    min=0,
                    max=255,
                    optional=True,
                    tooltip="Leading tags that stay in place when shuffling (the trigger word always does)",
                    **advanced(),
                ),
                io.Mask.Input(
                    "masks",
                    optional=True,
                    tooltip="For source 'images': one loss mask per picture (white trains, black is ignored), "
                    "e.g. from a segmentation node. A folder uses NAME_mask.png beside NAME.png",
                ),
            ],
            outputs=[
                Dataset.Output(display_name="dataset"),
                io.Image.Output(display_name="preview"),
                io.Int.Output(display_name="count"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, source: list[str], folder: list[str], **kwargs: list) -> str:
        if first(source) == "folder":
            try:
                return folder_fingerprint(paths.resolve_dataset_folder(first(folder)))
            except (paths.PathError, DataError, OSError):
                return ""
        return ""

    @classmethod
    def execute(
        cls, source: list[str], folder: list[str], hub_dataset: list[str], captions: list[str],
        resolution: list[int], crop: list[str], random_flip: list[bool], bucketing: list[bool],
        top_rows: list[int], repeats: list[int], images: list[torch.Tensor | None] | None = None,
        trigger_word: list[str] | None = None, caption_dropout: list[float] | None = None,
        shuffle_tags: list[bool] | None = None, keep_tags: list[int] | None = None,
        masks: list[torch.Tensor | None] | None = None,
    ) -> io.NodeOutput:
        items, name, warnings = gather_items(first(source), first(folder), first(hub_dataset), captions, images,
                                             masks)
        if first(top_rows):
            items = items[: first(top_rows)]
        try:
            check_images(items)
        except DataError as error:
            raise ValueError(str(error)) from None
        settings = {"resolution": first(resolution), "crop": first(crop), "random_flip": first(random_flip),
                    "bucketing": first(bucketing), "top_rows": 0, "repeats": first(repeats)}
        settings |= caption_settings(first(trigger_word) or "", first(caption_dropout) or 0.0,
                                     bool(first(shuffle_tags)), first(keep_tags) or 0)
        ui = show_warnings(warnings, cls.hidden.unique_id)
        return io.NodeOutput(dataset_value(items, name, settings, warnings), preview(items), len(items), ui=ui)
