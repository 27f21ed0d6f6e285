"""What every contender shares: the run spec, the drawn dataset, steady-state statistics and peak RSS.

Kept free of torch imports so the thin contenders (the ones that only launch another process) stay light.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.comfy_server import default_comfy_dir
from trainer.events import read_events as read_event_file

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SHAPES = (("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square"))
CAPTION = "lfstyle, a {color} {shape}, flat colour, thick outline"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Spec:
    """One contender's job: which model, which pictures, which size, how many steps."""

    checkpoint: str
    data: str  # folder of PNGs with same-name .txt captions, drawn at `resolution`
    resolution: int
    warmup: int
    timed: int
    workdir: str  # this contender's own scratch folder
    rank: int = 4
    seed: int = 0
    comfy_dir: str = ""
    node_steps: int = 20  # the Train node run that measures ComfyUI's overhead
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    @property
    def comfy_root(self) -> Path:
        return Path(self.comfy_dir) if self.comfy_dir else default_comfy_dir()

    @property
    def tokenizer_dir(self) -> str:
        return str(comfy_tokenizer_dir(self.comfy_root))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Spec:
        return cls(**json.loads(path.read_text()))


def comfy_tokenizer_dir(comfy: str | Path) -> Path:
    return Path(comfy) / "comfy" / "sd1_tokenizer"


def draw_dataset(folder: Path, size: int, count: int = len(SHAPES)) -> Path:
    """`count` (up to 8) captioned pictures of coloured shapes at exactly size x size (the trainer never
    upscales into a bucket, so the pictures are drawn at the training size)."""
    sys.path.insert(0, str(ROOT))
    from scripts.make_sample_dataset import COLORS, draw_shape

    pairs = list(SHAPES) + [(c, "square" if s == "circle" else "circle") for c, s in SHAPES]
    folder.mkdir(parents=True, exist_ok=True)
    for color, shape in pairs[:count]:
        stem = f"{color}_{shape}"
        draw_shape(shape, COLORS[color], size).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(CAPTION.format(color=color, shape=shape) + "\n", encoding="utf-8")
    return folder


def dataset_items(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a drawn dataset, in name order."""
    images = sorted(Path(folder).glob("*.png"))
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def steady(step_times: list[float], warmup: int) -> dict[str, float]:
    """Seconds per step over the steps after the warm-up. `s_per_step` is the best (shortest) timed step: on a
    shared machine other tenants only ever add time (CPU steal), so the minimum is the least disturbed
    estimate of what a step costs; the median, mean and maximum are kept beside it."""
    timed = step_times[warmup:]
    if not timed:
        raise ValueError(f"no timed steps: {len(step_times)} step(s) recorded, {warmup} of them warm-up")
    return {
        "s_per_step": min(timed),
        "median_s_per_step": statistics.median(timed),
        "mean_s_per_step": statistics.fmean(timed),
        "max_s_per_step": max(timed),
        "timed_steps": len(timed),
    }


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of a finished trainer run's events.jsonl (a torn last line from a killed run is dropped)."""
    return read_event_file(path)


def trainer_step_times(events: list[dict[str, Any]]) -> list[float]:
    """Durations of the trainer's steps, the first one measured from its `start` event."""
    start = next(e["time"] for e in events if e["type"] == "start")
    return intervals([e["time"] for e in events if e["type"] == "step"], start)


def intervals(times: list[float], start: float) -> list[float]:
    """Durations between consecutive time stamps, the first one measured from `start`."""
    out, last = [], start
    for t in times:
        out.append(t - last)
        last = t
    return out


def peak_rss_bytes() -> int:
    """The largest resident set of this process or any child it has waited for (Linux reports KiB).

    This process's own peak is VmHWM: Linux carries ru_maxrss over fork and exec, so RUSAGE_SELF would report
    the benchmark driver's peak too. A child's ru_maxrss may include this process's size when it forked, which
    VmHWM already bounds."""
    status = Path("/proc/self/status").read_text().splitlines()
    own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor gave to other guests between two cpu_times() readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30
