"""One trainer per run folder: the main process holds an OS file lock on RUN_DIR/trainer.lock while it runs.

The operating system frees the lock when its holder dies, however it dies (a kill -9 included), so a lock is
never stale. A second trainer on the same folder (ComfyUI restarted and the prompt queued again while the first
trainer was still saving) would write the same events log and checkpoints: the node waits for the folder to be
free before it launches, and a trainer started anyway refuses.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = "trainer.lock"


class RunFolderBusy(RuntimeError):
    pass


def lock_of(run_dir: str | Path) -> FileLock:
    return FileLock(Path(run_dir) / LOCK_NAME)


def hold_run_folder(run_dir: str | Path) -> FileLock:
    """Take the run folder's lock for this process's lifetime, or raise RunFolderBusy."""
    lock = lock_of(run_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(f"another trainer is running in {run_dir}: wait for it to end, or stop it "
                            "(create RUN_DIR/stop)") from None
    return lock


def run_folder_busy(run_dir: str | Path) -> bool:
    """Is a trainer holding the run folder now? (Taking and at once freeing the lock is the only honest test.)"""
    if not (Path(run_dir) / LOCK_NAME).exists():
        return False
    lock = lock_of(run_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
