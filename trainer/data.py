"""Training data: find images and captions, validate them, and turn them into bucket-sized tensors.

Two sources give the same list of `Item`s:
  - a manifest: JSON written by the ComfyUI node (`write_manifest` / `read_manifest`);
  - a folder of images, captioned by `metadata.jsonl` / `metadata.csv` (the Hugging Face imagefolder
    convention) or by same-stem `.txt` files. Hidden and system files (.DS_Store, ._NAME, Thumbs.db) are
    skipped with a warning; captions and metadata may be UTF-8 or UTF-16 with a BOM (`read_text_file`).
    Subfolders are not read; a warning names those that hold pictures.

Problems with the data are collected and raised together as one `DataError`, so a user fixes a folder
in one pass instead of one file per run.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import random
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .captions import with_trigger
from .config import Crop, DataConfig

MANIFEST_FORMAT = "lora-foundry-manifest"
MANIFEST_VERSION = 1
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_COLUMNS = ("file_name", "image", "file", "path", "filename")
MASK_SUFFIX = "_mask"  # NAME_mask.png beside NAME.jpg is NAME's loss mask
SYSTEM_FILE_NAMES = ("thumbs.db", "desktop.ini")  # Windows Explorer's; macOS's (.DS_Store, ._*) are dot files
NAMED_SKIPPED_FILES = 3
NAMED_SUBFOLDERS = 3
COUNTED_SUBFOLDER_PICTURES = 10_000  # a warning needs no exact count, so a huge tree is not walked to its end
LISTED_BAD_LINES = 20  # a metadata file's bad lines named in its error; the rest are counted
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions", "description")

# Our own limit, checked on the header before decoding. It is above Pillow's warning threshold (~89 MP)
# and below its hard error (~179 MP), so Pillow's warning is silenced and its error reads as "too large".
MAX_PIXELS = 100_000_000
MIN_SIDE = 8  # smaller images cannot make even one latent pixel (the VAE downscales 8x)
MIN_BUCKET_SIDE = 64


class DataError(ValueError):
    """Every problem found in the training data, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training data:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Item:
    image: str  # absolute path
    caption: str
    mask: str | None = None  # absolute path of the picture's loss mask (white trains, black is ignored)


# ---------------------------------------------------------------------------------------------- manifest


def write_manifest(items: Iterable[Item], path: str | Path) -> None:
    """Write items as a manifest, atomically, so a reader never sees half a file."""
    items = list(items)
    relative = [path for item in items for path in (item.image, item.mask) if path and not os.path.isabs(path)]
    if relative:
        raise DataError([f"manifest image paths must be absolute: {p}" for p in relative])
    document = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "items": [{"image": item.image, "caption": item.caption} | ({"mask": item.mask} if item.mask else {})
                  for item in items],
    }
    _write_text_atomic(Path(path), json.dumps(document, ensure_ascii=False, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | Path) -> list[Item]:
    """Read and validate a manifest; raise DataError naming every problem."""
    document = _read_json(Path(path))
    problems = _manifest_header_problems(document, path)
    if problems:
        raise DataError(problems)
    items, problems = _manifest_items(document["items"], path)
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError([f"{path}: the manifest lists no images"])
    return items


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError([f"{path}: manifest not found"]) from exc
    except OSError as exc:
        raise DataError([f"{path}: cannot read the manifest ({exc.strerror})"]) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError([f"{path}: the manifest is not valid UTF-8 JSON ({exc})"]) from exc


def _manifest_header_problems(document: Any, path: str | Path) -> list[str]:
    if not isinstance(document, dict):
        return [f"{path}: expected a JSON object, got {type(document).__name__}"]
    problems = []
    if document.get("format") != MANIFEST_FORMAT:
        problems.append(
            f"{path}: format is {document.get('format')!r}, expected {MANIFEST_FORMAT!r} "
            "(not a LoRA Foundry manifest)"
        )
    if document.get("version") != MANIFEST_VERSION:
        problems.append(
            f"{path}: unsupported manifest version {document.get('version')!r} "
            f"(this trainer reads version {MANIFEST_VERSION})"
        )
    if not isinstance(document.get("items"), list):
        problems.append(f"{path}: 'items' must be a list")
    return problems


def _manifest_items(rows: list[Any], path: str | Path) -> tuple[list[Item], list[str]]:
    items, problems = [], []
    for index, row in enumerate(rows):
        where = f"{path}: items[{index}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {type(row).__name__}")
            continue
        row_problems = _manifest_row_problems(row, where)
        if row_problems:
            problems += row_problems
        else:
            items.append(Item(image=row["image"], caption=row["caption"], mask=row.get("mask")))
    return items, problems


def _manifest_row_problems(row: dict[str, Any], where: str) -> list[str]:
    problems = []
    for key in ("image", "caption"):
        if key not in row:
            problems.append(f"{where}: missing field {key!r}")
        elif not isinstance(row[key], str):
            problems.append(f"{where}.{key}: expected a string, got {row[key]!r}")
    for key in ("image", "mask"):
        path = row.get(key)
        if key == "mask" and path is not None and not isinstance(path, str):
            problems.append(f"{where}.mask: expected a string, got {path!r}")
        elif isinstance(path, str) and not os.path.isabs(path):
            problems.append(f"{where}.{key}: must be an absolute path, got {path!r}")
    return problems


# ------------------------------------------------------------------------------------------------ folder


def scan_folder(folder: Path) -> tuple[list[Item], list[str]]:
    """Images directly in `folder`, sorted by file name, with their captions; plus warnings."""
    items, warnings_ = _scan_folder(Path(folder))
    return items, warnings_ + _caption_warnings(items)


def _scan_folder(folder: Path) -> tuple[list[Item], list[str]]:
    files, skipped = list_dataset_files(folder)
    subfolders = _subfolder_warnings(folder)
    try:
        found = _images_among(folder, files, skipped)
    except DataError as exc:  # pictures only in subfolders: the error must say where they are
        raise DataError(exc.problems + subfolders) from None
    images, masks = _split_masks(found)
    metadata = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(metadata) > 1:
        raise DataError([f"{folder}: has both metadata.jsonl and metadata.csv; keep one"])
    if metadata:
        captions = _captions_from_metadata(metadata[0], folder, images)
    else:
        captions = _captions_from_txt(files, images)
    items = [Item(image=str(path), caption=captions.get(path, ""), mask=_optional_str(masks.get(path)))
             for path in images]
    return items, _skipped_files_warnings(skipped) + subfolders + _duplicate_stem_warnings(images)


def is_hidden_or_system(name: str) -> bool:
    """A file an operating system or file manager leaves in folders, never training data: any dot file (macOS's
    .DS_Store and AppleDouble ._NAME copies among them) and Windows' Thumbs.db and desktop.ini."""
    return name.startswith(".") or name.lower() in SYSTEM_FILE_NAMES


def list_dataset_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files directly in `folder`, sorted by name: those that may be data, and the hidden or system files
    left out of them. DataError if the folder is missing."""
    if not folder.is_dir():
        raise DataError([f"{folder}: folder not found" if not folder.exists() else f"{folder}: not a folder"])
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    return [p for p in files if not is_hidden_or_system(p.name)], [p for p in files if is_hidden_or_system(p.name)]


def _split_masks(files: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """The pictures, and each one's mask: NAME_mask.<image type> beside NAME.<image type> is NAME's loss mask,
    not a training picture."""
    by_stem = {p.stem: p for p in files}
    masks = {by_stem[p.stem[: -len(MASK_SUFFIX)]]: p for p in files
             if p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in by_stem}
    mask_files = set(masks.values())
    return [p for p in files if p not in mask_files], masks


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _images_among(folder: Path, files: list[Path], skipped: list[Path]) -> list[Path]:
    images = sorted((p.resolve() for p in files if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)
    if images:
        return images
    if skipped and not files:
        raise DataError([f"{folder}: no images (only hidden or system files: {_some_names(skipped)})"])
    if not files:
        raise DataError([f"{folder}: the folder is empty"])
    raise DataError([f"{folder}: no images ({len(files)} files, none ending in {', '.join(IMAGE_EXTENSIONS)})"])


def _captions_from_txt(files: list[Path], images: list[Path]) -> dict[Path, str]:
    txt_by_stem = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
    captions, problems = {}, []
    for image in images:
        txt = txt_by_stem.get(image.stem)
        if txt is None:
            continue
        try:
            captions[image] = read_text_file(txt).strip()
        except DataError as exc:
            problems += exc.problems
    if problems:
        raise DataError(problems)
    return captions


def read_text_file(path: Path) -> str:
    """A caption or metadata file's text: UTF-8 with or without a BOM, or UTF-16 with a BOM (either byte order,
    as Windows Notepad's "Unicode" writes). DataError naming the file for anything else."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError([f"{path}: cannot read the file ({exc.strerror})"]) from exc
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(encoding)  # both codecs drop the BOM; "utf-16" reads the byte order from it
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not UTF-8 or UTF-16 text; save it as UTF-8"]) from exc
    # UTF-16 without a BOM, and UTF-32, often decode without error, but leave NULs no real text holds
    if "\x00" in text:
        raise DataError([f"{path}: not UTF-8 or UTF-16 text (UTF-16 needs a BOM); save it as UTF-8"])
    return text


def _skipped_files_warnings(skipped: list[Path]) -> list[str]:
    if not skipped:
        return []
    files = "file" if len(skipped) == 1 else "files"
    return [f"skipped {len(skipped)} hidden or system {files} ({_some_names(skipped)})"]


def _some_names(files: list[Path]) -> str:
    return _first_few([p.name for p in files], NAMED_SKIPPED_FILES)


def _first_few(labels: list[str], shown: int) -> str:
    listed = ", ".join(labels[:shown])
    rest = len(labels) - shown
    return f"{listed} and {rest} more" if rest > 0 else listed


def _subfolder_warnings(folder: Path) -> list[str]:
    """One warning naming the subfolders that hold pictures, most pictures first: the scan does not read them.

    Hidden subfolders (.ipynb_checkpoints, .git, .thumbnails) are left out, as hidden files are. macOS's
    __MACOSX needs no rule of its own: it holds only ._NAME AppleDouble copies, dot files that never count as
    pictures, so it is never named.
    """
    counted = [(sub.name, _count_pictures(sub)) for sub in _visible_subfolders(folder)]
    with_pictures = sorted(((name, n) for name, n in counted if n), key=lambda entry: (-entry[1], entry[0]))
    if not with_pictures:
        return []
    listed = _first_few([f"{name}/ ({_pictures(n)})" for name, n in with_pictures], NAMED_SUBFOLDERS)
    subfolders = "1 subfolder was" if len(with_pictures) == 1 else f"{len(with_pictures)} subfolders were"
    return [f"{subfolders} not read (only pictures directly in the folder {folder.name}): {listed}"]


def _visible_subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not is_hidden_or_system(p.name)]


def _count_pictures(folder: Path) -> int:
    """Pictures anywhere under `folder` outside hidden folders, up to COUNTED_SUBFOLDER_PICTURES."""
    return sum(1 for _ in islice(_pictures_under(folder), COUNTED_SUBFOLDER_PICTURES))


def _pictures_under(folder: Path) -> Iterator[str]:
    # os.walk follows no symlinked folder below `folder` (no cycles) and skips unreadable ones
    for _, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not is_hidden_or_system(name)]
        yield from (name for name in files
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden_or_system(name))


def _pictures(count: int) -> str:
    if count >= COUNTED_SUBFOLDER_PICTURES:
        return f"{count}+ pictures"
    return "1 picture" if count == 1 else f"{count} pictures"


def _duplicate_stem_warnings(images: list[Path]) -> list[str]:
    stems = Counter(p.stem for p in images)
    clashes = [p.name for p in images if stems[p.stem] > 1]
    if not clashes:
        return []
    return [
        f"images share a file name stem, so a .txt caption would apply to all of them: {', '.join(clashes)}"
    ]


def _caption_warnings(items: list[Item]) -> list[str]:
    missing = sum(1 for item in items if not item.caption)
    if not missing:
        return []
    return [f"{missing} of {len(items)} images have no caption; they train with an empty caption"]


# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class _Metadata:
    """A metadata file as read: its columns, its rows with the line each starts on, and the lines that could not be
    read as a row, with why."""

    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]
    bad_lines: list[tuple[int, str]]


def _captions_from_metadata(path: Path, folder: Path, images: list[Path]) -> dict[Path, str]:
    """Each picture's caption from a metadata file; one DataError listing every bad line otherwise."""
    metadata = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    if metadata.bad_lines and not metadata.rows:  # nothing read: no columns worth talking about
        raise DataError(_bad_lines_report(path, metadata.bad_lines))
    try:
        image_column, caption_column = _pick_columns(path, metadata.columns, [row for _, row in metadata.rows])
    except DataError as exc:  # a problem of the whole file; its unreadable lines need fixing as well
        raise DataError(exc.problems + _bad_lines_report(path, metadata.bad_lines)) from None
    captions, unmatched = _match_rows(metadata.rows, image_column, caption_column, folder, set(images))
    if metadata.bad_lines or unmatched:
        raise DataError(_bad_lines_report(path, metadata.bad_lines + unmatched))
    return captions


def _bad_lines_report(path: Path, bad_lines: list[tuple[int, str]]) -> list[str]:
    """The bad lines in file order, the first LISTED_BAD_LINES of them named and the rest counted, so a broken
    100 000-line file does not make a 100 000-line message."""
    ordered = sorted(bad_lines)
    listed = [f"{path}: line {number}: {problem}" for number, problem in ordered[:LISTED_BAD_LINES]]
    rest = len(ordered) - LISTED_BAD_LINES
    if rest <= 0:
        return listed
    return [*listed, f"{path}: and {rest} more bad {'line' if rest == 1 else 'lines'}"]


def _read_jsonl(path: Path) -> _Metadata:
    rows, bad_lines = [], []
    # split at line feeds only: str.splitlines() also splits at characters a JSON string may hold as they are
    # (U+2028, U+0085), which would break such a row in two and shift every later line number
    for number, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad_lines.append((number, f"not valid JSON ({exc.msg})"))
            continue
        if isinstance(row, dict):
            rows.append((number, row))
        else:
            bad_lines.append((number, f"expected an object, got {type(row).__name__}"))
    return _Metadata(list(dict.fromkeys(key for _, row in rows for key in row)), rows, bad_lines)


def _read_csv(path: Path) -> _Metadata:
    header: list[str] | None = None
    rows, bad_lines = [], []
    for number, record in _csv_records(read_text_file(path)):
        if isinstance(record, csv.Error):
            bad_lines.append((number, f"not readable as CSV ({record})"))
        elif header is None:
            header = record
        elif len(record) > len(header):
            bad_lines.append((number, f"{len(record)} values for {len(header)} columns "
                                      "(put a caption that holds commas in double quotes)"))
        else:
            rows.append((number, dict(zip(header, record, strict=False))))  # short rows: the last columns empty
    return _Metadata(header or [], rows, bad_lines)


def _csv_records(text: str) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """Each record of a CSV text, or the error reading it raised, with the line it starts on (a quoted caption may
    span lines); blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": keep line breaks inside quoted captions
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader carries on at the next line
            yield start, exc
            continue
        if record:
            yield start, record


def _pick_columns(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The image and caption columns, chosen by name (never by position)."""
    image_column = _column_by_name(columns, IMAGE_COLUMNS)
    if image_column is None:
        expected = ", ".join(IMAGE_COLUMNS)
        raise DataError(
            [f"{path}: no image column (columns: {', '.join(columns)}; expected one of {expected})"]
        )
    caption_column = _column_by_name(columns, CAPTION_COLUMNS)
    if caption_column is not None:
        return image_column, caption_column
    # no conventional name: accept the one other column that holds only text
    text_columns = [
        c for c in columns if c != image_column and all(isinstance(r.get(c, ""), str) for r in rows)
    ]
    if len(text_columns) > 1:
        names = ", ".join(text_columns)
        raise DataError([f"{path}: cannot tell which column is the caption ({names}); rename one to 'text'"])
    return image_column, (text_columns[0] if text_columns else None)


def _column_by_name(columns: list[str], names: tuple[str, ...]) -> str | None:
    by_name = {c.strip().lower(): c for c in reversed(columns)}  # reversed: the first spelling wins
    return next((by_name[name] for name in names if name in by_name), None)


def _match_rows(
    rows: list[tuple[int, dict[str, Any]]],
    image_column: str,
    caption_column: str | None,
    folder: Path,
    images: set[Path],
) -> tuple[dict[Path, str], list[tuple[int, str]]]:
    """Each picture's caption, and the (line, problem) of every row that names no picture of the folder."""
    captions: dict[Path, str] = {}
    first_lines: dict[Path, int] = {}
    bad_lines = []
    for number, row in rows:
        name = row.get(image_column)
        if not isinstance(name, str) or not name.strip():
            bad_lines.append((number, f"no file name in column {image_column!r}"))
            continue
        target = (folder / name.strip()).resolve()
        caption = row.get(caption_column) if caption_column else ""
        problem = _row_problem(target, name, caption, images, first_lines)
        if problem:
            bad_lines.append((number, problem))
        else:
            captions[target] = (caption or "").strip()
            first_lines[target] = number
    return captions, bad_lines


def _row_problem(
    target: Path, name: str, caption: Any, images: set[Path], first_lines: dict[Path, int]
) -> str | None:
    if target not in images:
        if not target.exists():
            return f"{name!r}: file not found"
        return f"{name!r}: not an image directly in the folder (subfolders are not scanned)"
    if target in first_lines:
        return f"{name!r}: listed again (first on line {first_lines[target]})"
    if caption is not None and not isinstance(caption, str):
        return f"{name!r}: caption is not text ({caption!r})"
    return None


# ----------------------------------------------------------------------------------------------- loading


def load_items(data: DataConfig) -> tuple[list[Item], list[str]]:
    """The items named by the data config (manifest or folder), limited to the first `top_rows`."""
    if data.manifest:
        items, warnings_ = read_manifest(data.manifest), []
    elif data.folder:
        items, warnings_ = _scan_folder(Path(data.folder))
    else:
        raise DataError(["data: give a manifest or a folder"])
    if 0 < data.top_rows < len(items):
        warnings_.append(f"top_rows={data.top_rows}: using the first {data.top_rows} of {len(items)} images")
        items = items[: data.top_rows]
    if not data.trigger_word.strip():
        return items, warnings_ + _caption_warnings(items)
    # a picture without a caption trains on the trigger word alone: nothing to warn about
    return [replace(item, caption=with_trigger(item.caption, data.trigger_word)) for item in items], warnings_


def open_image(path: str | Path) -> Image.Image:
    """The image at `path`, upright and in RGB, fully decoded; DataError naming the file if unusable."""
    path = Path(path)
    try:
        return _open_checked(path)
    except DataError:
        raise
    except Exception as exc:  # image decoders raise many types; any of them means "unusable file"
        raise DataError([f"{path}: {_describe_failure(path, exc)}"]) from exc


def _open_checked(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides instead
        with Image.open(path) as image:
            _check_size(path, *image.size)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        megapixels = width * height / 1e6
        raise DataError(
            [f"{path}: too large ({width}x{height} = {megapixels:.1f} MP; at most {MAX_PIXELS / 1e6:g} MP)"]
        )
    if width < MIN_SIDE or height < MIN_SIDE:
        raise DataError([f"{path}: too small ({width}x{height}; at least {MIN_SIDE}x{MIN_SIDE} px)"])


def _describe_failure(path: Path, exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too large (over {MAX_PIXELS / 1e6:g} MP)"
    if isinstance(exc, UnidentifiedImageError):
        return (
            "empty file (0 bytes)"
            if path.stat().st_size == 0
            else "not an image (or a format Pillow cannot read)"
        )
    return f"truncated or corrupt ({type(exc).__name__}: {exc})"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_l(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")  # covers L, 1, P, CMYK, YCbCr, RGB (convert always returns a copy)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; Pillow's own convert would clip everything above 255 to white."""
    values = np.asarray(image).astype(np.float64)
    # "I;16*" is 16-bit by definition; plain "I" carries no bit depth, so 8-bit range is taken as 8-bit
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _over_white(image: Image.Image) -> Image.Image:
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def open_mask(path: str | Path) -> Image.Image:
    """A loss mask, upright, as 8-bit grey (white: trains, black: ignored); DataError naming the file if
    unusable."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as mask:
                _check_size(path, *mask.size)
                mask.load()
                upright = ImageOps.exif_transpose(mask)
                return _sixteen_bit_to_l(upright) if upright.mode.startswith("I") else upright.convert("L")
    except DataError:
        raise
    except Exception as exc:  # as open_image: any decoder failure means an unusable file
        raise DataError([f"{path}: {_describe_failure(path, exc)}"]) from exc


def grey_out(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The picture with its masked-out pixels (mask 0) made mid-grey before any resizing, so nothing of them
    reaches the VAE: what lies under a black mask cannot change the LoRA."""
    if mask is None:
        return image
    grey = Image.new("RGB", image.size, (128, 128, 128))
    return Image.composite(image, grey, mask.point(lambda value: 255 if value else 0))


def check_images(items: Iterable[Item]) -> None:
    """Open every image and mask; raise one DataError listing every unusable file and why."""
    problems = []
    for item in items:
        try:
            with open_image(item.image) as image:
                size = image.size
            if item.mask is not None:
                problems += _mask_problems(item.mask, size)
        except DataError as exc:
            problems += exc.problems
    if problems:
        raise DataError(problems)


def _mask_problems(path: str, picture_size: tuple[int, int]) -> list[str]:
    with open_mask(path) as mask:
        if mask.size != picture_size:
            return [f"{path}: the mask is {mask.size[0]}x{mask.size[1]}, its picture "
                    f"{picture_size[0]}x{picture_size[1]}; a mask must match its picture's size"]
        if mask.getextrema()[1] == 0:
            return [f"{path}: the mask is black everywhere, so nothing of its picture would train"]
    return []


# ----------------------------------------------------------------------------------------------- buckets


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sorted from tallest to widest.

    For every short side that is a multiple of `step`, the long side is the largest multiple of `step`
    keeping the area <= resolution²; pairs beyond `max_aspect` are dropped, and each portrait bucket
    has its landscape twin. The square bucket is exactly (resolution, resolution) even when resolution
    is not a multiple of step: it then matches the non-bucketing size, so square images train at the
    requested resolution either way (resolution is a multiple of 8, which is all the VAE needs).
    """
    return list(_buckets(resolution, step, max_aspect))


@lru_cache(maxsize=16)
def _buckets(resolution: int, step: int, max_aspect: float) -> tuple[tuple[int, int], ...]:
    if resolution < 8 or step < 8 or max_aspect < 1.0:
        raise ValueError(
            f"bad bucket settings: resolution={resolution}, step={step}, max_aspect={max_aspect}"
        )
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for short in range(step, resolution, step):
        long = area // short // step * step
        if short < long <= short * max_aspect:
            buckets |= {(short, long), (long, short)}
    return tuple(sorted(buckets, key=lambda wh: wh[0] / wh[1]))


def bucket_for(width: int, height: int, data: DataConfig) -> tuple[int, int]:
    """The (width, height) an image of this size trains at.

    Bucketing off: always (resolution, resolution), upscaling small images. Bucketing on: the bucket
    with the nearest aspect ratio, shrunk (sides rounded down to multiples of 8) when the image is
    smaller than it on either side, so an image is never upscaled.
    """
    if not data.bucketing:
        return data.resolution, data.resolution
    buckets = _buckets(data.resolution, data.bucket_step, data.max_bucket_aspect)
    target = math.log(width / height)
    bucket_w, bucket_h = min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - target), -wh[0] * wh[1]))
    # "fits on both sides" rather than "fewer pixels": covering the bucket must not upscale either side
    scale = min(1.0, width / bucket_w, height / bucket_h)
    return _shrink_side(bucket_w * scale, width), _shrink_side(bucket_h * scale, height)


def _shrink_side(scaled: float, source: int) -> int:
    """Round down to a multiple of 8, but keep at least 64 (or the source side, if shorter)."""
    floor = min(MIN_BUCKET_SIDE, source // 8 * 8)
    return max(8, floor, int(scaled) // 8 * 8)


# ------------------------------------------------------------------------------------------------ pixels


@dataclass(frozen=True)
class Framing:
    """Where a training picture's pixels come from, in pixels: the picture's own size, the top-left corner of
    the crop in the resized picture, the bucket it fills, and the resized width (to mirror the crop). SDXL is
    conditioned on these (its "time ids"); the other families ignore them."""

    original: tuple[int, int]  # (height, width) as read
    crop_top_left: tuple[int, int]  # (top, left)
    target: tuple[int, int]  # (height, width) of the bucket
    resized_width: int

    def flipped(self) -> Framing:
        """The framing of the mirrored pixels: the crop's left edge measured from the other side."""
        top, left = self.crop_top_left
        return Framing(self.original, (top, self.resized_width - left - self.target[1]), self.target,
                       self.resized_width)

    def as_tensor(self) -> torch.Tensor:
        """(6,): original height, width, crop top, left, target height, width."""
        return torch.tensor([*self.original, *self.crop_top_left, *self.target], dtype=torch.float32)


def prepare_image(
    image: Image.Image, bucket: tuple[int, int], crop: Crop, rng: random.Random | None
) -> torch.Tensor:
    """A (3, H, W) float32 tensor in [-1, 1] of exactly the bucket's size (see prepare_framed)."""
    return prepare_framed(image, bucket, crop, rng)[0]


def prepare_framed(
    image: Image.Image, bucket: tuple[int, int], crop: Crop, rng: random.Random | None
) -> tuple[torch.Tensor, Framing]:
    """A (3, H, W) float32 tensor in [-1, 1] of exactly the bucket's size, and where it came from.

    The image is resized (bilinear, antialiased) to cover the bucket, keeping its aspect ratio, then
    cropped: centered, or at an offset drawn from `rng` (required for random crops).
    """
    bucket_w, bucket_h = bucket
    # resize while still uint8: half the time and a quarter of the memory of float32 on photos
    pixels = _resize_to_cover(F.to_image(image.convert("RGB")), bucket_w, bucket_h)
    top, left = _crop_offsets(pixels.shape[-2] - bucket_h, pixels.shape[-1] - bucket_w, crop, rng)
    framing = Framing((image.height, image.width), (top, left), (bucket_h, bucket_w), pixels.shape[-1])
    pixels = F.crop(pixels, top, left, bucket_h, bucket_w)
    tensor = F.to_dtype(pixels, torch.float32, scale=True)
    return (tensor * 2.0 - 1.0).as_subclass(torch.Tensor).contiguous(), framing


def _resize_to_cover(tensor: torch.Tensor, bucket_w: int, bucket_h: int) -> torch.Tensor:
    height, width = tensor.shape[-2:]
    scale = max(bucket_w / width, bucket_h / height)
    # max(): rounding must never leave a side one pixel short of the bucket
    size = [max(bucket_h, round(height * scale)), max(bucket_w, round(width * scale))]
    if size == [height, width]:
        return tensor
    return F.resize(tensor, size, interpolation=InterpolationMode.BILINEAR, antialias=True)


def _crop_offsets(spare_h: int, spare_w: int, crop: Crop, rng: random.Random | None) -> tuple[int, int]:
    if crop == "center":
        return spare_h // 2, spare_w // 2
    if crop != "random":
        raise ValueError(f"unknown crop {crop!r} (expected 'center' or 'random')")
    if rng is None:
        raise ValueError("a random crop needs an rng")
    return rng.randint(0, spare_h), rng.randint(0, spare_w)


def prepare_mask(mask: Image.Image, framing: Framing, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask as the loss weights of the picture's latents, (1, h, w) in [0, 1]: resized and cropped exactly
    as its picture was (`framing`), then averaged over each latent's pixels."""
    (bucket_h, bucket_w), (top, left) = framing.target, framing.crop_top_left
    pixels = F.crop(_resize_to_cover(F.to_image(mask), bucket_w, bucket_h), top, left, bucket_h, bucket_w)
    weights = F.to_dtype(pixels, torch.float32, scale=True).as_subclass(torch.Tensor)
    return torch.nn.functional.interpolate(weights[None], size=latent_size, mode="area")[0].contiguous()


def flip(tensor: torch.Tensor) -> torch.Tensor:
    """The image mirrored left to right."""
    return F.horizontal_flip(tensor)
