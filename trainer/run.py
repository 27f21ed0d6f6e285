"""Entry point: `accelerate launch [flags] trainer/run.py --config RUN_DIR/config.json`.

Exit codes: 0 done; 1 failed (an `error` event says why); 2 invalid config; 128+signal when stopped by
SIGTERM/SIGINT (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: make the package importable whatever the folder is called
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.events import EventLog  # noqa: E402
from trainer.run_lock import RunFolderBusy, hold_run_folder  # noqa: E402
from trainer.stop import StopWatch, parent_pid_from_env  # noqa: E402

EXIT_FAILED, EXIT_CONFIG = 1, 2


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def report_config_error(config_path: str, error: ConfigError) -> None:
    print(error, file=sys.stderr)
    try:
        run_dir = json.loads(Path(config_path).read_text())["run_dir"]
    except Exception:
        return
    if isinstance(run_dir, str) and run_dir and is_main_process():
        log = EventLog(Path(run_dir) / "events.jsonl")
        log.emit("error", kind="ConfigError", message=str(error), problems=error.problems)
        log.close()


def failure_message(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return (
            f"out of memory: {exc}. Lower train.batch_size, turn on train.gradient_checkpointing, "
            "or lower data.resolution"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where}: free some space and run again (files written before are intact)"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a LoRA from a LoRA Foundry run config.")
    parser.add_argument("--config", required=True, help="path to RUN_DIR/config.json")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        report_config_error(args.config, error)
        return EXIT_CONFIG

    if is_main_process():
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        try:
            lock = hold_run_folder(cfg.run_dir)  # noqa: F841 - held until the process ends
        except RunFolderBusy as busy:
            print(f"error: {busy}", file=sys.stderr)  # not into the events log: it is the other trainer's
            return EXIT_FAILED

    from trainer.loop import Cancelled, Trainer

    stop = StopWatch(cfg.run_dir, parent_pid_from_env())
    stop.exit_at_once_until_work_is_kept()
    events = EventLog(Path(cfg.run_dir) / "events.jsonl", enabled=is_main_process())
    trainer = Trainer(cfg, events, stop.requested, keep_work=stop.keep_work)
    began = time.time()
    try:
        trainer.setup()
        lora = trainer.train()
        events.emit("done", lora=str(lora), steps=trainer.steps_done, seconds=round(time.time() - began, 3))
        return 0
    except Cancelled:
        if trainer.steps_done > trainer.start_step:
            trainer.save_checkpoint(trainer.steps_done)
        events.emit("cancelled", step=trainer.steps_done, signal=stop.signum, reason=stop.reason)
        return 128 + (stop.signum or signal.SIGTERM)
    except Exception as exc:
        message = failure_message(exc)
        tail = traceback.format_exc().splitlines()[-25:]
        events.emit("error", kind=type(exc).__name__, message=message, traceback="\n".join(tail))
        print(f"error: {message}", file=sys.stderr)
        traceback.print_exc()
        return EXIT_FAILED
    finally:
        events.close()


if __name__ == "__main__":
    sys.exit(main())
