"""How a run is asked to stop, the same way on every platform.

Three things stop a run, each checked by `StopWatch.requested()` between units of work (steps, cache items,
sampling steps, around the model load):
- a stop file, `RUN_DIR/stop`, which the node (or a user) creates: the one request Windows, macOS and Linux
  all see, whatever process tree `accelerate launch` built;
- SIGTERM / SIGINT (and SIGBREAK on Windows), for a trainer run by hand;
- the process that started the trainer going away (its pid comes in LORA_FOUNDRY_PARENT_PID): a killed
  ComfyUI must not leave a trainer holding the GPU.
After a stop the trainer saves a checkpoint where there was training to keep, and exits.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

STOP_FILE_NAME = "stop"
PARENT_PID_ENV = "LORA_FOUNDRY_PARENT_PID"
PARENT_CHECK_EVERY_S = 1.0


def stop_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / STOP_FILE_NAME


def request_stop(run_dir: str | Path, reason: str = "stop requested") -> None:
    """Ask the trainer of `run_dir` to stop: it sees the file at its next check."""
    path = stop_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n", encoding="utf-8")


def clear_stop(run_dir: str | Path) -> None:
    """Remove a stop request left by an earlier attempt, before a new trainer starts."""
    stop_file(run_dir).unlink(missing_ok=True)


class ParentWatch:
    """Is the process that launched us still there? A pid alone can be reused, so its start time is kept too."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.created: float | None = None
        if pid is not None:
            try:
                self.created = psutil.Process(pid).create_time()
            except psutil.Error:
                self.created = None  # already gone when we started

    def gone(self) -> bool:
        if self.pid is None:
            return False
        if self.created is None:
            return True
        try:
            process = psutil.Process(self.pid)
            return process.create_time() != self.created or process.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True


def parent_pid_from_env() -> int | None:
    value = os.environ.get(PARENT_PID_ENV, "")
    return int(value) if value.isdigit() else None


class StopWatch:
    """Remembers the first reason to stop; cheap enough to call between any two units of work."""

    def __init__(self, run_dir: str | Path, parent_pid: int | None = None, install_signals: bool = True):
        self.file = stop_file(run_dir)
        self.parent = ParentWatch(parent_pid)
        self.reason: str | None = None
        self.signum: int | None = None
        self._next_parent_check = 0.0
        if install_signals:
            for name in ("SIGTERM", "SIGINT", "SIGBREAK"):  # SIGBREAK: Ctrl-Break, Windows only
                sig = getattr(signal, name, None)
                if sig is not None:
                    signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.reason is None:
            self.signum = signum
            self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self) -> bool:
        if self.reason is not None:
            return True
        if self.file.exists():
            self.reason = "stop file " + self.file.name
            return True
        now = time.monotonic()
        if now >= self._next_parent_check:
            self._next_parent_check = now + PARENT_CHECK_EVERY_S
            if self.parent.gone():
                self.reason = f"the process that started the trainer (pid {self.parent.pid}) is gone"
                return True
        return False
