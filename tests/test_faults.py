"""Faults the user should hear about plainly, and an events reader that stays small on long runs."""

from __future__ import annotations

import errno
import json
import tracemalloc

import torch

from trainer.events import EventLog, EventReader
from trainer.run import failure_message


def test_out_of_memory_says_what_to_change() -> None:
    message = failure_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert message.startswith("out of memory")
    for advice in ("train.batch_size", "train.gradient_checkpointing", "data.resolution"):
        assert advice in message


def test_disk_full_is_named_as_such() -> None:
    error = OSError(errno.ENOSPC, "No space left on device", "/loras/.x.tmp")
    message = failure_message(error)
    assert "disk is full" in message and "/loras/.x.tmp" in message


def test_reader_memory_does_not_grow_with_the_file(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for step in range(100_000):  # a long run: ~15 MB of step events
        log.emit("step", step=step, loss=0.1, smoothed_loss=0.1, lr=1e-4, images_per_s=2.0, eta_s=1.0)
    reader = EventReader(path)
    assert len(reader.read_new()) == 100_000
    log.emit("done", lora="x")
    tracemalloc.start()
    events = reader.read_new()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [e["type"] for e in events] == ["done"]
    assert peak < 64 * 1024, f"reading one new event allocated {peak} bytes"


def test_reader_waits_for_a_line_to_be_finished(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    reader = EventReader(path)
    assert reader.read_new() == []  # not there yet
    with path.open("w") as f:
        f.write(json.dumps({"type": "step", "step": 1}) + "\n" + '{"type": "st')
    assert [e["step"] for e in reader.read_new()] == [1]
    with path.open("a") as f:
        f.write('ep", "step": 2}\n')
    assert [e["step"] for e in reader.read_new()] == [2]
