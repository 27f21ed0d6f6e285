"""The trainer subprocess: a fixed argv (no widget strings), its own process group, cancel, and events."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..trainer.events import EventReader, file_size
from ..trainer.run_lock import run_folder_busy
from ..trainer.stop import PARENT_PID_ENV, clear_stop, request_stop
from . import processes

RUN_PY = Path(__file__).resolve().parent.parent / "trainer" / "run.py"
LAUNCHER_PY = RUN_PY.parent / "launcher.py"  # accelerate launch, ended when ComfyUI is gone
POLL_S = 0.2
# A stop waits for the trainer to finish the unit of work under way and save: STOP_FLOOR_S covers the short
# units (a cache item, a sampling step, a checkpoint save; killing a model load loses nothing), and
# STOP_STEP_FACTOR times the longest training step seen covers the step in progress, the save after it, and a
# slower step than any so far. During the first step no step has been timed: it counts as UNTIMED_STEP_S (a CPU
# step takes 10-25 s). Only a trainer that does not stop waits that long: a stopping one ends sooner.
STOP_FLOOR_S = 15.0
STOP_STEP_FACTOR = 3.0
UNTIMED_STEP_S = 15.0
# Before its first event a trainer is still starting (a launcher in the rendezvous, a rank importing torch):
# nothing to save, and the ranks end themselves at once on a stop (trainer/stop.py); only a launcher blocked
# in the rendezvous is left for the kill.
UNHEARD_GRACE_S = 3.0
LOG_READ_BYTES = 64 * 1024
# An earlier trainer of the same run (ComfyUI restarted while it ran) has seen its parent go and is saving: it is
# given this long to end before the node gives up (it is not killed: it may not be ours to kill)
BUSY_WAIT_S = 180.0
_GPU_IDS = re.compile(r"^\d+(,\d+)*$")
# How the launcher reports a worker that got SIGKILL: accelerate's simple launcher re-raises the
# CalledProcessError ("died with <Signals.SIGKILL: 9>.") and exits 1; torch elastic (--multi_gpu) prints
# "exitcode  : -9 (pid: ...)" and "Signal 9 (SIGKILL) received by PID ...".
_SIGKILL_IN_LOG = re.compile(r"died with <Signals\.SIGKILL: 9>|exitcode\s*:\s*-9\b|Signal 9 \(SIGKILL\) received")
# events after which the next training step begins: the time between one of them and a `step` is that step's
_STEP_CLOCK_EVENTS = frozenset({"start", "step", "checkpoint", "sample", "resume"})


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
    """`accelerate launch` of the trainer: one machine with `num_processes`, or, with an accelerate config file,
    what that file says (machines, processes, this machine's rank, the main machine's address): a flag on the
    command line would override the file's value."""
    argv = [sys.executable, str(LAUNCHER_PY), "--dynamo_backend", "no"]
    if accelerate_config is not None:
        argv += ["--config_file", str(accelerate_config)]
    elif num_processes > 1:
        argv += ["--num_machines", "1", "--multi_gpu", "--num_processes", str(int(num_processes))]
    else:
        argv += ["--num_machines", "1", "--num_processes", "1"]
    return argv + [str(RUN_PY), "--config", str(config_path)]


@dataclass
class Seen:
    """What this attempt's events told: enough to size a stop's grace and to explain how the trainer ended."""

    step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    longest_step_s: float | None = None  # None: no step timed yet
    training: bool = False  # the `start` event came: steps are under way
    error: dict | None = None
    cancelled: dict | None = None
    clock: float | None = None  # time of the last event after which a step begins
    heard: bool = False  # any event of this attempt: until then it is launching, and has nothing to save

    def add(self, event: dict) -> None:
        kind, at = event.get("type"), event.get("time")
        self.heard = True
        if kind == "step":
            self.step = event.get("step", self.step)
            if isinstance(at, (int, float)) and self.clock is not None:
                self.longest_step_s = max(self.longest_step_s or 0.0, at - self.clock)
        elif kind == "checkpoint":
            self.checkpoint_step, self.checkpoint_path = event.get("step"), event.get("path")
        elif kind == "resume":  # the checkpoint an earlier attempt kept is this attempt's until it saves anew
            self.checkpoint_step, self.checkpoint_path = event.get("step"), event.get("checkpoint")
            self.step = event.get("step", self.step)
        elif kind == "start":
            self.training = True
        elif kind == "error":
            self.error = event
        elif kind == "cancelled":
            self.cancelled = event
        if kind in _STEP_CLOCK_EVENTS and isinstance(at, (int, float)):
            self.clock = at

    def grace_s(self) -> float:
        if not self.heard:
            return UNHEARD_GRACE_S
        step = self.longest_step_s
        if step is None:
            step = UNTIMED_STEP_S if self.training else 0.0  # before `start`: loading and caching, short units
        return STOP_FLOOR_S + STOP_STEP_FACTOR * step

    def where(self) -> str:
        """'at step 37; checkpoint step 30 is kept (PATH): queue again to resume', or what is true instead."""
        at = f"at step {self.step}" if self.step is not None else "before its first step"
        if self.checkpoint_step is None:
            return f"{at}; no checkpoint was saved: queue again to train from the start"
        path = f" ({self.checkpoint_path})" if self.checkpoint_path else ""
        return f"{at}; checkpoint step {self.checkpoint_step} is kept{path}: queue again to resume"


def child_env(cuda_visible_devices: str | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env[PARENT_PID_ENV] = str(os.getpid())  # the trainer stops by itself when ComfyUI is gone
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


def killed_by_system(code: int, log: str) -> bool:
    """SIGKILL of the launcher itself (a negative exit code), or of a worker it reports in the log.

    Windows has no SIGKILL, and no out-of-memory killer: an allocation fails there and the trainer says so.
    """
    sigkill = getattr(signal, "SIGKILL", None)  # POSIX only
    # -9: the launcher itself; 128+9: a rank, as trainer/launcher.py passes its end on
    return (sigkill is not None and code in (-sigkill, 128 + sigkill)) or bool(_SIGKILL_IN_LOG.search(log))


def stop_reason(cancelled: dict) -> str:
    """' (signal SIGTERM)' from a `cancelled` event: its reason, or the signal of a trainer that gives none."""
    if isinstance(cancelled.get("reason"), str):
        return f" ({cancelled['reason']})"
    try:
        return f" (signal {signal.Signals(cancelled['signal']).name})"
    except (KeyError, TypeError, ValueError):
        return ""


class TrainerProcess:
    """`accelerate launch` of the trainer for `run_dir`, in a group of its own, with this attempt's events."""

    def __init__(self, argv: list[str], run_dir: Path, cuda_visible_devices: str | None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.run_dir / "trainer.log"
        self.events_path = self.run_dir / "events.jsonl"
        self.seen = Seen()
        clear_stop(self.run_dir)  # a cancelled attempt's request must not stop this one at its first check
        # from the end of what earlier attempts wrote, taken before the start so no new event is skipped
        self._events = EventReader(self.events_path, from_end=True)
        self._log_start = file_size(self.log_path)  # the log is appended to: earlier attempts are above this
        with self.log_path.open("ab") as log:  # the child has its own handle; ours can go at once
            self.process = processes.start(argv, log, child_env(cuda_visible_devices))
        self.tree = processes.ProcessTree(self.process)

    def running(self) -> bool:
        """Is the launcher still running? (Its exit status is collected by `wait` or `stop`, see ProcessTree.)"""
        self.tree.refresh(force=False)  # meet the launcher's children while they are still its children
        return not self.tree.root_exited()

    def read_events(self) -> list[dict]:
        events = self._events.read_new()
        for event in events:
            self.seen.add(event)
        return events

    def stop(self, on_event: Callable[[dict], None] | None = None) -> None:
        """Ask the trainer to stop (it saves a checkpoint), give it `seen.grace_s()`, then kill what is left.

        Events keep flowing to `on_event` meanwhile, so the `checkpoint` and `cancelled` events reach the node.
        An exception from `on_event` ends the delivery and is raised once the trainer is gone.
        """
        request_stop(self.run_dir)
        failure: BaseException | None = None

        def deliver() -> None:
            nonlocal failure
            for event in self.read_events():
                if on_event is None or failure is not None:
                    continue
                try:
                    on_event(event)
                except BaseException as error:  # noqa: B036 - ComfyUI's interrupt too: it is raised below
                    failure = error

        deliver()
        deadline = time.monotonic() + self.seen.grace_s()
        while time.monotonic() < deadline and self.tree.alive(force=False):
            time.sleep(POLL_S)
            deliver()
        self.tree.kill()
        deliver()
        if failure is not None:
            raise failure

    def wait(self) -> int:
        """The launcher's exit code, once no process of the tree is left (a stray child is killed)."""
        self.tree.wait_root()
        self.tree.kill()
        return self.process.wait()

    def failure(self, code: int) -> str:
        """One line for a kill by the system or a stop; otherwise the error event's message, or the log tail."""
        if killed_by_system(code, self.attempt_log()):
            return (
                "the trainer was killed by the system (SIGKILL; on Linux usually the out-of-memory killer) "
                + self.seen.where()
            )
        if self.seen.cancelled is not None:
            return f"the trainer stopped{stop_reason(self.seen.cancelled)} " + self.seen.where()
        detail = self.seen.error["message"] if self.seen.error else self.log_tail()
        return f"the trainer exited with code {code}: {detail}"

    def attempt_log(self) -> str:
        """The end of what this attempt wrote to the log (earlier attempts' lines are not its story)."""
        try:
            with self.log_path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_start, end - LOG_READ_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.attempt_log().splitlines()[-lines:])


def wait_for_run_folder(run_dir: Path, interrupted: Callable[[], bool], on_event: Callable[[dict], None],
                        timeout: float = BUSY_WAIT_S) -> bool:
    """Wait while another trainer holds `run_dir` (trainer/run_lock.py). False when interrupted meanwhile;
    TrainerFailed when it is still there after `timeout`."""
    if not run_folder_busy(run_dir):
        return True
    on_event({"type": "waiting", "run_dir": str(run_dir)})
    deadline = time.monotonic() + timeout
    while run_folder_busy(run_dir):
        if interrupted():
            return False
        if time.monotonic() > deadline:
            raise TrainerFailed(f"another trainer is still running in {run_dir} after {timeout:.0f} s (started "
                                "outside this ComfyUI, or not stopping): wait for it, or stop it by creating "
                                f"{run_dir / 'stop'}")
        time.sleep(POLL_S)
    return True


def follow(trainer: TrainerProcess, on_event: Callable[[dict], None], interrupted: Callable[[], bool]) -> bool:
    """Feed this attempt's events to `on_event` until the trainer exits; stop it when `interrupted()`.

    Returns False when stopped by an interrupt. Raises TrainerFailed on a non-zero exit: one line for a
    trainer killed by the system or stopped from outside, else the message of the trainer's error event, or
    the tail of its log when it died without one.
    """
    try:
        exited = watch(trainer, on_event, interrupted)
    except BaseException:  # ComfyUI's progress hook raises on interrupt: the trainer must not outlive it
        trainer.stop()
        raise
    if not exited:
        trainer.stop(on_event)
        return False
    code = trainer.wait()
    for event in trainer.read_events():
        on_event(event)
    if code != 0:
        raise TrainerFailed(trainer.failure(code))
    return True


def watch(trainer: TrainerProcess, on_event: Callable[[dict], None], interrupted: Callable[[], bool]) -> bool:
    """Deliver events until the launcher exits (True) or `interrupted()` (False)."""
    while trainer.running():
        for event in trainer.read_events():
            on_event(event)
        if interrupted():
            return False
        time.sleep(POLL_S)
    return True
