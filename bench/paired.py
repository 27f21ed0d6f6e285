"""ours against floor in one process: `python bench/paired.py` (about 3 minutes on 2 cores at 256 px).

On a shared machine the speed of separate processes drifts by more than the few percent `ours / floor`
is about. Here the trainer's own step loop (its Trainer class, set up from the same config the benchmark
gives `ours`) and the floor's bare step (forward, MSE, backward, AdamW on fixed inputs, on the very UNet and
optimizer the trainer prepared) take turns, step by step, so the two differ only in what the loop does
around the UNet. Writes bench/results-paired.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH, Spec, draw_dataset, read_events, steady, trainer_step_times  # noqa: E402


def paired_steps(spec: Spec, run_dir: Path) -> tuple[list[float], list[float]]:
    """Step durations of the trainer's own loop and of the floor's bare step, taken turn about.

    Before each of its steps the trainer calls `check_stop_together`; wrapped here, that call first runs and
    times one bare step on the trainer's prepared UNet and optimizer. A trainer step is then the interval
    between its step events less the bare step inside it, and drift in the machine's speed hits both alike.
    """
    from bench.floor import fixed_inputs, step
    from bench.ours import trainer_config
    from trainer.config import parse_config
    from trainer.events import EventLog
    from trainer.loop import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(run_dir / "events.jsonl")
    trainer = Trainer(parse_config(trainer_config(spec, run_dir, spec.steps)), events, lambda: False)
    trainer.setup()
    inputs, bare, check = fixed_inputs(spec.resolution), [], trainer.check_stop_together

    def bare_step_then_check() -> None:
        began = time.perf_counter()
        step(trainer.models["lora_unet"], trainer.optimizer, inputs)
        bare.append(time.perf_counter() - began)
        check()

    trainer.check_stop_together = bare_step_then_check
    trainer.train()
    events.close()
    whole = trainer_step_times(read_events(run_dir / "events.jsonl"))
    return [w - b for w, b in zip(whole, bare, strict=True)], bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=6)
    args = parser.parse_args(argv)
    import torch

    from bench.run import machine

    about = machine()
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    from make_random_sd15 import ensure_random_sd15

    work = Path(tempfile.mkdtemp(prefix="lora-foundry-paired-"))
    data = draw_dataset(work / "data", args.resolution)
    spec = Spec(checkpoint=str(ensure_random_sd15()), data=str(data), resolution=args.resolution,
                warmup=args.warmup, timed=args.timed, workdir=str(work))
    ours_times, floor_times = paired_steps(spec, work / "run")
    ours, floor = steady(ours_times, spec.warmup), steady(floor_times, spec.warmup)
    result = {"machine": about, "resolution": args.resolution, "threads": torch.get_num_threads(),
              "ours": ours, "floor": floor,
              "ours_step_times": ours_times, "floor_step_times": floor_times,
              "best_ratio": ours["s_per_step"] / floor["s_per_step"],
              "median_ratio": ours["median_s_per_step"] / floor["median_s_per_step"]}
    text = "\n".join([
        "# ours against floor in one process",
        "",
        f"Machine: {about['cpu']}, {about['cores']} cores, {about['memory_gib']} GiB; torch {about['torch']}; "
        f"{about['date']}.",
        f"Command: `python bench/paired.py --resolution {args.resolution}`; {args.resolution} px, batch 1, fp32, "
        f"{result['threads']} threads; {args.warmup} warm-up steps, then {args.timed} timed steps each, taken "
        "turn about.",
        "",
        "| | s/step (best) | s/step (median) |",
        "|---|---|---|",
        f"| ours (the trainer's loop) | {ours['s_per_step']:.2f} | {ours['median_s_per_step']:.2f} |",
        f"| floor (bare step, same UNet and optimizer) | {floor['s_per_step']:.2f} | "
        f"{floor['median_s_per_step']:.2f} |",
        f"| ours / floor | {result['best_ratio']:.3f} | {result['median_ratio']:.3f} |",
        "",
    ])
    out = BENCH / "results-paired"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
