"""Dataset node: ComfyUI's list outputs become one dataset, and its content key follows the pictures' bytes.

The content key is computed by nodes/dataset.py, which imports ComfyUI; ComfyUI's imports have global side
effects, so the key is asked of a probe process started in ComfyUI's folder (as the other probes are).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"resolution": 64, "crop": "center", "random_flip": False, "bucketing": True, "top_rows": 0,
            "repeats": 1}

# One JSON request per line on stdin ({"items": [[image, caption], ...], "settings": ..., "index": path}),
# one answer per line on stdout ({"content": key, "hashed": files read in full}). Only nodes/dataset.py and
# what it imports are loaded: the pack's package modules are stood in for, so its other nodes stay out.
PROBE = r"""
import importlib, json, os, sys, types
from pathlib import Path

root = sys.argv[1]
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options

comfy.options.enable_args_parsing()
for name, folder in (("lora_foundry", root), ("lora_foundry.nodes", os.path.join(root, "nodes"))):
    package = types.ModuleType(name)
    package.__path__ = [folder]
    sys.modules[name] = package
dataset = importlib.import_module("lora_foundry.nodes.dataset")
for line in sys.stdin:
    request = json.loads(line)
    digests = dataset.FileDigests(Path(request["index"]))
    items = [dataset.Item(image, caption) for image, caption in request["items"]]
    key = dataset.content_key(items, request["settings"], digests)
    digests.save()
    print(json.dumps({"content": key, "hashed": digests.hashed}), flush=True)
"""


class ContentProbe:
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def content(self, items: list[tuple[Path, str]], index: Path, settings: dict = SETTINGS) -> tuple[str, int]:
        """The content key of these pictures and captions, and how many files had to be read for it."""
        if self.process.poll() is not None:
            raise RuntimeError(f"the content probe exited with {self.process.returncode} (its stderr is above)")
        request = {"items": [[str(image), caption] for image, caption in items], "settings": settings,
                   "index": str(index)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the content probe exited with {self.process.wait(10)} (its stderr is above)")
        reply = json.loads(answer)
        return reply["content"], reply["hashed"]


@pytest.fixture(scope="module")
def probe(comfy_dir: Path) -> Iterator[ContentProbe]:
    process = subprocess.Popen([sys.executable, "-c", PROBE, str(ROOT)], cwd=comfy_dir, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    yield ContentProbe(process)
    process.stdin.close()
    process.wait(30)


def solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def captioned_folder(folder: Path) -> list[tuple[Path, str]]:
    folder.mkdir(parents=True)
    return [(solid(folder / "red.bmp", (220, 30, 30)), "a red square"),
            (solid(folder / "blue.bmp", (30, 30, 220)), "a blue square")]


# ---- the content key --------------------------------------------------------------------------------------


def test_the_same_pictures_in_two_folders_give_the_same_content_key(probe: ContentProbe, tmp_path: Path) -> None:
    index = tmp_path / "file-digests.json"
    here = captioned_folder(tmp_path / "here")
    there = tmp_path / "there"
    shutil.copytree(tmp_path / "here", there, copy_function=shutil.copyfile)  # same bytes, new times
    moved = [(there / image.name, caption) for image, caption in here]
    (key_here, read_here), (key_there, read_there) = probe.content(here, index), probe.content(moved, index)
    assert key_here == key_there and read_here == read_there == 2
    key_again, read_again = probe.content(here, index)
    assert key_again == key_here
    assert read_again == 0, "unchanged files were read again instead of taken from the digest index"


def test_a_replaced_picture_gives_a_new_content_key_even_at_the_same_size_and_mtime(
    probe: ContentProbe, tmp_path: Path
) -> None:
    index = tmp_path / "file-digests.json"
    items = captioned_folder(tmp_path / "data")
    before, _ = probe.content(items, index)  # the digest index now knows red.bmp
    red = items[0][0]
    stat = red.stat()
    time.sleep(0.01)
    solid(red, (30, 200, 30))  # another picture under the same name, the same byte size (BMP)
    os.utime(red, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime, as a copy tool would keep it
    assert (red.stat().st_size, red.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after, hashed = probe.content(items, index)
    assert hashed == 1 and after != before


def test_a_changed_caption_or_setting_gives_a_new_content_key(probe: ContentProbe, tmp_path: Path) -> None:
    index = tmp_path / "file-digests.json"
    items = captioned_folder(tmp_path / "data")
    key, _ = probe.content(items, index)
    recaptioned = [items[0], (items[1][0], "a blue box")]
    assert probe.content(recaptioned, index)[0] != key
    assert probe.content(items, index, SETTINGS | {"resolution": 128})[0] != key
    assert probe.content(items[::-1], index)[0] != key  # the order is part of the dataset too


# ---- on the real server -------------------------------------------------------------------------------------


def dataset_inputs(server, **inputs: object) -> dict:
    values = {"source": "images", "folder": server.dataset_dir.name, "hub_dataset": "", "captions": "",
              "resolution": 64, "crop": "center", "random_flip": False, "bucketing": True, "top_rows": 0,
              "repeats": 1}
    return values | inputs


def manifests(server) -> set[Path]:
    return set((server.output_dir / "lora-foundry" / "datasets" / "manifests").glob("*.json"))


def run_once(server, prompt: dict) -> tuple[dict, list[dict]]:
    """The history entry, and the items of every manifest the prompt wrote (one per Dataset node run)."""
    known = manifests(server)
    entry = server.run(prompt, timeout=120)
    written = sorted(manifests(server) - known, key=lambda p: p.stat().st_mtime_ns)
    return entry, [json.loads(path.read_text())["items"] for path in written]


def shown(server, entry: dict, node: str) -> list[Image.Image]:
    """The pictures a PreviewImage node showed."""
    assert node in entry["outputs"], f"node {node} showed nothing: the graph was taken from ComfyUI's cache"
    return [Image.open(server.temp_dir / image["subfolder"] / image["filename"]).convert("RGB")
            for image in entry["outputs"][node]["images"]]


def count_shown_as_width(count_link: list) -> dict:
    """Nodes that show the Dataset node's count output: one picture `count` pixels wide, per run."""
    return {
        "90": {"class_type": "EmptyImage", "inputs": {"width": count_link, "height": 8, "batch_size": 1, "color": 0}},
        "91": {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}},
    }


@pytest.mark.slow
@pytest.mark.comfy_server
def test_comfyui_dataset_lists_become_one_dataset_in_one_run(comfy_server) -> None:
    folder = comfy_server.input_dir / "lists-captioned"
    folder.mkdir()
    sizes = [(48, 64), (64, 64), (80, 56)]  # of different sizes: the list cannot be one batch
    for index, size in enumerate(sizes):
        solid(folder / f"{index}.png", (200, 40 * index, 90), size)
        (folder / f"{index}.txt").write_text(f"a {size[0]}x{size[1]} picture\n", encoding="utf-8")
    prompt = {
        "1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder.name}},
        "2": {"class_type": "LoraFoundryDataset", "inputs": dataset_inputs(comfy_server, captions=["1", 1],
                                                                          images=["1", 0])},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
        **count_shown_as_width(["2", 2]),
    }
    entry, runs = run_once(comfy_server, prompt)
    assert len(runs) == 1, f"the Dataset node ran {len(runs)} times, once per picture"
    (items,) = runs
    pictures = {item["caption"]: Image.open(item["image"]).size for item in items}
    assert pictures == {f"a {w}x{h} picture": (w, h) for w, h in sizes}  # each picture kept its own caption
    assert len(shown(comfy_server, entry, "3")) == 1
    assert [image.width for image in shown(comfy_server, entry, "91")] == [len(sizes)]


@pytest.mark.slow
@pytest.mark.comfy_server
def test_an_image_list_without_captions_takes_the_one_caption(comfy_server) -> None:
    folder = comfy_server.input_dir / "lists-plain"
    folder.mkdir()
    for index in range(2):
        solid(folder / f"{index}.png", (10, 90 + 60 * index, 200), (40 + 8 * index, 40))
    prompt = {
        "1": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": folder.name}},
        "2": {"class_type": "LoraFoundryDataset", "inputs": dataset_inputs(comfy_server, captions="lfstyle",
                                                                          images=["1", 0])},
        **count_shown_as_width(["2", 2]),
    }
    entry, runs = run_once(comfy_server, prompt)
    assert [[item["caption"] for item in items] for items in runs] == [["lfstyle", "lfstyle"]]
    assert [image.width for image in shown(comfy_server, entry, "91")] == [2]


@pytest.mark.slow
@pytest.mark.comfy_server
def test_one_image_batch_still_takes_a_caption_per_line(comfy_server) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 40, "batch_size": 3, "color": 0x00FF00}},
        "2": {"class_type": "LoraFoundryDataset", "inputs": dataset_inputs(comfy_server, captions="one\ntwo\nthree",
                                                                          images=["1", 0])},
        **count_shown_as_width(["2", 2]),
    }
    entry, runs = run_once(comfy_server, prompt)
    assert [[item["caption"] for item in items] for items in runs] == [["one", "two", "three"]]
    assert [image.width for image in shown(comfy_server, entry, "91")] == [3]


def share_of(picture: Image.Image, color: tuple[int, int, int]) -> float:
    return float((np.asarray(picture) == color).all(axis=-1).mean())


@pytest.mark.slow
@pytest.mark.comfy_server
def test_a_folder_picture_replaced_at_the_same_size_and_mtime_runs_the_node_again(comfy_server) -> None:
    folder = comfy_server.input_dir / "lists-folder"
    folder.mkdir()
    picture = solid(folder / "only.bmp", (220, 30, 30), (64, 64))
    (folder / "only.txt").write_text("a square", encoding="utf-8")
    prompt = {
        "1": {"class_type": "LoraFoundryDataset", "inputs": dataset_inputs(comfy_server, source="folder",
                                                                          folder=folder.name)},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    entry, runs = run_once(comfy_server, prompt)
    assert [[item["caption"] for item in items] for items in runs] == [["a square"]]
    (first,) = shown(comfy_server, entry, "2")
    stat = picture.stat()
    solid(picture, (30, 30, 220), (64, 64))
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    entry, _ = run_once(comfy_server, prompt)
    (second,) = shown(comfy_server, entry, "2")
    assert share_of(first, (220, 30, 30)) > 0.1 and share_of(second, (30, 30, 220)) > 0.1


@pytest.mark.slow
@pytest.mark.comfy_server
def test_a_folder_with_hidden_files_trains_its_pictures_and_shows_the_warning(comfy_server) -> None:
    folder = comfy_server.input_dir / "lists-copied-from-a-mac"
    folder.mkdir()
    solid(folder / "a.png", (200, 40, 90))
    (folder / "a.txt").write_text("a square", encoding="utf-8")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    prompt = {
        "1": {"class_type": "LoraFoundryDataset", "inputs": dataset_inputs(comfy_server, source="folder",
                                                                          folder=folder.name)},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    warning = "skipped 2 hidden or system files (._a.png, Thumbs.db)"
    with comfy_server.listen() as ws:
        entry, runs = run_once(comfy_server, prompt)
        # on the node in the graph
        ws.wait_for(lambda m: m["type"] == "progress_text" and m["data"]["node"] == "1"
                    and warning in m["data"]["text"], timeout=30)
    assert [[item["caption"] for item in items] for items in runs] == [["a square"]]
    assert warning in entry["outputs"]["1"]["warnings"]  # in the history, for a user of the API
    assert warning in comfy_server.log_path.read_text(encoding="utf-8", errors="replace")  # in the console
