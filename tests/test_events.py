"""trainer.events.read_events: the one whole-file reader of events.jsonl, for runs that may have been killed."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.events import EventLog, EventReader, read_events


def line(**event: object) -> str:
    return json.dumps(event) + "\n"


def test_a_torn_last_line_is_dropped_and_the_complete_events_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit("start", total_steps=3)
    log.emit("step", step=1)
    log.close()
    with path.open("a", encoding="utf-8") as f:
        f.write('{"type": "step", "st')  # the trainer was killed inside this write
    assert [e["type"] for e in read_events(path)] == ["start", "step"]


def test_a_torn_line_in_the_middle_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # the first attempt died mid-line; the resumed attempt appended right after the torn part
    path.write_text(line(type="step", step=1) + '{"type": "step", "step": 2, "lo' + line(type="resume", step=1)
                    + line(type="step", step=2), encoding="utf-8")
    assert [(e["type"], e["step"]) for e in read_events(path)] == [("step", 1), ("step", 2)]


def test_a_line_torn_inside_a_multibyte_character_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    whole = json.dumps({"type": "warning", "message": "légende"}, ensure_ascii=False).encode()
    torn = whole[: whole.index("é".encode()) + 1]  # half of "é": the line is not even UTF-8
    path.write_bytes(line(type="start").encode() + torn + line(type="resume").encode() + line(type="done").encode())
    assert [e["type"] for e in read_events(path)] == ["start", "done"]


def test_blank_lines_are_skipped_and_a_missing_file_has_no_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    assert read_events(path) == []
    path.write_text("\n" + line(type="start") + "  \n\n" + line(type="done"), encoding="utf-8")
    assert [e["type"] for e in read_events(path)] == ["start", "done"]


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(type="start") + json.dumps({"type": "done"}), encoding="utf-8")
    assert [e["type"] for e in read_events(path)] == ["start", "done"]


def test_a_following_reader_still_waits_for_an_unfinished_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(line(type="start") + json.dumps({"type": "done"}), encoding="utf-8")
    reader = EventReader(path)
    assert [e["type"] for e in reader.read_new()] == ["start"]  # the writer may still be writing "done"
    assert [e["type"] for e in reader.read_rest()] == ["done"]  # it has stopped: take what is there


def test_a_new_attempt_after_a_torn_line_keeps_its_first_event(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "step", "step": 1}\n{"type": "st', encoding="utf-8")  # killed mid-write
    follower = EventReader(path, from_end=True)
    log = EventLog(path)
    log.emit("loading", model="m.safetensors")
    log.close()
    assert [e["type"] for e in read_events(path)] == ["step", "loading"]
    assert [e["type"] for e in follower.read_new()] == ["loading"]
