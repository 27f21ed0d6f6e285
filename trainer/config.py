"""The run configuration: one typed schema shared by the trainer and the ComfyUI nodes.

A config is a JSON object with one section per concern. `load_config` validates it completely before
anything heavy happens and raises `ConfigError` listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .optimizers import schedule_problems

Crop = Literal["center", "random"]
TargetPreset = Literal["attention", "attention_ff", "all"]
LoraInit = Literal["gaussian", "default"]  # inits that change the base weights cannot be exported
# what each adapter is and how it is written: trainer/adapters.py
Adapter = Literal["lora", "locon", "loha", "lokr"]
# what each optimizer and schedule is, and which pairs are refused: trainer/optimizers.py
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree"]
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "adafactor"
]
MixedPrecision = Literal["no", "fp16", "bf16", "auto"]  # auto: bf16 or fp16 on CUDA, fp32 elsewhere
Device = Literal["auto", "cpu", "cuda", "mps"]
PredictionType = Literal["epsilon", "v_prediction"]
Family = Literal["auto", "sd15", "sdxl", "flux", "zimage"]  # auto: read from the base model (families/detect.py)
# how the flow-matching families draw σ (families/flow.py); auto: the family's own choice
TimestepSampling = Literal["auto", "uniform", "logit_normal", "sigmoid"]
# the frozen denoiser's storage (trainer/quantize.py): int8 through torchao (CPU and CUDA), nf4 through
# bitsandbytes (CUDA)
BaseQuantization = Literal["none", "int8", "nf4"]


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    path: str = ""  # single-file checkpoint (.safetensors/.ckpt), diffusion model file, or diffusers folder
    family: Family = "auto"
    # the families whose diffusion model comes alone (models/diffusion_models): their text encoder files
    # (models/text_encoders, any order: each is recognised by its weights) and VAE file (models/vae)
    text_encoders: list[str] = field(default_factory=list)
    vae: str | None = None
    tokenizer_dir: str | None = None  # None: search (see families/tokenizers.py: find_tokenizer_dir)
    prediction_type: PredictionType | None = None  # None: from the scheduler config
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero SNR at its end (v-prediction models)


@dataclass
class DataConfig:
    manifest: str | None = None  # JSON manifest written by the caller (see data.py)
    folder: str | None = None  # or an image folder with .txt captions / metadata.jsonl / .csv
    resolution: int = 0  # 0: the family's own (families/*.py default_resolution)
    crop: Crop = "center"
    random_flip: bool = True
    top_rows: int = 0  # 0: every row
    repeats: int = 1
    bucketing: bool = True
    bucket_step: int = 64
    max_bucket_aspect: float = 2.0
    # captions (trainer/captions.py): the trigger word goes first in every caption; dropout trains that share
    # of the samples on the empty caption; shuffling reorders the comma-separated tags behind the first
    # keep_tags (and the trigger word) at every step
    trigger_word: str = ""
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0


@dataclass
class LoraConfig:
    adapter: Adapter = "lora"  # locon: LoRA on the denoiser's convolutions too
    rank: int = 4  # LoRA, LoHa: at most the adapted layers' smaller side; LoKr: any (it picks the split factors)
    alpha: float = 4.0
    dora: bool = False  # weight-decomposed LoRA (LoRA and LoCon)
    lokr_factor: int = -1  # LoKr's Kronecker factor: -1 the one nearest the square root, else a divisor
    lokr_decompose_both: bool = False  # LoKr: split the first factor into two low-rank matrices too
    init: LoraInit = "gaussian"
    targets: TargetPreset = "attention"
    dropout: float = 0.0
    train_text_encoder: bool = False  # the (first) text encoder
    train_text_encoder_2: bool = False  # the second text encoder, for families that have one (SDXL)


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 200
    max_steps: int = 0  # 0: epochs decide
    learning_rate: float = 1e-4
    text_encoder_learning_rate: float | None = None  # None: learning_rate
    text_encoder_2_learning_rate: float | None = None  # None: text_encoder_learning_rate
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    optimizer: Optimizer = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: MixedPrecision = "fp16"
    device: Device = "auto"
    gradient_checkpointing: bool = False
    base_quantization: BaseQuantization = "none"
    min_snr_gamma: float = 0.0  # 0: off
    noise_offset: float = 0.0
    # flow-matching families (FLUX ...): how σ is drawn, its shift, and FLUX dev's guidance input
    timestep_sampling: TimestepSampling = "auto"
    logit_mean: float = 0.0  # logit_normal's mean (sigmoid: 0)
    logit_std: float = 1.0  # logit_normal's standard deviation, sigmoid's scale
    timestep_shift: float = 0.0  # 0: the family's own (FLUX dev: by resolution, schnell: 1); else a fixed shift
    guidance: float = 1.0  # the guidance value a guidance-distilled model (FLUX dev) is trained at
    save_every_steps: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    resume: bool = True
    cache_dir: str | None = None  # None: RUN_DIR/cache


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    every_steps: int = 0  # 0: only after the last step (when prompts are given)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 0  # 0: the training resolution
    height: int = 0


@dataclass
class OutputConfig:
    lora_path: str = ""  # the final LoRA file (.safetensors)
    overwrite: bool = False
    name: str = ""  # title in the file's metadata; "" → the file's stem
    run_id: str = ""  # the run's identity (trainer/identity.py), kept in the LoRA's metadata by the config


@dataclass
class RunConfig:
    run_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def cache_dir(self) -> Path:
        return Path(self.train.cache_dir or Path(self.run_dir) / "cache")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_value(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_value(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected an object, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(f"{where}{key}: unknown key (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name in fields:
        if name not in raw:
            continue
        tp, value, path = hints[name], raw[name], f"{where}{name}"
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{path}.", problems)
        elif isinstance(value, float) and not math.isfinite(value):
            # JSON readers take NaN and Infinity, and every range check passes NaN (its comparisons are false)
            problems.append(f"{path}: must be a finite number, got {value}")
        elif _check_value(value, tp):
            values[name] = float(value) if tp is float else value
        else:
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return cls(**values)


def _range_problems(cfg: RunConfig) -> list[str]:
    d, lo, t, s, m = cfg.data, cfg.lora, cfg.train, cfg.sample, cfg.model
    checks = [
        (not cfg.run_dir, "run_dir: required"),
        (not m.path, "model.path: required"),
        (not cfg.output.lora_path, "output.lora_path: required"),
        (
            bool(cfg.output.lora_path) and not cfg.output.lora_path.endswith(".safetensors"),
            "output.lora_path: must end with .safetensors",
        ),
        ((d.manifest is None) == (d.folder is None), "data: give exactly one of manifest, folder"),
        (
            d.resolution != 0 and (d.resolution < 64 or d.resolution % 8),
            "data.resolution: 0 (the model's own) or a multiple of 8, at least 64",
        ),
        (d.top_rows < 0, "data.top_rows: 0 (all) or more"),
        (d.repeats < 1, "data.repeats: 1 or more"),
        (d.bucket_step < 8 or d.bucket_step % 8, "data.bucket_step: a multiple of 8"),
        (d.max_bucket_aspect < 1.0, "data.max_bucket_aspect: 1.0 or more"),
        (not 0.0 <= d.caption_dropout < 1.0, "data.caption_dropout: in [0, 1)"),
        (d.keep_tags < 0, "data.keep_tags: 0 or more"),
        (d.keep_tags > 0 and not d.shuffle_tags, "data.keep_tags: only means something with shuffle_tags on"),
        ("\n" in d.trigger_word or "\r" in d.trigger_word, "data.trigger_word: one line"),
        (lo.rank < 1, "lora.rank: 1 or more"),
        (lo.dora and lo.adapter not in ("lora", "locon"), f"lora.dora: DoRA is a LoRA variant, not {lo.adapter!r}"),
        (lo.dora and t.base_quantization != "none",
         "lora.dora: DoRA needs the base weights' norms, which a quantized base (train.base_quantization) changes"),
        (lo.lokr_factor == 0 or lo.lokr_factor < -1, "lora.lokr_factor: -1 (nearest the square root) or 1 or more"),
        (lo.adapter != "lokr" and (lo.lokr_factor != -1 or lo.lokr_decompose_both),
         "lora.lokr_factor, lokr_decompose_both: only for adapter 'lokr'"),
        (lo.adapter in ("loha", "lokr") and lo.dropout > 0,
         f"lora.dropout: LoRA's dropout; {lo.adapter} trains without it here"),
        (lo.alpha <= 0, "lora.alpha: greater than 0"),
        (not 0.0 <= lo.dropout < 1.0, "lora.dropout: in [0, 1)"),
        (t.batch_size < 1, "train.batch_size: 1 or more"),
        (t.gradient_accumulation_steps < 1, "train.gradient_accumulation_steps: 1 or more"),
        (t.epochs < 1 and t.max_steps < 1, "train: epochs or max_steps must be 1 or more"),
        (t.epochs < 0, "train.epochs: 0 or more"),
        (t.max_steps < 0, "train.max_steps: 0 or more"),
        (t.learning_rate <= 0, "train.learning_rate: greater than 0"),
        (
            t.text_encoder_learning_rate is not None and t.text_encoder_learning_rate <= 0,
            "train.text_encoder_learning_rate: greater than 0",
        ),
        (
            t.text_encoder_2_learning_rate is not None and t.text_encoder_2_learning_rate <= 0,
            "train.text_encoder_2_learning_rate: greater than 0",
        ),
        (t.lr_warmup_steps < 0, "train.lr_warmup_steps: 0 or more"),
        (not 0 <= t.adam_beta1 < 1, "train.adam_beta1: in [0, 1)"),
        (not 0 <= t.adam_beta2 < 1, "train.adam_beta2: in [0, 1)"),
        (t.weight_decay < 0, "train.weight_decay: 0 or more"),
        (t.adam_epsilon <= 0, "train.adam_epsilon: greater than 0"),
        (t.max_grad_norm < 0, "train.max_grad_norm: 0 (off) or more"),
        (t.min_snr_gamma < 0, "train.min_snr_gamma: 0 (off) or more"),
        (t.noise_offset < 0, "train.noise_offset: 0 (off) or more"),
        (t.logit_std <= 0, "train.logit_std: greater than 0"),
        (t.timestep_shift < 0, "train.timestep_shift: 0 (the family's own) or more"),
        (t.guidance < 0, "train.guidance: 0 or more"),
        (t.save_every_steps < 0, "train.save_every_steps: 0 (end only) or more"),
        (s.every_steps < 0, "sample.every_steps: 0 or more"),
        (s.steps < 1, "sample.steps: 1 or more"),
        (s.guidance_scale < 0, "sample.guidance_scale: 0 or more"),
        (s.width < 0 or s.width % 8, "sample.width: 0 (training resolution) or a multiple of 8"),
        (s.height < 0 or s.height % 8, "sample.height: 0 (training resolution) or a multiple of 8"),
    ]
    return [message for failed, message in checks if failed] + schedule_problems(t)


def parse_config(raw: Any) -> RunConfig:
    """Validate a decoded JSON object into a RunConfig; raise ConfigError naming every problem."""
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    # a field with a type problem holds its default now: skip its range check
    named = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in _range_problems(cfg) if p.split(":", 1)[0] not in named]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: not valid JSON ({exc})"]) from exc
    return parse_config(raw)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(cfg.to_json() + "\n", encoding="utf-8")
