"""Whether a file name can be stored as typed on every OS the pack runs on: Windows, macOS and Linux.

Letters and digits of any script are fine; what is refused is what one of those systems forbids, reserves or
silently changes, each with a message that says why. No ComfyUI import: the nodes and the trainer both use it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

# Linux and macOS allow 255 UTF-8 bytes per name, Windows 255 UTF-16 code units. A string never has more
# UTF-16 units than UTF-8 bytes, so the byte limit keeps a name within both.
NAME_MAX_BYTES = 255

# Names are built from the output stem: the LoRA's temp file ".{stem}.safetensors.{8 hex}.tmp" (26 bytes more,
# trainer/lora_file.py) and the run folder "{stem}-{12 hex}" (13 more, nodes/train.py). 200 leaves room for both.
OUTPUT_STEM_MAX_BYTES = 200

WINDOWS_FORBIDDEN_CHARACTERS = '<>:"/\\|?*'

_RESERVED_DIGITS = "0123456789¹²³"  # Windows reserves COM¹ … LPT³ too
WINDOWS_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{digit}" for port in ("COM", "LPT") for digit in _RESERVED_DIGITS}
)

# Format characters that make a name display in another order than it is stored (the "Trojan Source" trick).
# Other format characters stay allowed: ZWJ and ZWNJ are needed by Persian, Indic scripts and emoji.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def file_name_problem(name: str) -> str | None:
    """Why `name` cannot be one file's (or folder's) name on Windows, macOS and Linux alike; None if it can."""
    return _character_problem(name) or _too_long(name, NAME_MAX_BYTES)


def output_stem_problem(stem: str) -> str | None:
    """Why `stem` cannot name a LoRA file ("{stem}.safetensors") and the files and folders built from it."""
    return _character_problem(stem) or _too_long(
        stem, OUTPUT_STEM_MAX_BYTES, "for an output name, leaving room for the temp file and run folder named after it"
    )


def _character_problem(name: str) -> str | None:
    checks = (
        _empty,
        _dot_or_dot_dot,
        _unencodable_characters,
        _forbidden_characters,
        _control_characters,
        _leading_dot,
        _trailing_dot_or_space,
        _windows_device_name,
    )
    for check in checks:
        problem = check(name)
        if problem:
            return problem
    return None


def _empty(name: str) -> str | None:
    return "the name is empty" if not name else None


def _dot_or_dot_dot(name: str) -> str | None:
    if name in (".", ".."):
        return f"{name!r} means a folder ('.' this one, '..' the one above), not a file name"
    return None


def _unencodable_characters(name: str) -> str | None:
    # a lone surrogate (a str decoded with errors="surrogateescape") has no UTF-8 or UTF-16 form
    found = _distinct(c for c in name if unicodedata.category(c) == "Cs")
    if found:
        return f"contains {_code_points(found)}, which is not a valid character (a broken surrogate) in any file system"
    return None


def _forbidden_characters(name: str) -> str | None:
    found = _distinct(c for c in name if c in WINDOWS_FORBIDDEN_CHARACTERS)
    if found:
        shown = " ".join(found)
        return (f"contains {shown}: Windows does not allow {' '.join(WINDOWS_FORBIDDEN_CHARACTERS)} in file names "
                "('/' and '\\' would also make it a folder path)")
    return None


def _control_characters(name: str) -> str | None:
    controls = _distinct(c for c in name if unicodedata.category(c) == "Cc")
    if controls:
        return (f"contains the control character(s) {_code_points(controls)} (tab, newline and the like): "
                "Windows refuses them and they are invisible elsewhere")
    bidi = _distinct(c for c in name if c in _BIDI_CONTROLS)
    if bidi:
        return (f"contains the text-direction control(s) {_code_points(bidi)}: they make the name show in "
                "another order than it is stored")
    return None


def _leading_dot(name: str) -> str | None:
    if name.startswith("."):
        return "starts with '.': macOS and Linux hide such files, and ComfyUI's lists leave them out"
    return None


def _trailing_dot_or_space(name: str) -> str | None:
    if name.endswith((".", " ")):
        last = "a dot" if name.endswith(".") else "a space"
        return f"ends with {last}: Windows drops trailing dots and spaces, so the file would get another name there"
    return None


def _windows_device_name(name: str) -> str | None:
    # Windows maps a device name to the device whatever the case and extension: "nul.txt" and "Con.v2" are
    # the devices NUL and CON; spaces before the extension ("CON .txt") are ignored as well.
    base = name.split(".", 1)[0].rstrip(" ")
    if base.upper() in WINDOWS_DEVICE_NAMES:
        return (f"{base!r} is a device name Windows reserves (CON, PRN, AUX, NUL, COM0-9, LPT0-9 and a few more), "
                "with any extension and in any case; a file cannot be named so there")
    return None


def _too_long(name: str, max_bytes: int, limit_note: str = "in a file name on every OS") -> str | None:
    size = len(name.encode("utf-8"))
    if size > max_bytes:
        return (f"is {size} bytes long in UTF-8 ({len(name)} characters; letters beyond ASCII take 2-4 bytes, "
                f"CJK characters 3): at most {max_bytes} bytes fit {limit_note}")
    return None


def _distinct(characters: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(characters))


def _code_points(characters: list[str]) -> str:
    return ", ".join(f"U+{ord(c):04X}" for c in characters)
