"""nodes/launch.py and nodes/processes.py with real child processes: small python scripts that stand in for the
trainer (they write events.jsonl the way it does) and, where the launcher's own behaviour matters, a real
`accelerate launch`."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import free_port, tiny_config, write_config

ROOT = Path(__file__).resolve().parent.parent


def import_launch() -> types.ModuleType:
    """nodes/launch.py without ComfyUI: the pack's and nodes/ package __init__ files import ComfyUI, so bare
    packages stand in for them and launch.py's relative imports (..trainer, .processes) resolve as in the pack."""
    pack = types.ModuleType("lora_foundry_pack")
    pack.__path__ = [str(ROOT)]
    nodes = types.ModuleType("lora_foundry_pack.nodes")
    nodes.__path__ = [str(ROOT / "nodes")]
    sys.modules.setdefault("lora_foundry_pack", pack)
    sys.modules.setdefault("lora_foundry_pack.nodes", nodes)
    return importlib.import_module("lora_foundry_pack.nodes.launch")


launch = import_launch()
processes = importlib.import_module("lora_foundry_pack.nodes.processes")

# What every stand-in trainer starts with: RUN_DIR from argv, and emit() writing events as trainer/events.py does.
PRELUDE = """
import json, os, subprocess, sys, time
from pathlib import Path
RUN_DIR = Path(sys.argv[1])
STOP = RUN_DIR / "stop"

def emit(type, **fields):
    with open(RUN_DIR / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": type, "time": round(time.time(), 3), **fields}) + "\\n")

def start_grandchild():
    # a process of the trainer's own, like a dataloader worker: it must not outlive the run
    return subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(0.1)"])

def write_pids(*pids):
    (RUN_DIR / "pids.tmp").write_text(json.dumps(pids))
    os.replace(RUN_DIR / "pids.tmp", RUN_DIR / "pids.json")
"""

# POSIX-only names the node must not touch where Windows goes (Windows has none of them).
POSIX_ONLY = [
    (os, "killpg"),
    (os, "getpgid"),
    (os, "getsid"),
    (os, "setsid"),
    (os, "setpgid"),
    (os, "getpgrp"),
    (signal, "SIGKILL"),
    (signal, "SIGHUP"),
    (signal, "SIGQUIT"),
]


_started: list[launch.TrainerProcess] = []
_met: list[psutil.Process] = []


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failing test must not leave its stand-ins running (their grandchildren loop forever)."""
    yield
    for trainer in _started:
        trainer.tree.kill(timeout=5)
    for process in _met:
        if processes.running(process):
            process.kill()
    _started.clear()
    _met.clear()


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(PRELUDE + body, encoding="utf-8")
    return path


def start(tmp_path: Path, body: str, run_dir: Path | None = None) -> launch.TrainerProcess:
    """A TrainerProcess of a stand-in trainer, run by python directly (no accelerate: a quicker start)."""
    run_dir = run_dir or tmp_path / "run"
    argv = [sys.executable, str(script(tmp_path, "trainer", body)), str(run_dir)]
    return started(launch.TrainerProcess(argv, run_dir, None))


def started(trainer: launch.TrainerProcess) -> launch.TrainerProcess:
    _started.append(trainer)
    return trainer


def accelerate_start(tmp_path: Path, body: str, num_processes: int) -> launch.TrainerProcess:
    """The node's own `accelerate launch` argv, with a stand-in script in place of trainer/run.py."""
    run_dir = tmp_path / "run"
    argv = launch.launch_argv(run_dir / "config.json", num_processes, None)
    assert argv[-3:] == [str(launch.RUN_PY), "--config", str(run_dir / "config.json")]
    flags = ["--main_process_port", str(free_port())] if num_processes > 1 else []  # never a neighbour's port
    argv = argv[:-3] + flags + [str(script(tmp_path, "trainer", body)), str(run_dir)]
    return started(launch.TrainerProcess(argv, run_dir, None))


def tree_of(run_dir: Path, timeout: float = 30) -> list[psutil.Process]:
    """The stand-in's processes still there, by the pids it wrote (as psutil.Process: a pid reused later cannot
    pass for one of them)."""
    path = run_dir / "pids.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the stand-in trainer never wrote its pids"
        time.sleep(0.05)
    found = []
    for pid in json.loads(path.read_text()):
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue  # gone already
    _met.extend(found)
    return found


def alive(process_list: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has exited (this container's init need not collect orphans)."""
    return [p for p in process_list if processes.running(p)]


def when_seen(kind: str, seen: list[dict]) -> Callable[[], bool]:
    """An `interrupted` for follow(): true once an event of `kind` has been delivered."""
    return lambda: any(e["type"] == kind for e in seen)


@pytest.fixture
def like_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's Windows path, as far as it runs on this machine (Windows itself cannot run here).

    Mocked, and why:
    - processes.WINDOWS = True: processes.py takes its Windows branches (CREATE_NEW_PROCESS_GROUP, no session
      sweep). os.name itself stays: the standard library would break.
    - subprocess.CREATE_NEW_PROCESS_GROUP = 0: the constant exists only on Windows, and POSIX Popen refuses any
      non-zero creationflags, so the Windows branch runs as written with a flag that does nothing here.
    - the POSIX-only names are deleted from os and signal, so any use of them on that path fails here as it
      would on Windows (the old code: os.killpg in stop(), signal.SIGKILL in wait()).
    - psutil.Process.kill: psutil's POSIX kill reads signal.SIGKILL, its Windows one calls TerminateProcess;
      the stand-in does what TerminateProcess does, with the number, since the name is gone.
    """
    monkeypatch.setattr(processes, "WINDOWS", True)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0, raising=False)
    for module, name in POSIX_ONLY:
        monkeypatch.delattr(module, name, raising=False)

    def terminate(self: psutil.Process) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            raise psutil.NoSuchProcess(self.pid) from None

    monkeypatch.setattr(psutil.Process, "kill", terminate)


# ---- (a) Windows: cancel stops the whole tree, and a finished run raises nothing --------------------------

IGNORES_STOP = """
worker = start_grandchild()
write_pids(os.getpid(), worker.pid)
emit("start", total_steps=100, start_step=0)
emit("step", step=1, total_steps=100)
while True:  # a trainer stuck in a unit of work: it never looks at the stop file
    time.sleep(0.1)
"""


def test_cancel_on_windows_kills_the_whole_tree(tmp_path, like_windows, monkeypatch) -> None:
    monkeypatch.setattr(launch, "STOP_FLOOR_S", 1.0)  # this stand-in never stops: no need to wait 15 s for that
    seen: list[dict] = []
    trainer = start(tmp_path, IGNORES_STOP)
    tree = tree_of(tmp_path / "run")
    assert len(alive(tree)) == 2

    assert launch.follow(trainer, seen.append, when_seen("step", seen)) is False
    assert (tmp_path / "run" / "stop").exists(), "the trainer was not asked to stop"
    assert alive(tree) == [], "a process of the cancelled run is still running"
    assert trainer.process.returncode is not None


FINISHES_LEAVING_A_WORKER = """
worker = start_grandchild()
write_pids(os.getpid(), worker.pid)
emit("start", total_steps=1, start_step=0)
emit("step", step=1, total_steps=1)
time.sleep(2.5)  # the node meets the worker while it still has a parent (it looks every 1 s)
emit("done", steps=1)
"""  # and exits 0 without ending its worker: orphaned, it keeps running


def test_finished_run_on_windows_raises_nothing_and_leaves_no_process(tmp_path, like_windows) -> None:
    seen: list[dict] = []
    trainer = start(tmp_path, FINISHES_LEAVING_A_WORKER)
    tree = tree_of(tmp_path / "run")

    assert launch.follow(trainer, seen.append, lambda: False) is True
    assert [e["type"] for e in seen] == ["start", "step", "done"]
    assert trainer.process.returncode == 0
    assert alive(tree) == [], "the finished run left a process behind"


ORPHANS_AT_ONCE = """
worker = start_grandchild()
write_pids(worker.pid)
emit("done", steps=0)
"""  # exits at once: the worker may be re-parented before the node ever sees it as a child


@pytest.mark.skipif(os.name == "nt", reason="the session sweep is the POSIX safety net")
def test_worker_orphaned_at_once_does_not_outlive_the_run(tmp_path) -> None:
    trainer = start(tmp_path, ORPHANS_AT_ONCE)
    assert launch.follow(trainer, lambda e: None, lambda: False) is True
    assert alive(tree_of(tmp_path / "run")) == [], "the finished run left its worker running"


# ---- (b) a re-queued run shows only its own progress ----------------------------------------------------

NEW_ATTEMPT = """
emit("start", total_steps=6, start_step=3)
emit("step", step=4, total_steps=6, loss=0.4)
emit("done", steps=4)
"""


def test_requeued_run_shows_only_its_own_events(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = [{"type": "start", "time": 1.0, "total_steps": 6, "start_step": 0}]
    old += [{"type": "step", "time": 2.0 + s, "step": s, "total_steps": 6, "loss": 1.0} for s in (1, 2, 3)]
    torn = '{"type": "step", "time": 9.0, "st'  # the dead attempt was killed mid-line
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old) + torn)
    seen: list[dict] = []

    assert launch.follow(start(tmp_path, NEW_ATTEMPT, run_dir), seen.append, lambda: False) is True
    assert [e["type"] for e in seen] == ["start", "step", "done"]
    assert seen[0]["start_step"] == 3 and seen[1]["step"] == 4  # the new attempt's, not the old steps 1-3


RECORDS_ITS_START = """
(RUN_DIR / "started.json").write_text(json.dumps({"stop_file": STOP.exists(),
                                                  "parent": os.environ.get("LORA_FOUNDRY_PARENT_PID")}))
emit("done", steps=0)
"""


def test_requeued_run_after_cancel_is_not_stopped_and_knows_its_parent(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stop").write_text("stop requested\n")  # what the cancelled attempt left

    assert launch.follow(start(tmp_path, RECORDS_ITS_START, run_dir), lambda e: None, lambda: False) is True
    started = json.loads((run_dir / "started.json").read_text())
    assert started == {"stop_file": False, "parent": str(os.getpid())}


# ---- (c) a trainer killed by the system says so in one line ---------------------------------------------

KILLED_BY_OOM = """
rank = int(os.environ.get("RANK", "0"))
if rank == 0:
    emit("start", total_steps=100, start_step=0)
    for step in range(1, 13):
        emit("step", step=step, total_steps=100, loss=0.5)
        if step == 10:
            emit("checkpoint", step=10, path=str(RUN_DIR / "checkpoints" / "step-10"))
    (RUN_DIR / "rank0-wrote").write_text("")
while not (RUN_DIR / "rank0-wrote").exists():
    time.sleep(0.05)
if rank == int(os.environ.get("WORLD_SIZE", "1")) - 1:
    os.kill(os.getpid(), 9)  # what the out-of-memory killer does
time.sleep(60)
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL and the out-of-memory killer are POSIX")
@pytest.mark.parametrize("num_processes", [1, 2], ids=["simple-launcher", "torch-elastic"])
def test_system_kill_is_one_line_with_step_and_checkpoint(tmp_path, num_processes) -> None:
    trainer = accelerate_start(tmp_path, KILLED_BY_OOM, num_processes)
    with pytest.raises(launch.TrainerFailed) as failed:
        launch.follow(trainer, lambda e: None, lambda: False)

    message = str(failed.value)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-10"
    assert message == (
        "the trainer was killed by the system (SIGKILL; on Linux usually the out-of-memory killer) at step 12; "
        f"checkpoint step 10 is kept ({checkpoint}): queue again to resume"
    )
    assert trainer.process.returncode == 1  # what accelerate's launcher exits with: the code alone says nothing


FAILS_PLAINLY = """
emit("error", kind="ValueError", message="ValueError: bad caption file")
sys.exit(1)
"""


def test_earlier_attempts_kill_in_the_log_is_not_blamed_for_a_new_failure(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trainer.log").write_text(
        "subprocess.CalledProcessError: Command '['python', 'run.py']' died with <Signals.SIGKILL: 9>.\n"
    )
    with pytest.raises(launch.TrainerFailed) as failed:
        launch.follow(start(tmp_path, FAILS_PLAINLY, run_dir), lambda e: None, lambda: False)
    assert str(failed.value) == "the trainer exited with code 1: ValueError: bad caption file"


# ---- (d) cancel gives the trainer the time to save -----------------------------------------------------

SLOW_SAVE = """
write_pids(os.getpid())
emit("start", total_steps=100, start_step=0)
emit("step", step=1, total_steps=100, loss=0.5)
while not STOP.exists():
    time.sleep(0.05)
time.sleep(6)  # saving: longer than the 3 s the old stop() gave before SIGKILL
emit("checkpoint", step=1, path=str(RUN_DIR / "checkpoints" / "step-1"))
emit("cancelled", step=1, signal=None, reason="stop file stop")
sys.exit(128 + 15)
"""


def test_cancel_waits_for_a_slow_save_and_delivers_its_events(tmp_path) -> None:
    seen: list[dict] = []
    trainer = start(tmp_path, SLOW_SAVE)
    tree = tree_of(tmp_path / "run")
    began = time.monotonic()

    assert launch.follow(trainer, seen.append, when_seen("step", seen)) is False
    assert time.monotonic() - began >= 6
    assert [e["type"] for e in seen][-2:] == ["checkpoint", "cancelled"]
    assert trainer.process.returncode == 128 + 15, "the trainer was killed instead of finishing its save"
    assert alive(tree) == []


def test_cancel_of_the_real_trainer_keeps_a_checkpoint(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """The same path with trainer/run.py on the tiny model: it sees the stop file, saves, says `cancelled`."""
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100_000})
    trainer = started(launch.TrainerProcess(launch.launch_argv(write_config(cfg), 1, None), tmp_path / "run", None))
    seen: list[dict] = []

    def steps() -> int:
        return sum(e["type"] == "step" for e in seen)

    assert launch.follow(trainer, seen.append, lambda: steps() >= 2) is False
    checkpoint, cancelled = [e for e in seen if e["type"] in ("checkpoint", "cancelled")][-2:]
    assert (checkpoint["type"], cancelled["type"]) == ("checkpoint", "cancelled")
    assert checkpoint["step"] == cancelled["step"] >= 2
    assert Path(checkpoint["lora"]).is_file()
    assert alive(list(trainer.tree.members)) == [], "a process of the cancelled run is still running"


STOPS_AT_ONCE = """
write_pids(os.getpid())
emit("start", total_steps=100, start_step=0)
emit("step", step=1, total_steps=100, loss=0.5)
while not STOP.exists():
    time.sleep(0.05)
emit("cancelled", step=1, signal=None, reason="stop file stop")
sys.exit(128 + 15)
"""


class Interrupted(Exception):
    """Stands in for ComfyUI's InterruptProcessingException, which its progress hook raises."""


def test_interrupt_raised_by_the_progress_hook_still_stops_the_trainer(tmp_path) -> None:
    def progress(event: dict) -> None:
        if event["type"] == "step":
            raise Interrupted

    trainer = start(tmp_path, STOPS_AT_ONCE)
    tree = tree_of(tmp_path / "run")
    with pytest.raises(Interrupted):
        launch.follow(trainer, progress, lambda: False)
    assert trainer.process.returncode == 128 + 15, "the trainer was not stopped through its stop file"
    assert alive(tree) == []


def test_stop_grace_covers_the_longest_step_not_the_samples_between() -> None:
    seen = launch.Seen()
    assert seen.grace_s() == launch.STOP_FLOOR_S == 15.0  # loading, caching: short units, nothing trained yet
    seen.add({"type": "start", "time": 100.0})
    assert seen.grace_s() == 15.0 + 3 * 15.0  # the first step: not timed yet, taken as a 15 s CPU step
    for kind, at in [("step", 120.0), ("step", 145.0), ("sample", 400.0), ("step", 410.0)]:
        seen.add({"type": kind, "time": at, "step": 1})
    # 25 s was the longest step; the 255 s of validation samples are stopped between sampling steps
    assert seen.longest_step_s == 25.0
    assert seen.grace_s() == launch.STOP_FLOOR_S + launch.STOP_STEP_FACTOR * 25.0 == 90.0
