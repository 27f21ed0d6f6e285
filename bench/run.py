"""The benchmark, in one command: `python bench/run.py` (add `--quick` to check that it works).

Runs each contender in its own process, one after another: `probe` (checkpoint load + one encode pass),
`ours` (the trainer as the Train node launches it), `ours_noflip` (the same with random flip off, for time
to first step only), `seed` (the seed chapter's loop, no caching), `floor`
(UNet + LoRA forward/backward/AdamW on fixed inputs, with its FLOP rate), `native` (ComfyUI's TrainLoraNode)
and `node` (the Train node on a ComfyUI server, for ComfyUI's overhead) at the low resolution, then `ours`,
`seed` and `floor` again at the high one, then `ours` and `seed_sdxl` (the seed loop carried over to SDXL) on
the random full-structure SDXL checkpoint. Two rounds by default, each contender keeping its least disturbed
one (this machine is shared). Writes bench/results.json and bench/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BENCH,
    OFFLINE_ENV,
    SHAPES,
    Spec,
    cpu_times,
    draw_dataset,
    gib,
    steal_fraction,
)
from bench.report import markdown, targets  # noqa: E402
from scripts.comfy_server import default_comfy_dir  # noqa: E402

LOW_CONTENDERS = ("probe", "ours", "ours_noflip", "ours_all", "seed", "floor", "native", "node")
HIGH_CONTENDERS = ("ours", "seed", "floor")
SDXL_CONTENDERS = ("ours", "seed_sdxl")
# ours with random_flip off, for time to first step only: its cache pass is one VAE pass, like the probe's
ONE_ROUND = ("native", "node")  # minutes each, and not what the step-time ratios hinge on
# ours with the "all" preset (kohya's LoCon set), like for like against native, which adapts every UNet weight
VARIANTS = {"ours_noflip": {"warmup": 0, "timed": 1, "extra": {"random_flip": False}},
            "ours_all": {"extra": {"targets": "all"}}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64/128 px, 1 warm-up + 3 timed steps, 4-step node "
                        "run; writes $TMPDIR/lora-foundry-bench-quick.{md,json} instead of bench/results.*")
    parser.add_argument("--only", nargs="*", default=None, help="run only these contenders (e.g. ours seed)")
    parser.add_argument("--rounds", type=int, default=2, help="run the contenders this many times over in turn "
                        "and keep each one's least disturbed round (native and node run once)")
    parser.add_argument("--no-high", action="store_true", help="skip the high-resolution pair")
    parser.add_argument("--no-low", action="store_true", help="skip the low-resolution set")
    parser.add_argument("--no-sdxl", action="store_true", help="skip the SDXL pair")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="SD 1.5 single-file checkpoint (default: the cached random-weight one)")
    parser.add_argument("--note", default="", help="a line added under the results table")
    parser.add_argument("--merge", action="store_true", help="keep bench/results.json's figures for the contenders "
                        "--only leaves out (the report names which ran when)")
    return parser.parse_args(argv)


def settings_for(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"low": 64, "high": 128, "sdxl": 64, "warmup": 1, "timed": 3, "node_steps": 4}
    return {"low": 256, "high": 512, "sdxl": 256, "warmup": 2, "timed": 5, "node_steps": 20}


def machine() -> dict[str, str]:
    import diffusers
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    version = default_comfy_dir() / "comfyui_version.py"
    comfyui = version.read_text().split("=")[-1].strip().strip("\"'") if version.is_file() else "?"
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory_gib": f"{gib(pages):.0f}", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "comfyui": comfyui, "threads": str(torch.get_num_threads()),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_average": " ".join(
                f"{x:.2f}" for x in os.getloadavg())}


def run_contender(name: str, spec: Spec) -> dict:
    """One contender in a fresh process; its result JSON, or an `error` entry when it failed."""
    folder = Path(spec.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec.save(spec_path)
    print(f"[bench] {name} at {spec.resolution} px ...", flush=True)
    began, cpu_before = time.time(), cpu_times()
    with (folder / "contender.log").open("wb") as log:
        code = subprocess.call([sys.executable, str(BENCH / "contender.py"), name, str(spec_path), str(result_path)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, **OFFLINE_ENV}, cwd=BENCH.parent)
    if code != 0 or not result_path.is_file():
        tail = (folder / "contender.log").read_text(errors="replace").splitlines()[-15:]
        print(f"[bench] {name} FAILED (exit {code}):\n" + "\n".join(tail), flush=True)
        return {"name": name, "error": f"exit {code}", "log_tail": tail}
    result = json.loads(result_path.read_text())
    result["steal_fraction"] = steal_fraction(cpu_before, cpu_times())
    print(f"[bench] {name}: {summary(result)} ({time.time() - began:.0f} s)", flush=True)
    return result


def summary(result: dict) -> str:
    parts = []
    if "s_per_step" in result:
        parts.append(f"{result['s_per_step']:.2f} s/step (median {result['median_s_per_step']:.2f})")
    if "reference_s" in result:
        parts.append(f"reference {result['reference_s']:.1f} s")
    if "ttfs_s" in result:
        parts.append(f"first step at {result['ttfs_s']:.1f} s")
    if "overhead_fraction" in result:
        parts.append(f"overhead {result['overhead_fraction']:.1%}")
    parts.append(f"peak RSS {gib(result['peak_rss_bytes']):.2f} GiB, CPU steal {result['steal_fraction']:.0%}")
    return ", ".join(parts)


def run_set(names: tuple[str, ...], base: dict, resolution: int, workdir: Path, only: list[str] | None,
            rounds: int) -> dict:
    """Every contender, `rounds` times over in turn (the long one-off ones only in the first round); each
    contender keeps its least disturbed round."""
    data = draw_dataset(workdir / f"data-{resolution}", resolution)
    results: dict[str, dict] = {}
    for round_index in range(rounds):
        for name in names:
            if (only is not None and name not in only) or (round_index > 0 and name in ONE_ROUND):
                continue
            fields = {**base, **VARIANTS.get(name, {})}
            folder = workdir / f"{name}-{resolution}-{round_index}"
            result = run_contender(name, Spec(**fields, data=str(data), resolution=resolution, workdir=str(folder)))
            if "error" not in result:
                result["rounds"] = results.get(name, {}).get("rounds", 0) + 1
                results[name] = least_disturbed(results.get(name), result)
    return results


def least_disturbed(kept: dict | None, new: dict) -> dict:
    """Of two runs of one contender, the faster one (best step, else the probe's reference time)."""
    if kept is None:
        return new
    key = "s_per_step" if "s_per_step" in new else "reference_s" if "reference_s" in new else None
    best = new if key is not None and new[key] < kept[key] else kept
    return {**best, "rounds": new["rounds"]}


def merged(previous_path: Path, sets: dict[str, dict], about: dict, report: dict) -> tuple[dict[str, dict], dict,
                                                                                           dict]:
    """This run's sets of contenders (low, high, sdxl) over the previous results: the machine line stays the
    previous run's, and the note says which contenders were measured again, when and where."""
    previous = json.loads(previous_path.read_text())
    fresh = sorted({f"{name} ({key})" for key, results in sets.items() for name in results})
    for key, results in sets.items():
        for result in previous.get(key, {}).values():
            result.setdefault("measured", previous["machine"]["date"])
        for result in results.values():
            result.setdefault("measured", about["date"])
    note = (f"{', '.join(fresh)} measured again on {about['date']}, {about['cpu']} ({about['cores']} cores, load "
            f"average {about['load_average']}); the other rows are from {previous['machine']['date']}, "
            f"{previous['machine']['cpu']}: compare ratios only within one run.")
    resolutions = {key: report[key] for key, results in sets.items() if results}  # of the sets measured again
    report = {**previous["settings"], **resolutions,
              "note": " ".join(filter(None, [previous["settings"].get("note"), note]))}
    return {key: {**previous.get(key, {}), **results} for key, results in sets.items()}, previous["machine"], report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_for(args)
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    from make_random_sd15 import ensure_random_sd15
    from make_random_sdxl import ensure_random_sdxl

    checkpoint = args.checkpoint or ensure_random_sd15()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lora-foundry-bench-"))
    base = {"checkpoint": str(checkpoint), "warmup": settings["warmup"], "timed": settings["timed"],
            "comfy_dir": str(default_comfy_dir()), "node_steps": settings["node_steps"]}
    about = machine()
    print(f"[bench] {about['cpu']}, {about['cores']} cores, load average {about['load_average']}; "
          f"scratch {workdir}", flush=True)
    rounds = 1 if args.quick else args.rounds
    low = {} if args.no_low else run_set(LOW_CONTENDERS, base, settings["low"], workdir, args.only, rounds)
    high = {} if args.no_high else run_set(HIGH_CONTENDERS, base, settings["high"], workdir, args.only, rounds)
    sdxl = {} if args.no_sdxl else run_set(SDXL_CONTENDERS, {**base, "checkpoint": str(ensure_random_sdxl())},
                                           settings["sdxl"], workdir / "sdxl", args.only, rounds)
    about["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    report = {**settings, "command": command, "images": len(SHAPES), "note": args.note, "rounds": rounds}
    if args.merge:
        sets, about, report = merged(BENCH / "results.json", {"low": low, "high": high, "sdxl": sdxl}, about, report)
        low, high, sdxl = sets["low"], sets["high"], sets["sdxl"]
    # a quick run only checks the script: its figures stay out of the repository
    out = Path(tempfile.gettempdir()) / "lora-foundry-bench-quick" if args.quick else BENCH / "results"
    document = {"machine": about, "settings": report, "low": low, "high": high, "sdxl": sdxl,
                "targets": [{"name": t.name, "value": t.value, "limit": t.limit, "met": t.met}
                            for t in targets(low, high, sdxl)]}
    out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(about, low, high, report, sdxl))
    print(out.with_suffix(".md").read_text())
    print(f"[bench] wrote {out.with_suffix('.md')} and .json")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
