"""Ratios, target verdicts and the markdown table, from the contenders' result dicts (no timing here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.common import gib


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    text: str  # how the value is shown

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value <= self.limit


def ratio(results: dict[str, dict], a: str, b: str, key: str = "s_per_step") -> float | None:
    """a's figure over b's; None when either is missing or they come from different runs (a merged report
    stamps each result with its run's date: another day may be another machine)."""
    if a not in results or b not in results:
        return None
    if results[a].get("measured") != results[b].get("measured"):
        return None
    return results[a][key] / results[b][key]


def ttfs_ratio(results: dict[str, dict]) -> float | None:
    if "ours" not in results or "probe" not in results:
        return None
    return results["ours"]["ttfs_s"] / results["probe"]["reference_s"]


def targets(low: dict[str, dict], high: dict[str, dict], sdxl: dict[str, dict] | None = None) -> list[Target]:
    """The issue's targets, each a value that must stay at or under its limit."""
    seed_low, seed_high = ratio(low, "ours", "seed"), ratio(high, "ours", "seed")
    rss = ratio(low, "ours", "seed", "peak_rss_bytes")
    rss_high = ratio(high, "ours", "seed", "peak_rss_bytes")
    overhead = low.get("node", {}).get("overhead_fraction")
    checks = [
        Target("ours / seed (low res)", seed_low, 0.75, "{:.2f}"),
        Target("ours / seed (high res), lower than at low res", seed_high, seed_low or 0.0, "{:.2f}"),
        Target("ours / floor", ratio(low, "ours", "floor"), 1.05, "{:.2f}"),
        Target("ours / floor (high res)", ratio(high, "ours", "floor"), 1.05, "{:.2f}"),
        Target("ours / native", ratio(low, "ours", "native"), 0.5, "{:.2f}"),
        Target("ours, all layers / native (every layer), like for like", ratio(low, "ours_all", "native"), 0.5,
               "{:.2f}"),
        Target("peak RSS ours / seed (low res)", rss, 1.0, "{:.2f}"),
        Target("peak RSS ours / seed (high res)", rss_high, 1.0, "{:.2f}"),
        Target("time to first step / (load + one encode pass)", ttfs_ratio(low), 1.2, "{:.2f}"),
        Target("ComfyUI overhead of the Train node", overhead, 0.03, "{:.1%}"),
        Target("SDXL: ours / seed", ratio(sdxl or {}, "ours", "seed_sdxl"), 0.75, "{:.2f}"),
        Target("SDXL: peak RSS ours / seed", ratio(sdxl or {}, "ours", "seed_sdxl", "peak_rss_bytes"), 1.0,
               "{:.2f}"),
    ]
    return [c for c in checks if c.value is not None]


CONTENDER_LABELS = {"ours_all": "ours, all layers", "seed_sdxl": "seed"}


def _fmt(value: Any, spec: str = "{:.2f}") -> str:
    return "–" if value is None else spec.format(value)


def contender_rows(results: dict[str, dict], resolution: int, family: str = "") -> list[str]:
    rows = []
    for name in ("ours", "ours_all", "seed", "seed_sdxl", "floor", "native"):
        r = results.get(name)
        if r is None:
            continue
        versus = ratio(results, name, "ours")
        rows.append(
            f"| {family}{CONTENDER_LABELS.get(name, name)} | {resolution} | {r['s_per_step']:.2f} "
            f"| {_fmt(r.get('median_s_per_step'))} | {_fmt(versus)} "
            f"| {r['timed_steps']} | {gib(r['peak_rss_bytes']):.2f} | {_fmt(r.get('ttfs_s'), '{:.1f}')} "
            f"| {_fmt(r.get('steal_fraction'), '{:.0%}')} |"
        )
    return rows


def markdown(machine: dict[str, str], low: dict[str, dict], high: dict[str, dict], settings: dict,
             sdxl: dict[str, dict] | None = None) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; torch "
        f"{machine['torch']}, diffusers {machine['diffusers']}, ComfyUI {machine['comfyui']}; {machine['date']}; "
        f"load average {machine.get('load_average', '?')} at the start, {machine.get('load_average_after', '?')} at "
        "the end.",
        f"Command: `{settings['command']}`. SD1.5-shaped random-weight checkpoint (fp16 file, trained in fp32 on "
        f"the CPU), batch 1, rank-4 LoRA on the attention projections, {settings['images']} pictures; "
        f"{settings['warmup']} warm-up step(s), then {settings['timed']} timed steps; the contenders ran "
        f"{settings.get('rounds', 1)} time(s) over in turn (native and node once). Ratios use each contender's best "
        "timed step of its best round: on this shared virtual machine other tenants only add time (the CPU steal "
        "column is the share of CPU time the hypervisor gave away while the contender ran).",
        "",
        "| contender | px | s/step (best) | s/step (median) | × ours | timed steps | peak RSS GiB "
        "| time to first step s | CPU steal |",
        "|---|---|---|---|---|---|---|---|---|",
        *contender_rows(low, settings["low"]),
        *contender_rows(high, settings["high"]),
        *contender_rows(sdxl or {}, settings.get("sdxl", 0), family="SDXL "),
        "",
    ]
    lines += _details(low, high, settings)
    if sdxl:
        lines.append("- SDXL rows: the random full-structure SDXL checkpoint (scripts/make_random_sdxl.py, fp16 file, "
                     "trained in fp32 on the CPU), the same attention targets and pictures; `seed` there is the "
                     "chapter's loop carried over to SDXL (both text encoders and the VAE on every step, as "
                     "diffusers' SDXL LoRA example runs).")
    lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in targets(low, high, sdxl):
        verdict = "yes" if t.met else "**no**"
        lines.append(f"| {t.name} | {t.text.format(t.value)} | {t.text.format(t.limit)} | {verdict} |")
    if settings.get("note"):
        lines += ["", settings["note"]]
    return "\n".join(lines) + "\n"


def _floor_line(f: dict[str, Any], resolution: int | str) -> str:
    return (
        f"- floor at {resolution} px: {f['flops_per_step'] / 1e9:.0f} GFLOP per step (forward + backward) → "
        f"{f['flops_per_s'] / 1e9:.0f} GFLOP/s, {f['fraction_of_matmul']:.0%} of this machine's "
        f"{f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s fp32 4096² matmul."
    )


def _details(low: dict[str, dict], high: dict[str, dict], settings: dict | None = None) -> list[str]:
    settings = settings or {}
    out = [_floor_line(r["floor"], settings.get(key, key)) for key, r in (("low", low), ("high", high))
           if "floor" in r]
    if "probe" in low and "ours" in low:
        p, o = low["probe"], low["ours"]
        out.append(
            f"- time to first step, ours: {o['ttfs_s']:.1f} s from launch to the step loop (launcher and imports "
            f"{o['to_loading_event_s']:.1f} s, load + hash + cache + LoRA {o['setup_s']:.1f} s); reference: "
            f"{p['reference_s']:.1f} s (imports {p['import_s']:.1f} s + checkpoint load {p['load_s']:.1f} s + "
            f"one VAE/text-encoder pass {p['encode_s']:.1f} s)."
        )
    if "probe" in low and "ours_noflip" in low:
        n = low["ours_noflip"]
        out.append(
            f"- time to first step with random flip off (the cache pass then encodes each picture once, as the "
            f"reference does): {n['ttfs_s']:.1f} s = {n['ttfs_s'] / low['probe']['reference_s']:.2f} × the reference."
        )
    if "node" in low:
        n = low["node"]
        out.append(
            f"- Train node, {n['node_steps']} steps through a ComfyUI server: {n['prompt_wall_s']:.1f} s from POST to "
            f"done, trainer process {n['trainer_s']:.1f} s → ComfyUI overhead {n['overhead_s']:.1f} s "
            f"({n['overhead_fraction']:.1%}; {n['before_launch_s']:.1f} s before the launch, "
            f"{n['after_exit_s']:.1f} s after the exit)."
        )
    if "native" in low:
        out.append(f"- native: time to first step counts from posting the prompt to a running server "
                   f"(server start {low['native']['server_start_s']:.0f} s not included). It puts a LoRA on every "
                   "weight of the UNet and trains every bias; 'ours, all layers' is the `all` preset (kohya's "
                   "LoCon set: attention, feed-forward, resnet and sampler convolutions, projections), the like-"
                   "for-like row; 'ours' adapts the attention projections only.")
    return out
