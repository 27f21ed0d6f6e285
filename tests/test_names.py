"""Output and file names: any script's letters are fine; what Windows, macOS or Linux cannot store as typed is
refused with the reason, and the longest accepted output name still leaves room for the names built from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from trainer.names import NAME_MAX_BYTES, OUTPUT_STEM_MAX_BYTES, file_name_problem, output_stem_problem

ROOT = Path(__file__).resolve().parent.parent

ACCEPTED = [
    "风格模型",
    "Café ñandú",
    "模型 v2.1",
    "my-style_v2 (final) +1, A&B's",
    "Ελληνικά και Кириллица",
    "नमस्ते",
    "می\u200cخواهم",  # Persian needs the zero-width non-joiner
    "👩\u200d🎨 style",  # an emoji joined by ZWJ
    "CONSOLE",  # a device name only as the whole base name is reserved
    "com10",
    "x" * OUTPUT_STEM_MAX_BYTES,
    "模" * (OUTPUT_STEM_MAX_BYTES // 3),  # 198 bytes
    "🎨" * (OUTPUT_STEM_MAX_BYTES // 4),  # 4 bytes each in UTF-8, 2 UTF-16 units on Windows
]

# each refused name and words its message must contain, so the user learns why
REFUSED = [
    ("CON", "device name"),
    ("aux", "device name"),
    ("Com1", "device name"),
    ("lpt9.safetensors", "device name"),
    ("nul.txt", "device name"),
    ("aux.v2", "device name"),
    ("COM¹", "device name"),
    ("CON .txt", "device name"),
    ("name.", "ends with a dot"),
    ("name ", "ends with a space"),
    (".hidden", "starts with '.'"),
    (".", "folder"),
    ("..", "folder"),
    ("", "empty"),
    ("a:b", "Windows does not allow"),
    ("a|b", "Windows does not allow"),
    ("a/b", "folder path"),
    ("a\\b", "folder path"),
    ('say "hi"', "Windows does not allow"),
    ("what?", "Windows does not allow"),
    ("tab\there", "U+0009"),
    ("line\nbreak", "U+000A"),
    ("del\x7f", "U+007F"),
    ("evil\u202egnp.exe", "U+202E"),
    ("broken\udc80", "U+DC80"),
    ("x" * 230, "230 bytes"),
    ("模" * 70, "210 bytes"),
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_letters_and_digits_of_any_script_are_accepted(name: str) -> None:
    assert output_stem_problem(name) is None
    assert file_name_problem(name) is None


@pytest.mark.parametrize(("name", "why"), REFUSED)
def test_a_name_an_os_cannot_store_as_typed_is_refused_saying_why(name: str, why: str) -> None:
    problem = output_stem_problem(name)
    assert problem is not None and why in problem


def test_the_length_message_gives_the_limit_and_the_length_in_bytes() -> None:
    problem = output_stem_problem("模" * 70)
    assert problem is not None
    assert "210 bytes" in problem and f"at most {OUTPUT_STEM_MAX_BYTES} bytes" in problem and "70 characters" in problem


def test_a_plain_file_name_may_use_the_whole_255_bytes_but_no_more() -> None:
    assert file_name_problem("x" * NAME_MAX_BYTES) is None
    problem = file_name_problem("x" * (NAME_MAX_BYTES + 1))
    assert problem is not None and f"{NAME_MAX_BYTES + 1} bytes" in problem


def test_the_longest_output_names_fit_in_utf16_on_windows_too() -> None:
    for name in ACCEPTED:
        assert len(name.encode("utf-16-le")) // 2 <= NAME_MAX_BYTES


@pytest.mark.parametrize("stem", ACCEPTED)
def test_every_accepted_name_and_the_names_built_from_it_can_be_written(stem: str, tmp_path: Path) -> None:
    """The LoRA file, its temp file (trainer/lora_file.py) and its run folder (nodes/train.py), for real."""
    lora = tmp_path / f"{stem}.safetensors"
    temp = tmp_path / f".{lora.name}.{uuid.uuid4().hex[:8]}.tmp"
    run_dir = tmp_path / f"{stem}-{uuid.uuid4().hex[:12]}"
    for path in (lora, temp):
        path.write_bytes(b"lora")
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    assert set(os.listdir(tmp_path)) == {lora.name, temp.name, run_dir.name}


# ---- through the Train node's nodes/paths.safe_output_name ------------------------------------------------

# nodes/paths.py imports ComfyUI's folder_paths, and ComfyUI's imports have global side effects, so the names
# are checked by a probe process started in ComfyUI's folder (as in test_dataset_lists.py). Only nodes/paths.py
# and what it imports are loaded: the pack's package modules are stood in for, so its nodes stay out.
PROBE = r"""
import importlib, json, os, sys, types

root = sys.argv[1]
sys.path.insert(0, os.getcwd())
for name, folder in (("lora_foundry", root), ("lora_foundry.nodes", os.path.join(root, "nodes"))):
    package = types.ModuleType(name)
    package.__path__ = [folder]
    sys.modules[name] = package
paths = importlib.import_module("lora_foundry.nodes.paths")
answers = []
for name in json.loads(sys.stdin.read()):
    try:
        answers.append({"stem": paths.safe_output_name(name)})
    except paths.PathError as error:
        answers.append({"error": str(error)})
print(json.dumps(answers))
"""

OUTPUT_NAMES = ["风格模型", "风格模型.safetensors", "Style.SafeTensors", "name ", " name", "风格模型\u3000", "CON",
                "con.safetensors", "x" * 230, "v1..2"]


@pytest.fixture(scope="module")
def checked_output_names(comfy_dir: Path) -> dict[str, dict[str, str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], cwd=comfy_dir, input=json.dumps(OUTPUT_NAMES),
                          capture_output=True, text=True, timeout=60, check=True)
    return dict(zip(OUTPUT_NAMES, json.loads(done.stdout), strict=True))


def test_the_output_name_is_kept_as_typed_less_a_typed_safetensors(checked_output_names: dict) -> None:
    assert checked_output_names["风格模型"] == {"stem": "风格模型"}
    assert checked_output_names["风格模型.safetensors"] == {"stem": "风格模型"}
    assert checked_output_names["Style.SafeTensors"] == {"stem": "Style"}
    assert checked_output_names["v1..2"] == {"stem": "v1..2"}  # '..' inside a name leads nowhere


@pytest.mark.parametrize(("name", "why"), [
    ("name ", "ends with a space"),
    (" name", "white space"),
    ("风格模型\u3000", "white space"),  # an ideographic space, as a Chinese input method types it
    ("CON", "device name"),
    ("con.safetensors", "device name"),
    ("x" * 230, "230 bytes"),
])
def test_the_output_name_is_refused_rather_than_silently_changed(
    checked_output_names: dict, name: str, why: str
) -> None:
    error = checked_output_names[name].get("error", "")
    assert error.startswith(f"output name {name!r}: ") and why in error
