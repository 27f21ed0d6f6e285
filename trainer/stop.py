"""How a run is asked to stop, the same way on every platform.

Three things stop a run, each checked by `StopWatch.requested()` between units of work (steps, cache items,
sampling steps, around the model load):
- a stop file, `RUN_DIR/stop`, which the node (or a user) creates: the one request Windows, macOS and Linux
  all see, whatever process tree `accelerate launch` built;
- SIGTERM / SIGINT (and SIGBREAK on Windows), for a trainer run by hand;
- the process that started the trainer going away (its pid comes in LORA_FOUNDRY_PARENT_PID): a killed
  ComfyUI must not leave a trainer holding the GPU.
After a stop the trainer saves a checkpoint where there was training to keep, and exits.

Until there is work to keep (`StopWatch.exit_at_once_until_work_is_kept`, then `keep_work`), a stop ends the
process at once: the group's rendezvous and the model load block inside C++ for minutes, where no check runs
and no Python signal handler can; a rank asleep there must not outlive a cancel or a killed ComfyUI.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

STOP_FILE_NAME = "stop"
PARENT_PID_ENV = "LORA_FOUNDRY_PARENT_PID"
PARENT_CHECK_EVERY_S = 1.0
EARLY_STOP_POLL_S = 0.2


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
        self._keeping = threading.Event()
        if install_signals:
            self._set_signals(self._on_signal)

    @staticmethod
    def _set_signals(handler: object) -> None:
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):  # SIGBREAK: Ctrl-Break, Windows only
            sig = getattr(signal, name, None)
            if sig is not None:
                signal.signal(sig, handler)

    def exit_at_once_until_work_is_kept(self) -> None:
        """From now until `keep_work`: a signal ends the process (the default action, which works inside C++),
        and a thread ends it on a stop file or a vanished parent. For the trainer's process only."""
        self._set_signals(signal.SIG_DFL)
        threading.Thread(target=self._exit_when_asked, name="early-stop", daemon=True).start()

    def keep_work(self) -> None:
        """From here a stop is seen between units of work, so that what was done is saved first."""
        self._keeping.set()
        self._set_signals(self._on_signal)

    def _exit_when_asked(self) -> None:
        while not self._keeping.wait(EARLY_STOP_POLL_S):
            if self.requested():
                print(f"stopped before any work to keep ({self.reason})", file=sys.stderr, flush=True)
                os._exit(128 + (self.signum or signal.SIGTERM))  # nothing to save: no cleanup to run

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
