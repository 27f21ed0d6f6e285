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
    assert trainer.process.returncode == 128 + 9  # the launcher passes the rank's end on (trainer/launcher.py)


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
    assert seen.grace_s() == launch.UNHEARD_GRACE_S == 3.0  # still launching: nothing to save
    seen.add({"type": "loading", "time": 90.0})
    assert seen.grace_s() == launch.STOP_FLOOR_S == 15.0  # loading, caching: short units, nothing trained yet
    seen.add({"type": "start", "time": 100.0})
    assert seen.grace_s() == 15.0 + 3 * 15.0  # the first step: not timed yet, taken as a 15 s CPU step
    for kind, at in [("step", 120.0), ("step", 145.0), ("sample", 400.0), ("step", 410.0)]:
        seen.add({"type": kind, "time": at, "step": 1})
    # 25 s was the longest step; the 255 s of validation samples are stopped between sampling steps
    assert seen.longest_step_s == 25.0
    assert seen.grace_s() == launch.STOP_FLOOR_S + launch.STOP_STEP_FACTOR * 25.0 == 90.0


# ---- (f) launches that cannot form their group leave nothing running; two machines on this one -----------

TWO_MACHINES = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 2
machine_rank: {rank}
num_processes: 2
main_process_ip: 127.0.0.1
main_process_port: {port}
same_network: true
rdzv_backend: static
mixed_precision: 'no'
"""


def test_the_node_launches_through_the_watched_launcher(tmp_path) -> None:
    argv = launch.launch_argv(tmp_path / "config.json", 2, None)
    assert argv[:2] == [sys.executable, str(launch.LAUNCHER_PY)]
    assert argv[-3:] == [str(launch.RUN_PY), "--config", str(tmp_path / "config.json")]
    # an accelerate config decides machines and processes: no flag of ours overrides it
    with_file = launch.launch_argv(tmp_path / "config.json", 1, tmp_path / "accelerate.yaml")
    assert "--num_machines" not in with_file and "--num_processes" not in with_file
    assert with_file[with_file.index("--config_file") + 1] == str(tmp_path / "accelerate.yaml")


def machine_configs(tmp_path: Path) -> list[Path]:
    """The accelerate config files of a group of two machines (one process each) on this one."""
    port = free_port()
    paths = []
    for rank in (0, 1):
        path = tmp_path / f"machine{rank}.yaml"
        path.write_text(TWO_MACHINES.format(rank=rank, port=port), encoding="utf-8")
        paths.append(path)
    return paths


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_listening(port: int, tree: processes.ProcessTree, timeout: float = 120) -> None:
    """Until the group's main process is up and waiting for the others (it serves the rendezvous port)."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        assert tree.alive(), "the launch ended before it reached the rendezvous"
        assert time.monotonic() < deadline, "the rendezvous port never opened"
        time.sleep(0.2)


def port_of(config: Path) -> int:
    return int(next(line.split(":")[1] for line in config.read_text().splitlines()
                    if line.startswith("main_process_port")))


def gone_within(tree: processes.ProcessTree, seconds: float) -> float:
    """Seconds until no process of `tree` runs; fails after `seconds`."""
    began = time.monotonic()
    while tree.alive():
        assert time.monotonic() - began < seconds, f"still running after {seconds} s: {tree.alive()}"
        time.sleep(0.1)
    return time.monotonic() - began


def test_two_machines_on_this_one_train_what_one_process_trains(tmp_path, tiny_model_dir, two_image_folder) -> None:
    """accelerate's multi-machine launch (2 machines x 1 process, gloo, machine ranks 0 and 1): machine 0 as
    the Train node launches it with an accelerate config from the user folder, machine 1 as the README's
    command; each has its own run folder and cache, as two machines would. Their LoRA is 1 process x batch 2's."""
    from conftest import run_trainer

    machine0, machine1 = machine_configs(tmp_path)
    one = tiny_config(tmp_path / "one", tiny_model_dir, two_image_folder, train={"batch_size": 2})
    parts = [tiny_config(tmp_path / f"m{rank}", tiny_model_dir, two_image_folder, train={"batch_size": 1})
             for rank in (0, 1)]
    trainer0 = started(launch.TrainerProcess(launch.launch_argv(write_config(parts[0]), 1, machine0),
                                             tmp_path / "m0", None))
    second = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(machine1), str(launch.RUN_PY),
         "--config", str(write_config(parts[1]))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        seen: list[dict] = []
        assert launch.follow(trainer0, seen.append, lambda: False) is True
        assert second.wait(timeout=300) == 0
    finally:
        second.kill()
    start_event = next(e for e in seen if e["type"] == "start")
    assert start_event["processes"] == 2
    assert not Path(parts[1]["output"]["lora_path"]).exists(), "machine 1 wrote a LoRA: only the main one saves"
    assert run_trainer(one).returncode == 0
    a, b = (load_lora(cfg) for cfg in (one, parts[0]))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k) > 1e-4  # and it did train


def load_lora(cfg: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(cfg["output"]["lora_path"])


def test_a_launch_waiting_for_a_machine_that_never_comes_is_gone_within_seconds_of_a_cancel(
        tmp_path, two_image_folder) -> None:
    # machine 1 never starts: machine 0's launcher waits in the rendezvous, where nothing reads the stop file
    machine0, _ = machine_configs(tmp_path)
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder)
    trainer = started(launch.TrainerProcess(launch.launch_argv(write_config(cfg), 1, machine0), tmp_path / "run",
                                            None))
    wait_listening(port_of(machine0), trainer.tree)
    began = time.monotonic()
    trainer.stop()
    assert time.monotonic() - began < 8, "the cancel waited for a launch that had nothing to save"
    assert trainer.tree.alive() == []


def sleeper() -> subprocess.Popen:
    """A stand-in for ComfyUI: the process the trainer's launch watches."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_launch_waiting_in_the_rendezvous_ends_when_comfyui_is_killed(tmp_path, two_image_folder) -> None:
    machine0, _ = machine_configs(tmp_path)
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder)
    comfyui = sleeper()
    env = dict(launch.child_env(None), **{launch.PARENT_PID_ENV: str(comfyui.pid)})
    with (tmp_path / "trainer.log").open("ab") as log:
        popen = processes.start(launch.launch_argv(write_config(cfg), 1, machine0), log, env)
    tree = processes.ProcessTree(popen)
    try:
        wait_listening(port_of(machine0), tree)
        comfyui.kill()
        comfyui.wait()
        gone_within(tree, 8)
    finally:
        tree.kill(timeout=5)
        comfyui.kill()


def rank_zero_of_two(tmp_path: Path, config: Path, port: int, parent_pid: int) -> subprocess.Popen:
    """trainer/run.py as rank 0 of a group of two whose rank 1 never comes: it blocks in the group's
    rendezvous (inside C++, where Python's signal handlers do not run), hosting the store on `port`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{launch.PARENT_PID_ENV: str(parent_pid)})
    return subprocess.Popen([sys.executable, str(launch.RUN_PY), "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is POSIX; Windows ends a process with TerminateProcess")
@pytest.mark.parametrize("stop", ["SIGTERM", "stop file", "parent killed"])
def test_a_rank_asleep_in_the_rendezvous_ends_at_once_on_any_stop(tmp_path, two_image_folder, stop: str) -> None:
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder)
    port, comfyui = free_port(), sleeper()
    rank = rank_zero_of_two(tmp_path, write_config(cfg), port, comfyui.pid)
    tree = processes.ProcessTree(rank)
    try:
        wait_listening(port, tree)
        if stop == "SIGTERM":
            rank.send_signal(signal.SIGTERM)  # what torch's launcher sends a group whose member failed
        elif stop == "stop file":
            (tmp_path / "run" / "stop").write_text("stop requested\n")
        else:
            comfyui.kill()
        assert rank.wait(timeout=5) in (-signal.SIGTERM, 128 + signal.SIGTERM)
    finally:
        rank.kill()
        comfyui.kill()


SLOW_STEP_TWO_RANKS = """
rank = int(os.environ.get("RANK", "0"))
(RUN_DIR / f"rank{rank}.pid").write_text(str(os.getpid()))
if rank == 0:
    emit("start", total_steps=100, start_step=0)
    emit("step", step=1, total_steps=100, loss=0.5)
step = 1
while True:
    time.sleep(4)  # a slow step: the stop file is looked at only between steps, by every rank
    step += 1
    if STOP.exists():
        if rank == 0:
            emit("cancelled", step=step, signal=None, reason="stop file stop")
        sys.exit(128 + 15)
    if rank == 0:
        emit("step", step=step, total_steps=100, loss=0.5)
"""


def test_a_cancel_stops_every_rank_of_a_multi_process_run_within_the_grace(tmp_path) -> None:
    trainer = accelerate_start(tmp_path, SLOW_STEP_TWO_RANKS, 2)
    pid_files = [tmp_path / "run" / f"rank{r}.pid" for r in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)
    ranks = [psutil.Process(int(f.read_text())) for f in pid_files]
    _met.extend(ranks)
    seen: list[dict] = []
    began = time.monotonic()
    assert launch.follow(trainer, seen.append, when_seen("step", seen)) is False
    assert alive(ranks) == [], "a rank outlived the cancel"
    assert time.monotonic() - began < 60
    assert [e["type"] for e in seen][-1] == "cancelled", "the ranks were killed instead of stopping"


HOLDS_THE_RUN_FOLDER = """
from filelock import FileLock
lock = FileLock(RUN_DIR / "trainer.lock")
lock.acquire()
write_pids(os.getpid())
time.sleep(600)
"""


def test_a_second_trainer_on_a_busy_run_folder_waits_for_the_first_or_refuses(tmp_path, two_image_folder) -> None:
    """ComfyUI restarted and the prompt queued again while the first trainer was still saving: the node waits for
    the folder; a trainer started anyway refuses, leaving the first one's events alone."""
    run_dir = tmp_path / "run"
    first = start(tmp_path, HOLDS_THE_RUN_FOLDER, run_dir)
    (holder,) = tree_of(run_dir)
    cfg = tiny_config(run_dir, tmp_path / "model-never-read", two_image_folder)
    events_before = (run_dir / "events.jsonl").read_bytes() if (run_dir / "events.jsonl").exists() else b""
    result = subprocess.run([sys.executable, str(launch.RUN_PY), "--config", str(write_config(cfg))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "another trainer is running in" in result.stderr, result.stderr
    after = (run_dir / "events.jsonl").read_bytes() if (run_dir / "events.jsonl").exists() else b""
    assert after == events_before

    seen: list[dict] = []
    with pytest.raises(launch.TrainerFailed, match="another trainer is still running"):
        launch.wait_for_run_folder(run_dir, lambda: False, seen.append, timeout=1.0)
    assert [e["type"] for e in seen] == ["waiting"]
    assert launch.wait_for_run_folder(run_dir, lambda: True, seen.append, timeout=60) is False  # interrupted

    holder.kill()  # however the first one ends, the OS frees its lock
    first.tree.kill(timeout=5)
    assert launch.wait_for_run_folder(run_dir, lambda: False, seen.append, timeout=10) is True


def launcher_argv(config: Path, *flags: str) -> list[str]:
    """The trainer run by hand through trainer/launcher.py: accelerate launch's flags, the trainer's codes."""
    return [sys.executable, str(launch.LAUNCHER_PY), "--num_machines", "1", "--num_processes", "1",
            "--mixed_precision", "no", *flags, str(launch.RUN_PY), "--config", str(config)]


def test_an_invalid_config_exits_2_through_the_launcher_with_only_its_message(tmp_path, two_image_folder) -> None:
    # accelerate launch itself exits 1 and prints its own traceback over the trainer's message
    cfg = tiny_config(tmp_path / "run", tmp_path / "model-never-read", two_image_folder, lora={"rank": 0})
    result = subprocess.run(launcher_argv(write_config(cfg)), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lora.rank: 1 or more" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is POSIX")
def test_sigterm_to_the_launcher_stops_the_trainer_with_a_checkpoint(tmp_path, tiny_model_dir,
                                                                    two_image_folder) -> None:
    # accelerate's one-process launcher died of it and left the trainer running (exit -15)
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, train={"max_steps": 100_000})
    process = subprocess.Popen(launcher_argv(write_config(cfg)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    tree = processes.ProcessTree(process)
    try:
        events = tmp_path / "run" / "events.jsonl"
        deadline = time.monotonic() + 300
        while '"type": "step"' not in (events.read_text() if events.exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, "the trainer never stepped"
            time.sleep(0.1)
        tree.refresh()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
        assert "Traceback" not in process.stderr.read()
        assert tree.alive() == []
        kinds = [e["type"] for e in map(json.loads, events.read_text().splitlines())]
        assert kinds[-2:] == ["checkpoint", "cancelled"], kinds[-5:]
    finally:
        tree.kill(timeout=5)
