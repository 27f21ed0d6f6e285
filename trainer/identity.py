"""What makes two runs the same run: the settings that change the trained weights, and the data's content.

Left out on purpose, so that changing them continues or re-samples a run instead of training it anew:
- where things are written or read from (run and cache folders, the manifest's path, the tokenizer folder):
  the data enters through its content key (picture bytes and captions) instead;
- the validation samples, the checkpoint interval, the device, gradient checkpointing (the same maths) and
  resume;
- the length (max_steps, epochs) when the learning-rate schedule does not depend on it: a longer run of a
  constant schedule is the shorter run continued. With a decaying schedule the length shapes every step's
  learning rate, so a new length is a new run.
"""

from __future__ import annotations

from pathlib import Path

from .cache import fingerprint
from .config import RunConfig

LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup", "adafactor")  # adafactor: 1/sqrt(step), no length
_NEUTRAL = {
    "model": ("tokenizer_dir",),
    "data": ("manifest", "folder"),
    "train": ("cache_dir", "device", "gradient_checkpointing", "save_every_steps", "resume"),
    "output": ("overwrite", "lora_path", "run_id"),
}


# settings added after runs were first identified: at their defaults they are left out, so a run made before
# they existed keeps its identity (and its LoRA stays this run's own)
_LATER_DEFAULTS = {
    "model": {"zero_terminal_snr": False, "text_encoders": [], "vae": None},
    "data": {"trigger_word": "", "caption_dropout": 0.0, "shuffle_tags": False, "keep_tags": 0},
    "lora": {"train_text_encoder_2": False, "adapter": "lora", "dora": False, "lokr_factor": -1,
             "lokr_decompose_both": False},
    "train": {"text_encoder_2_learning_rate": None, "timestep_sampling": "auto", "logit_mean": 0.0,
              "logit_std": 1.0, "timestep_shift": 0.0, "guidance": 1.0, "base_quantization": "none"},
}


def length_free(cfg: RunConfig) -> bool:
    return cfg.train.lr_scheduler in LENGTH_FREE_SCHEDULES


def run_identity(cfg: RunConfig, data_content: str) -> str:
    """A hex key equal for two configs exactly when they train the same weights (up to the length, when the
    schedule allows continuing). `data_content` is the dataset's content key."""
    raw = cfg.to_dict()
    for key in ("run_dir", "sample"):
        raw.pop(key)
    for section, names in _NEUTRAL.items():
        for name in names:
            raw[section].pop(name, None)
    for section, defaults in _LATER_DEFAULTS.items():
        for name, default in defaults.items():
            if raw[section].get(name) == default:
                raw[section].pop(name)
    raw["model"]["path"] = Path(cfg.model.path).name
    if cfg.model.text_encoders:  # by name, as the model file: the same files elsewhere are the same run
        raw["model"]["text_encoders"] = sorted(Path(path).name for path in cfg.model.text_encoders)
    if cfg.model.vae:
        raw["model"]["vae"] = Path(cfg.model.vae).name
    if length_free(cfg):
        raw["train"].pop("max_steps")
        raw["train"].pop("epochs")
    return fingerprint("run-identity-v1", raw, data_content)
