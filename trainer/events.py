"""events.jsonl: the trainer appends one JSON object per line; readers follow it incrementally."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO


class EventLog:
    """Appends events to RUN_DIR/events.jsonl, one flushed line each. Disabled on non-main processes."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file: TextIO | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_inside_a_line(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            if torn:  # a killed attempt's unfinished line: end it, or our first event would be glued to it
                self._file.write("\n")

    def emit(self, type: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"type": type, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class EventReader:
    """Reads the events appended since the last call; memory stays constant however long the file grows."""

    def __init__(self, path: str | Path, from_end: bool = False):
        """`from_end`: skip what the file holds now (earlier attempts of a run), and read only what follows."""
        self.path = Path(path)
        self._offset = file_size(self.path) if from_end else 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next call
        parsed = (_parse(line) for line in lines)
        return [event for event in parsed if event is not None]

    def read_rest(self) -> list[dict[str, Any]]:
        """read_new() for a writer that has stopped: an unfinished last line is parsed if it is whole JSON
        (written without its newline) and dropped when torn, instead of waiting for a rest that never comes."""
        events = self.read_new()
        tail, self._partial = self._partial, b""
        event = _parse(tail)
        return events + [event] if event is not None else events


def file_size(path: Path) -> int:
    """Bytes in the file now; 0 when it does not exist yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _ends_inside_a_line(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def _parse(line: bytes) -> dict[str, Any] | None:
    """One event line, or None for a blank or torn one (a torn object never parses: it lacks its closing brace)."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event of an events.jsonl, whole file: [] when it is missing; blank and torn lines are skipped (a
    trainer killed mid-write leaves a torn line, and its resumed attempt appends after it)."""
    return EventReader(path).read_rest()
