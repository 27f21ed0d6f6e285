"""The trainer subprocess: a fixed argv (no widget strings), its own process group, cancel, and events."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..trainer.events import EventReader

RUN_PY = Path(__file__).resolve().parent.parent / "trainer" / "run.py"
STOP_GRACE_S = 3.0
POLL_S = 0.2
_GPU_IDS = re.compile(r"^\d+(,\d+)*$")


class TrainerFailed(RuntimeError):
    pass


def parse_gpu_ids(text: str) -> str | None:
    """'0,1' style GPU ids → the CUDA_VISIBLE_DEVICES value; '' → None (all GPUs)."""
    cleaned = text.replace(" ", "")
    if not cleaned:
        return None
    if not _GPU_IDS.match(cleaned):
        raise ValueError(f"gpu_ids {text!r}: comma-separated GPU numbers, like 0,1")
    return cleaned


def launch_argv(config_path: Path, num_processes: int, accelerate_config: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if accelerate_config is not None:
        argv += ["--config_file", str(accelerate_config)]
    if num_processes > 1:
        argv += ["--multi_gpu", "--num_processes", str(int(num_processes))]
    else:
        argv += ["--num_processes", "1"]
    return argv + [str(RUN_PY), "--config", str(config_path)]


class TrainerProcess:
    """`accelerate launch` of the trainer in a new session, so one signal reaches every process it starts."""

    def __init__(self, argv: list[str], log_path: Path, cuda_visible_devices: str | None):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        if cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        """SIGTERM (the trainer saves a checkpoint), then SIGKILL whatever is left after a short grace."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and self._group_alive():
            self.process.poll()  # reap the launcher; the trainer it started may still be saving
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._log.close()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        code = self.process.wait()
        self._signal_group(signal.SIGKILL)  # a stray child must not outlive a finished launcher
        self._log.close()
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def follow(
    trainer: TrainerProcess,
    events_path: Path,
    on_event: Callable[[dict], None],
    interrupted: Callable[[], bool],
) -> bool:
    """Feed every new event to `on_event` until the trainer exits; stop it when `interrupted()`.

    Returns False when stopped by an interrupt. Raises TrainerFailed on a non-zero exit, with the message
    of the trainer's error event, or the tail of its log when it died without one.
    """
    reader = EventReader(events_path)
    last_error: dict | None = None

    def drain() -> None:
        nonlocal last_error
        for event in reader.read_new():
            if event["type"] == "error":
                last_error = event
            on_event(event)

    try:
        while trainer.poll() is None:
            drain()
            if interrupted():
                trainer.stop()
                return False
            time.sleep(POLL_S)
    except BaseException:  # ComfyUI's progress hook raises on interrupt: the trainer must not outlive it
        trainer.stop()
        raise
    code = trainer.wait()
    drain()
    if code != 0:
        detail = last_error["message"] if last_error else trainer.log_tail()
        raise TrainerFailed(f"the trainer exited with code {code}: {detail}")
    return True
