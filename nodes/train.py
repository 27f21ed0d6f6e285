"""Train node: write the run config, free ComfyUI's models, launch the trainer, follow it, return outputs."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import comfy.model_management
import comfy.utils
from comfy_api.latest import io
from PIL import Image
from safetensors import safe_open

from ..trainer.config import (
    BaseQuantization,
    ConfigError,
    Device,
    LrScheduler,
    MixedPrecision,
    ModelConfig,
    Optimizer,
    RunConfig,
    parse_config,
)
from ..trainer.events import read_events
from ..trainer.families import TRAINED_NAMES, detect_family, get_family
from ..trainer.identity import run_identity
from ..trainer.preflight import launch_problems, machine_devices, output_problems
from . import paths
from .api_features import advanced, search_aliases
from .dataset import Dataset
from .images import loss_curve, to_image_batch
from .launch import TrainerProcess, follow, launch_argv, parse_gpu_ids, wait_for_run_folder
from .lora_config import LoraConfigType

NO_ACCELERATE_CONFIG = "none"


class Existing(Enum):
    """What an existing LoRA file of the chosen name is to this run."""

    NONE = "none"  # no file: train
    DONE = "done"  # made by this very run, same length and samples: nothing to do
    OURS = "ours"  # made by this run with another length or other samples: continue or re-sample, then rewrite
    FOREIGN = "foreign"  # anything else: only replaced when overwrite is on


def stored_config(lora: Path) -> RunConfig | None:
    """The run config a LoRA Foundry file carries in its metadata, or None for any other file."""
    try:
        with safe_open(str(lora), framework="pt") as f:
            metadata = f.metadata() or {}
        return parse_config(json.loads(metadata["lora_foundry.config"]))
    except Exception:
        return None


def existing_lora(lora: Path, cfg: RunConfig) -> Existing:
    if not lora.exists():
        return Existing.NONE
    made = stored_config(lora)
    if made is None or not made.output.run_id or made.output.run_id != cfg.output.run_id:
        return Existing.FOREIGN
    same_length = (made.train.max_steps, made.train.epochs) == (cfg.train.max_steps, cfg.train.epochs)
    return Existing.DONE if same_length and made.sample == cfg.sample else Existing.OURS


@dataclass
class RunRecord:
    """What the node shows and returns, gathered from the events as they arrive."""

    total_steps: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, event: dict) -> None:
        kind = event["type"]
        if kind == "start":
            self.total_steps = event["total_steps"]
        elif kind == "step":
            while self.steps and self.steps[-1] >= event["step"]:  # a resumed attempt redoes these steps
                self.steps.pop()
                self.losses.pop()
                self.smoothed.pop()
            self.steps.append(event["step"])
            self.losses.append(event["loss"])
            self.smoothed.append(event["smoothed_loss"])
        elif kind == "sample":
            self.samples.append(event["path"])
        elif kind == "warning":
            self.warnings.append(event["message"])


def read_record(events_path: Path) -> RunRecord:
    """Every attempt of a run, in order: the loss curve covers the whole training, resumed or not."""
    record = RunRecord()
    for event in read_events(events_path):
        record.add(event)
    return record


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_text(event: dict) -> str | None:
    kind = event["type"]
    if kind == "waiting":
        return "waiting for the earlier trainer of this run to end (it is saving its checkpoint)"
    if kind == "loading":
        return f"loading the {event['family']} base model" if event.get("family") else "loading the base model"
    if kind == "cache":
        return f"encoding images and captions {event['done']}/{event['total']} ({event['hits']} cached)"
    if kind == "step":
        return (f"step {event['step']}/{event['total_steps']} · loss {event['loss']:.4f} "
                f"(smoothed {event['smoothed_loss']:.4f}) · {event['images_per_s']:.2f} img/s · "
                f"eta {format_seconds(event['eta_s'])}")
    if kind == "resume":
        return f"continuing from the checkpoint of step {event['step']}"
    if kind == "saving":
        return f"saving a checkpoint at step {event['step']}"
    if kind == "checkpoint":
        return f"checkpoint saved at step {event['step']}"
    if kind == "sampling":
        return f"drawing {event['prompts']} validation sample(s) at step {event['step']}"
    if kind == "sample":
        return f"validation sample at step {event['step']}"
    if kind == "cancelled":
        return f"stopped at step {event['step']}: the checkpoint is kept, queue again to continue"
    if kind == "warning":
        return f"warning: {event['message']}"
    if kind == "done":
        return f"done: {event['steps']} steps in {format_seconds(event['seconds'])} · {Path(event['lora']).name}"
    return None


BETWEEN_STEPS = ("saving", "checkpoint", "sampling", "sample", "warning", "cancelled")


class Progress:
    """Events → ComfyUI's progress bar, the text on the node, and the newest sample as preview."""

    def __init__(self, node_id: str | None):
        from server import PromptServer

        self.node_id = node_id
        self.server = PromptServer.instance
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.step_line: str | None = None  # kept on the node under what happens between and after steps

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "start":
            self.bar.update_absolute(event["start_step"], event["total_steps"])
        elif kind == "step":
            self.bar.update_absolute(event["step"], event["total_steps"])
        elif kind == "sample":
            preview = Image.open(event["path"]).convert("RGB")
            self.bar.update_absolute(self.bar.current, preview=("PNG", preview, 512))
        text = progress_text(event)
        if kind == "step":
            self.step_line = text
        elif text and self.step_line and kind in BETWEEN_STEPS:
            text = f"{self.step_line}\n{text}"
        if text and self.node_id is not None:
            self.server.send_progress_text(text, self.node_id)


def sample_images(paths_: list[str], size: int) -> object:
    newest_step = [p for p in paths_ if Path(p).name.split("-")[1] == Path(paths_[-1]).name.split("-")[1]]
    pictures = [Image.open(p).convert("RGB") for p in newest_step] if paths_ else []
    if not pictures:
        pictures = [Image.new("RGB", (size, size), (0, 0, 0))]
    side = pictures[0].size
    return to_image_batch([p.resize(side) for p in pictures])


def outputs(cfg: RunConfig, lora: Path, record: RunRecord, title: str) -> io.NodeOutput:
    curve = loss_curve(record.steps, record.losses, record.smoothed, title=title)
    curve_path = Path(cfg.run_dir) / "loss_curve.png"
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    curve.save(curve_path)
    steps = record.steps[-1] if record.steps else record.total_steps
    ui = {"lora_path": [str(lora)], "lora_name": [lora.name], "run_dir": [cfg.run_dir], "steps": [steps],
          "loss_curve": [str(curve_path)]}
    return io.NodeOutput(lora.name, str(lora), to_image_batch([curve]),
                         sample_images(record.samples, cfg.data.resolution), steps, ui=ui)


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def model_section(base_model: str, text_encoders: list[str], vae: str) -> dict:
    """The config's model section: the base model and the text encoder / VAE files chosen beside it, checked
    against what the family read from the weights needs, before anything is written or launched."""
    model_path = paths.resolve_base_model(base_model)
    family = detect_family(model_path)
    section = {
        "path": str(model_path), "family": family, "tokenizer_dir": str(paths.comfy_tokenizer_dir()),
        "text_encoders": [str(paths.resolve_listed("text_encoders", name, "text encoder"))
                          for name in text_encoders if name != paths.NO_FILE],
        "vae": None if vae == paths.NO_FILE else str(paths.resolve_listed("vae", vae, "VAE")),
    }
    model = ModelConfig(**section)
    get_family(family).for_model(model).check(model)  # e.g. a diffusion model without its text encoders
    return section


def build_config(base_model: str, dataset: dict, lora_config: dict, output_name: str, overwrite: bool,
                 train: dict, sample: dict, text_encoders: tuple[str, ...] = (), vae: str = paths.NO_FILE) -> RunConfig:
    """The validated run config, its identity and its run folder (named after the output and the identity)."""
    stem = paths.safe_output_name(output_name)
    model = model_section(base_model, list(text_encoders), vae)
    family = model["family"]
    sample = {"guidance_scale": get_family(family).sample_guidance, **sample}
    raw = {
        "run_dir": "pending",
        "model": model,
        "data": {"manifest": dataset["manifest"], **dataset["settings"],
                 "resolution": dataset["settings"]["resolution"] or get_family(family).default_resolution},
        "lora": dict(lora_config),
        "train": {**train, "cache_dir": str(paths.cache_dir())},
        "sample": sample,
        "output": {"lora_path": str(paths.lora_file(stem)), "overwrite": overwrite, "name": stem},
    }
    try:
        cfg = parse_config(raw)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    get_family(family).check_adapter(cfg.lora)
    cfg.output.run_id = run_identity(cfg, dataset["content"])
    cfg.run_dir = str(paths.runs_dir() / f"{stem}-{cfg.output.run_id[:12]}")
    return cfg


def write_run_folder(cfg: RunConfig, accelerate_config: Path | None) -> tuple[Path, Path | None]:
    """RUN_DIR/config.json, and a copy of the accelerate config there (argv names only paths the pack made)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config_path.write_text(cfg.to_json() + "\n", encoding="utf-8")
    if accelerate_config is None:
        return config_path, None
    copy = run_dir / "accelerate.yaml"
    copy.write_bytes(accelerate_config.read_bytes())
    return config_path, copy


def require_launchable(cfg: RunConfig, num_processes: int, visible_gpus: str | None,
                       accelerate_config: Path | None) -> None:
    """Everything that would fail the run after it started, checked before anything is written or launched."""
    problems = output_problems(Path(cfg.output.lora_path), Path(cfg.run_dir))
    if accelerate_config is None:
        problems += launch_problems(num_processes, cfg.train.device, visible_gpus, *machine_devices())
    elif num_processes != 1:
        problems.append(f"num_processes {num_processes}: with an accelerate config the file sets the processes "
                        "(its num_processes, over all machines); leave num_processes at 1")
    if problems:
        raise ValueError("\n".join(problems))


def run_training(cfg: RunConfig, num_processes: int, gpu_ids: str, accelerate_config: str,
          node_id: str | None) -> io.NodeOutput:
    """Train (or continue, or reuse) the run of `cfg` and return the node's outputs."""
    visible_gpus = parse_gpu_ids(gpu_ids)
    chosen_config = None
    if accelerate_config != NO_ACCELERATE_CONFIG:
        chosen_config = paths.resolve_accelerate_config(accelerate_config)
    lora, run_dir = Path(cfg.output.lora_path), Path(cfg.run_dir)
    title = f"{lora.name} · {Path(cfg.model.path).name}"
    existing = existing_lora(lora, cfg)
    if existing is Existing.DONE:
        return outputs(cfg, lora, read_record(run_dir / "events.jsonl"), title)
    if existing is Existing.OURS:
        cfg.output.overwrite = True  # our own file, continued or re-sampled by the same run
    elif existing is Existing.FOREIGN and not cfg.output.overwrite:
        raise ValueError(f"{lora} exists and was not made by this graph; turn on overwrite or change "
                         "output_name")
    require_launchable(cfg, num_processes, visible_gpus, chosen_config)
    progress, interrupted = Progress(node_id), comfy.model_management.processing_interrupted
    if not wait_for_run_folder(run_dir, interrupted, progress):
        comfy.model_management.throw_exception_if_processing_interrupted()
    config_path, accelerate_copy = write_run_folder(cfg, chosen_config)

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    process = TrainerProcess(launch_argv(config_path, num_processes, accelerate_copy), run_dir, visible_gpus)
    finished = follow(process, progress, interrupted)
    if not finished:
        comfy.model_management.throw_exception_if_processing_interrupted()
    return outputs(cfg, lora, read_record(run_dir / "events.jsonl"), title)


class LoraFoundryTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryTrain",
            display_name="LoRA Foundry Train",
            category="LoRA Foundry",
            description="Train a LoRA in a separate accelerate-launched process; cancel keeps the last checkpoint.",
            **search_aliases("train lora", "lora trainer", "dreambooth"),
            is_output_node=True,
            inputs=[
                io.Combo.Input(
                    "base_model",
                    options=paths.base_models() or [""],
                    tooltip=f"A checkpoint from models/checkpoints, a diffusion model from models/diffusion_models "
                    f"(with its text encoders and VAE chosen below), or a diffusers folder from models/diffusers: "
                    f"{TRAINED_NAMES}, read from the file",
                ),
                Dataset.Input(
                    "dataset",
                    tooltip="From the LoRA Foundry Dataset node",
                ),
                LoraConfigType.Input(
                    "lora_config",
                    tooltip="From the LoRA Foundry LoRA Config node",
                ),
                io.String.Input(
                    "output_name",
                    default="my-lora",
                    tooltip="File name of the LoRA in models/loras (without .safetensors)",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing LoRA of that name (off: an existing file is an error)",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-5,
                    round=False,
                    tooltip="AdamW learning rate",
                ),
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Images per step on each process",
                ),
                io.Int.Input(
                    "gradient_accumulation_steps",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Batches whose gradients add up to one optimizer step",
                ),
                io.Int.Input(
                    "epochs",
                    default=200,
                    min=0,
                    max=100_000,
                    tooltip="Passes over the dataset (ignored when max_steps is set)",
                ),
                io.Int.Input(
                    "max_steps",
                    default=0,
                    min=0,
                    max=10_000_000,
                    tooltip="Optimizer steps to train (0: epochs decide)",
                ),
                io.Combo.Input(
                    "lr_scheduler",
                    options=list(typing.get_args(LrScheduler)),
                    default="constant",
                    tooltip="Learning-rate schedule (diffusers get_scheduler)",
                ),
                io.Int.Input(
                    "lr_warmup_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Steps of linear warmup",
                    **advanced(),
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(typing.get_args(Optimizer)),
                    default="adamw",
                    tooltip="adamw8bit needs a CUDA GPU and bitsandbytes",
                ),
                io.Float.Input(
                    "max_grad_norm",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Clip gradients to this norm (0: no clipping)",
                ),
                io.Combo.Input(
                    "mixed_precision",
                    options=list(typing.get_args(MixedPrecision)),
                    default="auto",
                    tooltip="Precision of the frozen model; LoRA weights stay fp32. auto: bf16 on a GPU that has "
                    "it, else fp16 on CUDA, fp32 on the CPU and on Apple silicon",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Less GPU memory for about 20-30% more time per step",
                ),
                io.Float.Input(
                    "min_snr_gamma",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.5,
                    tooltip="Min-SNR loss weighting (0: off; 5 is common)",
                    **advanced(),
                ),
                io.Float.Input(
                    "noise_offset",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Offset noise for darker darks / brighter brights (0: off)",
                    **advanced(),
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,
                    tooltip="Seed of everything random in training (part of the run's identity: a changed seed "
                    "trains anew)",
                    **advanced(),
                ),
                io.Int.Input(
                    "save_every_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Checkpoint every N steps (0: only at the end or on cancel)",
                ),
                io.String.Input(
                    "validation_prompts",
                    default="",
                    multiline=True,
                    tooltip="One prompt per line, drawn with the LoRA during training (empty: none)",
                ),
                io.String.Input(
                    "negative_prompt",
                    default="",
                    tooltip="Negative prompt of the validation samples",
                ),
                io.Int.Input(
                    "sample_every_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Draw the validation prompts every N steps (0: once, at the end)",
                ),
                io.Int.Input(
                    "sample_steps",
                    default=20,
                    min=1,
                    max=200,
                    tooltip="Sampling steps per validation image",
                    **advanced(),
                ),
                io.Combo.Input(
                    "device",
                    options=list(typing.get_args(Device)),
                    default="auto",
                    tooltip="auto: a CUDA GPU, then Apple silicon (mps), then the CPU",
                    **advanced(),
                ),
                io.Int.Input(
                    "num_processes",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Training processes (one per GPU, at most the GPUs there are; on the CPU the cores); the "
                    "batch is per process. With an accelerate config the file sets them: leave 1",
                    **advanced(),
                ),
                io.String.Input(
                    "gpu_ids",
                    default="",
                    tooltip="Which GPUs, e.g. 0,1 (empty: all visible)",
                    **advanced(),
                ),
                io.Combo.Input(
                    "accelerate_config",
                    options=[NO_ACCELERATE_CONFIG] + paths.user_accelerate_configs(),
                    tooltip="An accelerate config file from ComfyUI's user folder, lora-foundry/accelerate/ "
                    "(several machines)",
                    **advanced(),
                ),
                io.Combo.Input(
                    "text_encoder_1",
                    options=paths.model_files("text_encoders"),
                    default=paths.NO_FILE,
                    optional=True,
                    tooltip="For a diffusion model from models/diffusion_models: a text encoder from "
                    "models/text_encoders (FLUX.1: clip_l and t5xxl, in either order; Z-Image: qwen_3_4b; none: in "
                    "the model file)",
                ),
                io.Combo.Input(
                    "text_encoder_2",
                    options=paths.model_files("text_encoders"),
                    default=paths.NO_FILE,
                    optional=True,
                    tooltip="The second text encoder, as DualCLIPLoader takes them (none: in the model file)",
                ),
                io.Combo.Input(
                    "vae",
                    options=paths.model_files("vae"),
                    default=paths.NO_FILE,
                    optional=True,
                    tooltip="For a diffusion model: its VAE from models/vae (FLUX.1 and Z-Image: ae.safetensors; "
                    "none: in the model file)",
                ),
                io.Combo.Input(
                    "base_quantization",
                    options=list(typing.get_args(BaseQuantization)),
                    default="none",
                    optional=True,
                    tooltip="Store the frozen model in fewer bits (the LoRA stays full precision): int8 halves "
                    "bf16's memory (torchao, any device), nf4 quarters it (bitsandbytes, CUDA only); FLUX.1 on "
                    "a 24 GB GPU needs one of them",
                    **advanced(),
                ),
            ],
            outputs=[
                io.String.Output(display_name="lora_name"),
                io.String.Output(display_name="lora_path"),
                io.Image.Output(display_name="loss_curve"),
                io.Image.Output(display_name="samples"),
                io.Int.Output(display_name="steps"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        base_model: str,
        dataset: dict,
        lora_config: dict,
        output_name: str,
        overwrite: bool,
        learning_rate: float,
        batch_size: int,
        gradient_accumulation_steps: int,
        epochs: int,
        max_steps: int,
        lr_scheduler: str,
        lr_warmup_steps: int,
        optimizer: str,
        max_grad_norm: float,
        mixed_precision: str,
        gradient_checkpointing: bool,
        min_snr_gamma: float,
        noise_offset: float,
        seed: int,
        save_every_steps: int,
        validation_prompts: str,
        negative_prompt: str,
        sample_every_steps: int,
        sample_steps: int,
        device: str,
        num_processes: int,
        gpu_ids: str,
        accelerate_config: str,
        text_encoder_1: str = paths.NO_FILE,
        text_encoder_2: str = paths.NO_FILE,
        vae: str = paths.NO_FILE,
        base_quantization: str = "none",
    ) -> io.NodeOutput:
        training = {
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "epochs": epochs,
            "max_steps": max_steps,
            "lr_scheduler": lr_scheduler,
            "lr_warmup_steps": lr_warmup_steps,
            "optimizer": optimizer,
            "max_grad_norm": max_grad_norm,
            "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing,
            "min_snr_gamma": min_snr_gamma,
            "noise_offset": noise_offset,
            "seed": seed,
            "save_every_steps": save_every_steps,
            "device": device,
            "base_quantization": base_quantization,
        }
        sampling = {
            "prompts": prompt_lines(validation_prompts),
            "negative_prompt": negative_prompt,
            "every_steps": sample_every_steps,
            "steps": sample_steps,
            "seed": seed,
        }
        cfg = build_config(base_model, dataset, lora_config, output_name, overwrite, training, sampling,
                           (text_encoder_1, text_encoder_2), vae)
        return run_training(cfg, num_processes, gpu_ids, accelerate_config, cls.hidden.unique_id)
