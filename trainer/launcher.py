"""`accelerate launch`, with three things added, for the node and for anyone who runs the trainer by hand:

    python trainer/launcher.py [accelerate launch flags] trainer/run.py --config RUN_DIR/config.json

- It ends when the process that started it is gone (LORA_FOUNDRY_PARENT_PID): torch's launcher, waiting in the
  rendezvous for the other machines of a group (or for ranks that never come), blocks until its timeout and
  notices nothing else, so a killed ComfyUI would leave it behind holding the port. The ranks watch the same
  parent themselves (trainer/stop.py): a stop during training still saves a checkpoint first.
- SIGTERM or SIGINT to it reaches the trainer: accelerate's one-process launcher would die and leave the
  trainer running.
- Its exit code is the trainer's (trainer/run.py: 2 invalid config, 128+signal stopped, 128+9 killed by the
  system ...), with no traceback over the trainer's message: accelerate turns every failure into 1 and prints
  its own stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the package importable whatever the folder is called
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from trainer.stop import PARENT_CHECK_EVERY_S, ParentWatch, parent_pid_from_env  # noqa: E402


def exit_when_parent_gone(parent: ParentWatch) -> None:
    while not parent.gone():
        threading.Event().wait(PARENT_CHECK_EVERY_S)
    os._exit(128 + signal.SIGTERM)


def pass_on(signum: int, _frame: object) -> None:
    """The trainer decides what a stop means (save, or end at once): the signal goes to it."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.Error:
            continue


def exit_status(returncode: int) -> int:
    """A child ended by signal N (a negative return code) exits as a shell reports it, 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def launch() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        accelerate_launch()
    except subprocess.CalledProcessError as failed:  # the one-process launcher
        return exit_status(failed.returncode)
    except ChildFailedError as failed:  # torch's launcher (several processes): the first rank that failed
        rank, failure = failed.get_first_failure()
        print(f"launcher: rank {rank} exited with {failure.exitcode}", file=sys.stderr)
        return exit_status(failure.exitcode)
    except SignalException as stopped:  # torch's launcher was signalled and stopped its ranks
        return 128 + int(stopped.sigval)
    return 0


def main() -> int:
    threading.Thread(target=exit_when_parent_gone, args=(ParentWatch(parent_pid_from_env()),),
                     name="parent-watch", daemon=True).start()
    if os.name != "nt":  # Windows: a console's Ctrl-C reaches the trainer itself, and send_signal would kill it
        for name in ("SIGTERM", "SIGINT"):
            signal.signal(getattr(signal, name), pass_on)
    sys.argv = ["accelerate launch", *sys.argv[1:]]
    return launch()


if __name__ == "__main__":
    sys.exit(main())
