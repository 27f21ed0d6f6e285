"""The GPU variant: `python bench/gpu.py` on a CUDA machine; finishes in under 8 minutes.

The pack's trainer (its Trainer class, as `trainer/run.py` drives it) on 8 pictures, one case per process, on
random-weight full-structure checkpoints (scripts/make_random_sd15.py, make_random_sdxl.py). SD 1.5 at 512 px:
fp16 and bf16 mixed precision, batch 1 and 8, and fp16 batch 1 with gradient checkpointing. FLUX.1 dev and
Z-Image at 1024 px in bf16, batch 1, with the low-memory options (gradient checkpointing with an int8 or nf4
base, checkpointing alone) and without; their full-size random models are built in memory
(bench/random_dit.py). SDXL at 1024 px in bf16: batch 1 and 4, each with gradient checkpointing on and off.
For each:
images/s over the timed steps, peak VRAM of the step loop (`torch.cuda.max_memory_allocated`, reset after the
cache pass; the cache pass's own peak is reported beside it) and model FLOP utilisation: forward + backward
FLOPs of one step (torch.utils.flop_counter) per second, against the GPU's dense bf16 peak (a table of known
GPUs, or --peak-tflops). Writes bench/results-gpu.md and bench/results-gpu.json. Without CUDA it prints why
and exits 0; `--cpu-check` runs tiny cases of each family on the CPU to check the plumbing.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    OFFLINE_ENV,
    comfy_tokenizer_dir,
    draw_dataset,
    read_events,
    steady,
    trainer_step_times,
)
from scripts.comfy_server import default_comfy_dir  # noqa: E402

BUDGET_S = 470  # the whole script, under 8 minutes (a lent GPU machine has 15, its start included)
# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of torch.cuda.get_device_name()
DENSE_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)


@dataclass
class Case:
    precision: str  # "fp16" | "bf16" | "no"
    batch: int
    checkpointing: bool = False
    resolution: int = 512
    warmup: int = 3
    timed: int = 10
    device: str = "cuda"
    family: str = "sd15"  # the config's model.family: which random checkpoint the case trains
    quantization: str = "none"  # train.base_quantization: the frozen base in int8 / nf4

    @property
    def label(self) -> str:
        family = "" if self.family == "sd15" else f"{self.family} "
        quantized = "" if self.quantization == "none" else f" {self.quantization}"
        return f"{family}{self.precision} b{self.batch}" + (" ckpt" if self.checkpointing else "") + quantized


def gpu_cases() -> list[Case]:
    sd15 = [Case("fp16", 1), Case("fp16", 1, checkpointing=True), Case("bf16", 1), Case("fp16", 8),
            Case("bf16", 8)]
    sdxl = [Case("bf16", batch, checkpointing=ckpt, resolution=1024, family="sdxl", warmup=2, timed=6)
            for batch in (1, 4) for ckpt in (True, False)]
    # the DiT families at 1024 px, with the low-memory options (checkpointing, a quantized base) and without
    dit = [Case("bf16", 1, checkpointing=ckpt, resolution=1024, family=family, warmup=2, timed=4, quantization=q)
           for family, options in (("flux", ((True, "int8"), (True, "nf4"), (True, "none"), (False, "none"))),
                                   ("zimage", ((True, "int8"), (True, "none"), (False, "none"))))
           for ckpt, q in options]
    return sd15 + dit + sdxl


def cpu_check_cases() -> list[Case]:
    return [Case("no", 1, resolution=64, warmup=1, timed=2, device="cpu"),
            Case("no", 2, checkpointing=True, resolution=64, warmup=1, timed=2, device="cpu"),
            Case("bf16", 1, checkpointing=True, resolution=64, warmup=1, timed=1, device="cpu", family="sdxl"),
            Case("no", 1, checkpointing=True, resolution=64, warmup=1, timed=1, device="cpu", family="flux",
                 quantization="int8"),
            Case("no", 1, resolution=64, warmup=1, timed=1, device="cpu", family="zimage")]


def dense_bf16_peak(name: str) -> float | None:
    """TFLOP/s of a known GPU (first matching name part), else None."""
    return next((tflops for part, tflops in DENSE_BF16_TFLOPS if part in name), None)


def run_config(case: Case, checkpoint: str, data: Path, run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The case's run config; a DiT family's model is built in memory (bench/random_dit.py), its path a name."""
    return {
        "run_dir": str(run_dir),
        "model": {"path": checkpoint, "family": case.family,
                  "tokenizer_dir": str(comfy_tokenizer_dir(default_comfy_dir()))},
        "data": {"folder": str(data), "resolution": case.resolution},
        "lora": {"rank": 4, "alpha": 4.0, "targets": "attention"},
        "train": {"batch_size": case.batch, "max_steps": case.warmup + case.timed, "mixed_precision": case.precision,
                  "device": case.device, "gradient_checkpointing": case.checkpointing, "cache_dir": str(cache_dir),
                  "base_quantization": case.quantization},
        "output": {"lora_path": str(run_dir / "lora.safetensors"), "overwrite": True},
    }


# ---- one case, in its own process -------------------------------------------------------------------


def count_step_flops(trainer: Any, case: Case) -> int:
    """Forward + backward FLOPs of one training step of the trainer's (prepared) denoiser at the case's shape,
    conditioned on the first picture's cached encodings (whatever the family encodes prompts into)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.families import DENOISER

    denoiser, device, sample = trainer.models[DENOISER], trainer.device, trainer.encoded[0]

    def batched(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[None].expand(case.batch, *tensor.shape).to(device)

    noisy = torch.randn(case.batch, *sample.latents.shape, device=device)
    text = {name: batched(value) for name, value in sample.text.items()}
    # the middle of the family's timestep draw: a DDPM step number, or a flow-matching sigma
    drawn = torch.full((case.batch,), trainer.components.objective.num_timesteps // 2)
    timesteps = trainer.components.objective.timesteps(drawn, tuple(sample.latents.shape)).to(device)
    with FlopCounterMode(display=False) as counter, trainer.accelerator.autocast():
        pred = trainer.family.predict(denoiser, noisy, timesteps, text, batched(sample.framing))
        trainer.accelerator.backward(F.mse_loss(pred.float(), noisy))
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def dit_family(case: Case, cfg: Any) -> Any:
    """For a DiT case, the trainer's family lookup answers with the in-memory random model's family."""
    import contextlib
    from unittest import mock

    from bench.random_dit import FAMILIES, random_family

    if case.family not in FAMILIES:
        return contextlib.nullcontext()
    family = random_family(case.family, cfg.train, small=case.device == "cpu")
    return mock.patch("trainer.loop.family_for", return_value=family)


def run_case(case: Case, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.config import parse_config
    from trainer.events import EventLog
    from trainer.loop import Trainer

    cfg = parse_config(config)
    events_path = Path(cfg.run_dir) / "events.jsonl"
    events = EventLog(events_path)
    trainer = Trainer(cfg, events, lambda: False)
    cuda = case.device == "cuda"
    with dit_family(case, cfg):
        trainer.setup()
    setup_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    train_peak = torch.cuda.max_memory_allocated() if cuda else None
    events.close()
    stats = steady(trainer_step_times(read_events(events_path)), case.warmup)
    flops = count_step_flops(trainer, case)
    return {**asdict(case), "label": case.label, **stats, "images_per_s": case.batch / stats["s_per_step"],
            "peak_vram_bytes": train_peak, "setup_peak_vram_bytes": setup_peak, "flops_per_step": flops,
            "flops_per_s": flops / stats["s_per_step"], "mixed_precision": trainer.accelerator.mixed_precision,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu"}


def worker(case_json: str, config_json: str, out: str) -> int:
    os.environ.update(OFFLINE_ENV)
    result = run_case(Case(**json.loads(case_json)), json.loads(config_json))
    Path(out).write_text(json.dumps(result, indent=2))
    return 0


# ---- the driver ---------------------------------------------------------------------------------------


def launch(case: Case, config: dict[str, Any], out: Path, log: Path, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case)),
            json.dumps(config), str(out)]
    try:
        with log.open("wb") as handle:
            code = subprocess.call(argv, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                   env={**os.environ, **OFFLINE_ENV})
    except subprocess.TimeoutExpired:
        return {"label": case.label, "error": f"over the time budget ({timeout:.0f} s left)"}
    if code != 0 or not out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-12:]
        return {"label": case.label, "error": f"exit {code}: {tail[-1] if tail else ''}"[:300], "log_tail": tail}
    return json.loads(out.read_text())


def gb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def markdown(results: list[dict[str, Any]], peak_tflops: float | None, device: str, seconds: float) -> str:
    peak = f"{peak_tflops:.0f} TFLOP/s dense bf16" if peak_tflops else "unknown (pass --peak-tflops)"
    sizes = sorted({r["resolution"] for r in results if "resolution" in r})
    lines = [f"# GPU benchmark: {device}", "",
             f"{'/'.join(map(str, sizes)) or '?'} px, rank-4 attention LoRA, random weights of the full SD 1.5, "
             "SDXL, FLUX.1 dev and Z-Image structures (rows other than SD 1.5 name their family), 8 pictures; "
             f"peak used for MFU: {peak}. Whole run {seconds:.0f} s. TFLOP/step is what ran (forward + backward, "
             "with the recomputation when checkpointing); VRAM is torch.cuda.max_memory_allocated.", "",
             "| case | s/step | images/s | peak VRAM GB (steps) | peak VRAM GB (cache pass) | TFLOP/step | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        mfu = f"{r['flops_per_s'] / (peak_tflops * 1e12):.1%}" if peak_tflops else "–"
        lines.append(f"| {r['label']} | {r['s_per_step']:.3f} | {r['images_per_s']:.2f} | {gb(r['peak_vram_bytes'])} "
                     f"| {gb(r['setup_peak_vram_bytes'])} | {r['flops_per_step'] / 1e12:.2f} | {mfu} |")
    return "\n".join(lines) + "\n"


def random_checkpoint(family: str, given: Path | None) -> Path:
    """The cached random-weight checkpoint of a family, built on first use (SD 1.5: ~1 min, SDXL: ~1 min and
    7 GB of disk); --checkpoint replaces the SD 1.5 one."""
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    if family == "sdxl":
        from make_random_sdxl import ensure_random_sdxl

        return ensure_random_sdxl()
    from make_random_sd15 import ensure_random_sd15

    return given or ensure_random_sd15()


def drive(args: argparse.Namespace) -> int:
    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible; nothing to measure (skipped).")
        return 0
    cases = cpu_check_cases() if args.cpu_check else gpu_cases()
    if args.only:
        cases = [case for case in cases if case.family in args.only]
    work = Path(tempfile.mkdtemp(prefix="lora-foundry-gpu-bench-"))
    device = "cpu (plumbing check)" if args.cpu_check else torch.cuda.get_device_name()
    peak = args.peak_tflops or (None if args.cpu_check else dense_bf16_peak(device))
    results = []
    for index, case in enumerate(cases):
        left = BUDGET_S - (time.time() - STARTED)
        if left < 20:
            results.append({"label": case.label, "error": "skipped: the 5-minute budget is spent"})
            continue
        folder = work / f"case-{index}"
        data = work / f"data-{case.resolution}"
        if not data.is_dir():
            draw_dataset(data, case.resolution, count=8)
        checkpoint = str(random_checkpoint(case.family, args.checkpoint)) if case.family in ("sd15", "sdxl") \
            else f"random-{case.family}-in-memory.safetensors"
        config = run_config(case, checkpoint, data, folder / "run", work / "cache")
        folder.mkdir(parents=True)
        results.append(launch(case, config, folder / "result.json", folder / "log.txt", left))
        print(f"[gpu bench] {case.label}: {results[-1].get('s_per_step', results[-1].get('error'))}", flush=True)
    out = Path(tempfile.gettempdir()) / "lora-foundry-gpu-cpu-check" if args.cpu_check else BENCH / "results-gpu"
    text = markdown(results, peak, device, time.time() - STARTED)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"device": device, "peak_tflops": peak, "cases": results},
                                                   indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"[gpu bench] wrote {out.with_suffix('.md')} and .json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the cached random-weight SD 1.5")
    parser.add_argument("--cpu-check", action="store_true", help="tiny CPU cases, to check the plumbing")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (each case's log)")
    parser.add_argument("--only", nargs="+", choices=("sd15", "sdxl", "flux", "zimage"), default=None,
                        help="only the cases of these families")
    return drive(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
