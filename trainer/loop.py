"""The training run: set up once, then the step loop (`train`), readable top to bottom."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from .adapters import adapter_parameters, peft_config, require_rank_fits, targeted_layers
from .captions import caption_at
from .config import RunConfig
from .data import check_images, load_items
from .encode import Encoded, captions_encoded_every_step, empty_caption_encoding, encode_dataset
from .events import EventLog
from .families import DENOISER, Components, ModelFamily, Objective, family_for
from .finite import (
    WEIGHTS_PROBLEM,
    NonFiniteTraining,
    non_finite_message,
    non_finite_problem,
    require_finite_tensors,
    weights_finite,
)
from .lora_file import (
    base_model_hashes,
    count_tags,
    dataset_name,
    kohya_state_dict,
    lora_metadata,
    save_lora_file,
)
from .optimizers import averaged_weights, current_lr, make_lr_scheduler, make_optimizer
from .preflight import (
    checkpoints_at_peak,
    choose_device,
    disk_problems,
    machine_devices,
    output_problems,
    process_problems,
    require,
    run_bytes,
    usable_cores,
)
from .quantize import quantize_frozen
from .resume import load_checkpoint, newest_checkpoint, save_checkpoint
from .sampling import render_samples
from .schedule import EpochPlan, Slot, derive_seed, draw


class Cancelled(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved where there was training to keep."""


def choose_precision(requested: str, device: str, bf16_supported: bool, warn: Callable[[str], None]) -> str:
    """'auto' → bf16 on a CUDA GPU that has it, else fp16 on CUDA, fp32 elsewhere. fp16 off CUDA falls back
    to fp32 with a warning: accelerate applies no fp16 autocast on the CPU, and fp16 training on MPS is not
    something we can test."""
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if device == "cuda" else "no"
    if requested == "fp16" and device != "cuda":
        warn(f"fp16 mixed precision needs a CUDA GPU; training on {device} in fp32 (mixed_precision 'no')")
        return "no"
    return requested


def make_accelerator(cfg: RunConfig, warn: Callable[[str], None]) -> Accelerator:
    t = cfg.train
    gpus, has_mps = machine_devices()
    has_cuda = gpus > 0
    device = choose_device(t.device, has_cuda, has_mps)
    bf16_ok = has_cuda and torch.cuda.is_bf16_supported()
    precision = choose_precision(t.mixed_precision, device, bf16_ok, warn)
    if device == "cpu":
        torch.set_num_threads(cpu_threads(os.environ.get("OMP_NUM_THREADS"), os.environ.get("LOCAL_WORLD_SIZE")))
    # before the group forms: too many processes for the machine is one message, not a machine out of memory
    require(process_problems(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device, gpus))
    # cpu=True is what makes a multi-process launch on the CPU join one gloo group; accelerate picks mps by
    # itself when it is there and cpu is False
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=precision)
    require_one_group(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    return accelerator


def cpu_threads(omp_num_threads: str | None, local_world_size: str | None) -> int:
    """Threads for training on the CPU: the cores this process may run on, shared by the local processes.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which on the CPU made every step
    run on one core; so 1 (or unset) means "choose", and any other value is kept as the user's choice."""
    if omp_num_threads and omp_num_threads.isdigit() and int(omp_num_threads) > 1:
        return int(omp_num_threads)
    local = int(local_world_size) if local_world_size and local_world_size.isdigit() else 1
    usable = usable_cores()
    return max(1, usable // max(1, local))


def require_one_group(world_size: int, processes: int) -> None:
    if world_size > 1 and processes == 1:
        raise RuntimeError(
            f"launched as {world_size} processes but they did not form one group; each would train alone. "
            "Launch with --multi_gpu (on the CPU too) or set train.device to match the machine"
        )


def require_batch_fits(cfg: RunConfig, images: int, processes: int) -> None:
    if cfg.train.batch_size * processes > images * cfg.data.repeats:
        raise ValueError(
            f"train.batch_size {cfg.train.batch_size} x {processes} process(es) is larger than the dataset "
            f"({images} images x {cfg.data.repeats} repeats); lower it or add images"
        )


def require_pixel_multiple(cfg: RunConfig, family: ModelFamily) -> None:
    multiple = family.pixel_multiple
    sides = {"data.resolution": cfg.data.resolution, "data.bucket_step": cfg.data.bucket_step,
             "sample.width": cfg.sample.width, "sample.height": cfg.sample.height}
    wrong = [f"{name} {value}" for name, value in sides.items() if value % multiple]
    if wrong:
        raise ValueError(f"{family.label} needs picture sides in multiples of {multiple}: {', '.join(wrong)}")


def failure_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def trained_parts(cfg: RunConfig, family: ModelFamily, components: Components) -> dict[str, torch.nn.Module]:
    """The models that get adapters, by LoRA prefix: the denoiser, and the text encoders the config trains."""
    parts = components.parts()
    return {prefix: parts[prefix] for prefix in [DENOISER, *family.trained_text_encoders(cfg.lora)]}


def add_lora(cfg: RunConfig, family: ModelFamily, components: Components) -> dict[str, list[torch.nn.Parameter]]:
    """Add the adapters (seeded, so every process starts equal) and return each part's trainable parameters,
    in fp32."""
    lo = cfg.lora
    torch.manual_seed(cfg.train.seed)
    params: dict[str, list[torch.nn.Parameter]] = {}
    for prefix, module in trained_parts(cfg, family, components).items():
        config = peft_config(lo, family.adapter_targets(prefix, lo))
        inject_adapter_in_model(config, module)  # works for diffusers and transformers models alike
        params[prefix] = []
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                params[prefix].append(p)
    return params


def optimizer_groups(
    cfg: RunConfig, family: ModelFamily, params: dict[str, list[torch.nn.Parameter]]
) -> list[dict[str, Any]]:
    """One parameter group per trained part, each at its own learning rate."""
    return [{"params": group, "lr": family.learning_rate(prefix, cfg.train)} for prefix, group in params.items()]


def total_steps(cfg: RunConfig, plan: EpochPlan) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    return math.ceil(t.epochs * plan.batches_per_epoch / t.gradient_accumulation_steps)


def denoising_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean squared error per sample, over the latents its mask keeps (`mask` (batch, 1, h, w): a masked
    sample's error is averaged with the mask's weights, so a small mask trains as strongly as a whole picture),
    times the per-sample `weights`, averaged over the batch."""
    squared = F.mse_loss(pred.float(), target.float(), reduction="none")
    dims = tuple(range(1, pred.dim()))
    if mask is None:
        per_sample = squared.mean(dim=dims)
    else:
        per_sample = (squared * mask).mean(dim=dims) / mask.mean(dim=dims)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def assemble_batch(
    cfg: RunConfig,
    encoded: list[Encoded],
    slots: list[Slot],
    epoch: int,
    objective: Objective,
    empty_text: dict[str, torch.Tensor] | None,
) -> dict[str, Any]:
    """Stack latents / framing / text for the slots, with each slot's own seeded noise, timestep, flip and
    caption. The text comes from the cache (a dropped caption: `empty_text`) unless the captions are encoded
    every step; then the batch carries its captions instead."""
    latents, noise, steps, framing, masks, captions, texts = [], [], [], [], [], [], []
    for slot in slots:
        sample = encoded[slot.item]
        shape = tuple(sample.latents.shape)
        d = draw(cfg.train.seed, epoch, slot.slot, shape, objective.num_timesteps, cfg.train.noise_offset)
        use_flip = d.flip and sample.latents_flipped is not None
        latents.append(sample.latents_flipped if use_flip else sample.latents)
        framing.append(sample.framing_flipped if use_flip else sample.framing)
        masks.append(sample.mask_flipped if use_flip else sample.mask)
        noise.append(d.noise)
        steps.append(d.timestep)
        caption = caption_at(sample.caption, cfg.data, cfg.train.seed, epoch, slot.slot)
        captions.append(caption)
        if sample.text is not None:
            texts.append(sample.text if caption == sample.caption else empty_text)
    batch: dict[str, Any] = {
        "latents": torch.stack(latents),
        "noise": torch.stack(noise),
        "timesteps": objective.timesteps(torch.tensor(steps), tuple(latents[0].shape)),  # one bucket a batch
        "framing": torch.stack(framing),
        "captions": captions,
    }
    if any(mask is not None for mask in masks):  # a picture without a mask counts everywhere
        ones = torch.ones_like(latents[0][:1])
        batch["mask"] = torch.stack([ones if mask is None else mask for mask in masks])
    if texts:
        batch["text"] = {name: torch.stack([t[name] for t in texts]) for name in texts[0]}
    return batch


class Trainer:
    """Holds the run's state between setup and the step loop."""

    def __init__(self, cfg: RunConfig, events: EventLog, stop_requested: Callable[[], bool],
                 keep_work: Callable[[], None] = lambda: None):
        self.cfg = cfg
        self.events = events
        self.stop_requested = stop_requested
        self.keep_work = keep_work  # called once there is work a stop should save (trainer/stop.py)
        self.family: ModelFamily | None = None  # read from the base model in setup()
        self.started_at = time.time()
        self.steps_done = self.start_step = 0
        self.last_checkpoint_step = -1
        self.sampled_steps: set[int] = set()
        self._base_model_hashes: dict[str, str] | None = None

    def warn(self, message: str) -> None:
        self.events.emit("warning", message=message)
        tqdm.write(f"warning: {message}")

    def check_stop(self) -> None:
        if self.stop_requested():
            raise Cancelled()

    def check_stop_together(self) -> None:
        """Every process stops at the same step boundary, or collectives would pair up wrongly."""
        flag = torch.tensor(float(self.stop_requested()), device=self.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            raise Cancelled()

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        lora_path = Path(cfg.output.lora_path)
        if lora_path.exists() and not cfg.output.overwrite:
            raise FileExistsError(f"{lora_path} exists; set output.overwrite to replace it")
        require(output_problems(lora_path, Path(cfg.run_dir)))
        self.accelerator = acc = make_accelerator(cfg, self.warn)
        self.device = acc.device
        self.family = family_for(cfg.model)
        self.family.configure(cfg.train)
        cfg.model.family = self.family.name  # "auto" resolved: the LoRA's metadata names the family
        cfg.data.resolution = cfg.data.resolution or self.family.default_resolution
        require_pixel_multiple(cfg, self.family)
        self.items, warnings = load_items(cfg.data)
        for message in warnings:
            self.warn(message)
        check_images(self.items)
        require_batch_fits(cfg, len(self.items), acc.num_processes)
        self.family.trained_text_encoders(cfg.lora)  # a text encoder the family lacks is refused before loading
        self.family.check_adapter(cfg.lora)
        self.check_stop()
        self.events.emit("loading", model=Path(cfg.model.path).name, family=self.family.label)
        self.components = self.family.load(cfg.model, weight_dtype(acc))
        self.check_stop()  # loading cannot be interrupted inside; a stop asked meanwhile is honoured here
        # on the CPU, before the move: the GPU never holds the 16-bit copy of a quantized base
        quantize_frozen(self.components.denoiser, cfg.train.base_quantization, self.device, weight_dtype(acc))
        self._check_adapter_fits()
        self.components.denoiser.to(self.device)
        # the group has formed and the model is loaded: from the cache pass on, a stop lets the unit under way
        # finish, and saves
        self.keep_work()
        self.check_stop()
        with acc.main_process_first():  # the main process fills the disk cache, the others read it
            self.encoded = encode_dataset(cfg, self.family, self.components, self.items, self.device, self._cached)
            self.empty_text = None
            if cfg.data.caption_dropout and not captions_encoded_every_step(cfg, self.family):
                self.empty_text = empty_caption_encoding(cfg, self.family, self.components, self.device)
        self._truncation_warning()
        self._free_encoders()
        buckets = [tuple(e.latents.shape[-2:]) for e in self.encoded]
        global_batch = cfg.train.batch_size * acc.num_processes
        self.plan = EpochPlan(buckets, cfg.data.repeats, global_batch, cfg.train.seed)
        self.total_steps = total_steps(cfg, self.plan)
        params = add_lora(cfg, self.family, self.components)
        if cfg.train.gradient_checkpointing:
            self.components.denoiser.enable_gradient_checkpointing()
        self.params = [p for group in params.values() for p in group]
        optimizer = make_optimizer(cfg.train, optimizer_groups(cfg, self.family, params), self.device.type == "cuda")
        self.lr_scheduler = make_lr_scheduler(cfg.train, optimizer, self.total_steps)
        parts = trained_parts(cfg, self.family, self.components)
        prepared = acc.prepare(*parts.values(), optimizer)
        self.models = dict(zip(parts, prepared[:-1], strict=True))  # LoRA prefix -> the prepared model
        self.optimizer = prepared[-1]
        self.start_step = self.steps_done = self._resume()
        self.events.emit(
            "start",
            total_steps=self.total_steps,
            start_step=self.start_step,
            images=len(self.items),
            masked_images=sum(item.mask is not None for item in self.items),
            buckets={f"{w * 8}x{h * 8}": n for (h, w), n in sorted(Counter(buckets).items())},
            batches_per_epoch=self.plan.batches_per_epoch,
            processes=acc.num_processes,
            device=str(self.device),
            mixed_precision=acc.mixed_precision,
            family=self.family.label,
            trainable_parameters=sum(p.numel() for p in self.params),
        )

    def _check_adapter_fits(self) -> None:
        """Before the adapters are added and the first picture is encoded: the rank fits every adapted layer,
        and the disk holds the LoRA and the checkpoints the run will write (sized from those layers)."""
        cfg, family = self.cfg, self.family
        parameters = 0
        for prefix, module in trained_parts(cfg, family, self.components).items():
            config = peft_config(cfg.lora, family.adapter_targets(prefix, cfg.lora))
            layers = targeted_layers(module, config)
            require_rank_fits(layers, cfg.lora, family.part_name(prefix))
            parameters += adapter_parameters(layers, config)
        checkpoints = checkpoints_at_peak(cfg.train.save_every_steps)
        lora_bytes, checkpoint_bytes = run_bytes(parameters, cfg.train.optimizer, checkpoints)
        require(disk_problems({
            Path(cfg.output.lora_path).parent: (lora_bytes, "the LoRA"),
            Path(cfg.run_dir): (checkpoint_bytes, f"{checkpoints} checkpoint(s) at once"),
        }))

    def _cached(self, done: int, total: int, hits: int) -> None:
        self.events.emit("cache", done=done, total=total, hits=hits)
        self.check_stop()

    def _truncation_warning(self) -> None:
        long = self.family.truncated_captions(self.components, [item.caption for item in self.items])
        if long:
            self.warn(f"{long} caption(s) longer than {self.family.max_tokens} tokens were truncated")

    def _free_encoders(self) -> None:
        """Move the VAE (and a frozen text encoder) off the accelerator before the first step.

        Without validation prompts nothing needs them after the cache pass: their weights go to the meta
        device, which frees the memory on the CPU too (moving to the CPU frees nothing there)."""
        c = self.components
        away = "cpu" if self.cfg.sample.prompts else "meta"
        c.vae.to(away)
        every_step = captions_encoded_every_step(self.cfg, self.family)
        for encoder in c.text_encoders.values():
            # captions encoded every step (a text encoder training, shuffled tags) need the frozen ones too
            encoder.to(self.device if every_step else away)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _resume(self) -> int:
        cfg = self.cfg
        # at most the planned length: a run asked to stop earlier than before resumes from a checkpoint inside it
        newest = newest_checkpoint(cfg.run_dir, at_most=self.total_steps) if cfg.train.resume else None
        if newest is None:
            return 0
        state = load_checkpoint(newest)
        for prefix, model in trained_parts(cfg, self.family, self.components).items():
            weights = {k[len(prefix) + 1 :]: v for k, v in state["adapter"].items() if k.startswith(f"{prefix}.")}
            if not weights:
                raise RuntimeError(f"{newest} holds no adapter weights for {prefix}: it was saved by another "
                                   "setup of this run; delete the run folder's checkpoints to start over")
            set_peft_model_state_dict(model, weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict({k: v for k, v in state["scheduler"].items() if v is not None})
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.events.emit("resume", step=state["step"], checkpoint=newest.name)
        self.last_checkpoint_step = state["step"]
        return state["step"]

    # ---- the step loop ---------------------------------------------------------------------------
    def train(self) -> Path:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.train
        objective = self.components.objective
        accum = t.gradient_accumulation_steps
        rank, world, local = acc.process_index, acc.num_processes, t.batch_size
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="training", disable=not acc.is_main_process)
        smoothed, last_time, batches_cache = None, time.time(), {}
        for model in self.models.values():
            model.train()
        self.optimizer.train()  # schedule-free AdamW steps at its training point (trainer/optimizers.py)
        step = self.start_step
        for step in range(self.start_step, self.total_steps):
            self.check_stop_together()
            torch.manual_seed(derive_seed(t.seed, step, 4))  # LoRA dropout, the same on resume
            losses = []
            for micro in range(accum):
                epoch, index = divmod(step * accum + micro, self.plan.batches_per_epoch)
                if epoch not in batches_cache:
                    batches_cache = {epoch: self.plan.batches(epoch)}
                slots = batches_cache[epoch][index][rank * local : (rank + 1) * local]
                batch = assemble_batch(cfg, self.encoded, slots, epoch, objective, self.empty_text)
                latents, noise = batch["latents"].to(self.device), batch["noise"].to(self.device)
                timesteps = batch["timesteps"].to(self.device)
                noisy = objective.noisy(latents, noise, timesteps)
                target = objective.target(latents, noise, timesteps)
                syncing = micro == accum - 1
                with contextlib.ExitStack() as stack:
                    if not syncing:
                        for model in self.models.values():
                            stack.enter_context(acc.no_sync(model))
                    text = self._text(batch)
                    pred = self.family.predict(self.models[DENOISER], noisy, timesteps, text, batch["framing"])
                    mask = batch["mask"].to(self.device) if "mask" in batch else None
                    loss = denoising_loss(pred, target, objective.loss_weights(timesteps, t.min_snr_gamma), mask)
                    acc.backward(loss / accum)
                losses.append(loss.detach())
            # max_grad_norm 0 measures the norm without clipping (a factor of exactly 1): the guard needs it
            grad_norm = float(acc.clip_grad_norm_(self.params, t.max_grad_norm or math.inf))
            # the loss of every process, before the weights change: all of them stop at one step, or none
            step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
            self._require_finite(step + 1, step_loss, grad_norm)
            self.optimizer.step()
            if not weights_finite(self.params):  # a finite gradient times a huge rate: equal on every process
                self._stop_non_finite(step + 1, WEIGHTS_PROBLEM)
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            done = self.steps_done = step + 1
            lr = current_lr(self.optimizer, self.lr_scheduler)
            smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
            now = time.time()
            seconds, last_time = now - last_time, now
            images_per_s = t.batch_size * world * accum / max(seconds, 1e-9)
            eta = (self.total_steps - done) * seconds
            self.events.emit(
                "step",
                step=done,
                total_steps=self.total_steps,
                epoch=epoch,
                loss=step_loss,
                smoothed_loss=smoothed,
                lr=lr,
                grad_norm=grad_norm,
                images_per_s=images_per_s,
                eta_s=eta,
            )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if t.save_every_steps and done % t.save_every_steps == 0 and done < self.total_steps:
                self.save_checkpoint(done)
            if cfg.sample.prompts and cfg.sample.every_steps and done % cfg.sample.every_steps == 0:
                self.sample(done)
        bar.close()
        # The finished training is kept as a checkpoint before anything else can fail: a failed final write
        # saves on the next queue without retraining, and a longer run continues from here.
        self.save_checkpoint(self.steps_done)
        path = self.save_final()
        # the LoRA is on disk before the last sample: a sample that fails or is cancelled costs no training
        if cfg.sample.prompts and self.total_steps not in self.sampled_steps:
            self.sample(self.total_steps)
        return path

    def _require_finite(self, step: int, loss: float, grad_norm: float) -> None:
        # grad_norm is the same on every process (the gradients are all-reduced), and so is the reduced loss
        problem = non_finite_problem(loss, grad_norm, gradients_may_overflow=self.accelerator.scaler is not None)
        if problem is not None:
            self._stop_non_finite(step, problem)

    def _stop_non_finite(self, step: int, problem: str) -> None:
        kept = self.last_checkpoint_step if self.last_checkpoint_step >= 0 else None
        raise NonFiniteTraining(non_finite_message(step, problem, self.cfg.train.learning_rate,
                                                   self.accelerator.mixed_precision, kept))

    def _text(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's prompt encoding: from the cache, or, with a text encoder training, encoded now (the
        trained encoders as prepared for training, the frozen ones as loaded)."""
        if "text" in batch:
            return {name: value.to(self.device) for name, value in batch["text"].items()}
        encoders = {prefix: self.models.get(prefix, encoder) for prefix, encoder in
                    self.components.text_encoders.items()}
        tokens = self.family.tokenize(self.components, batch["captions"])
        return self.family.encode_prompt(encoders, {prefix: ids.to(self.device) for prefix, ids in tokens.items()})

    # ---- outputs ---------------------------------------------------------------------------------
    def _unwrapped(self) -> dict[str, torch.nn.Module]:
        return {prefix: self.accelerator.unwrap_model(model) for prefix, model in self.models.items()}

    def _lora_tensors(self) -> dict[str, torch.Tensor]:
        return kohya_state_dict(self._unwrapped(), self.family, alpha=self.cfg.lora.alpha)

    def _base_hashes(self) -> dict[str, str]:
        # hashing a multi-GB base model file takes seconds: once per run
        if self._base_model_hashes is None:
            self._base_model_hashes = base_model_hashes(self.cfg.model.path)
        return self._base_model_hashes

    def _write_lora(self, path: Path, steps: int, overwrite: bool) -> None:
        tensors = self._lora_tensors()
        require_finite_tensors(tensors, f"the LoRA {path.name}")
        latent_sizes = Counter(tuple(e.latents.shape[-2:]) for e in self.encoded)  # (h, w) per image
        metadata = lora_metadata(
            self.cfg,
            family=self.family,
            num_train_images=len(self.items) * self.cfg.data.repeats,
            steps=steps,
            tag_frequency=count_tags((item.caption for item in self.items), dataset_name(self.cfg.data)),
            started_at=self.started_at,
            finished_at=time.time(),
            max_train_steps=self.total_steps,
            batches_per_epoch=self.plan.batches_per_epoch,
            bucket_counts={(w * 8, h * 8): n for (h, w), n in latent_sizes.items()},
            base_hashes=self._base_hashes(),
            prediction_type=self.components.objective.prediction_type,
            tensors=tensors,
        )
        save_lora_file(path, tensors, metadata, overwrite=overwrite)

    def save_checkpoint(self, step: int) -> None:
        if step == self.last_checkpoint_step:
            return  # already on disk (a stop right after a save, or a run resumed at its end)
        acc = self.accelerator
        acc.wait_for_everyone()
        # every process switches to the averaged weights and back, so they stay equal
        with averaged_weights(self.optimizer):
            if acc.is_main_process:
                self._save_checkpoint_files(step)
        self.last_checkpoint_step = step
        acc.wait_for_everyone()

    def _save_checkpoint_files(self, step: int) -> None:
        scaler = self.accelerator.scaler
        adapter = {f"{prefix}.{k}": v for prefix, model in self._unwrapped().items()
                   for k, v in get_peft_model_state_dict(model).items()}
        require_finite_tensors(adapter, f"the checkpoint of step {step}")
        self.events.emit("saving", step=step)
        folder = save_checkpoint(
            self.cfg.run_dir,
            step,
            adapter=adapter,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            write_lora=lambda p: self._write_lora(p, step, overwrite=True),
        )
        self.events.emit("checkpoint", step=step, path=str(folder), lora=str(folder / "lora.safetensors"))

    def sample(self, step: int) -> None:
        """Validation pictures; a failure (out of memory, a dtype the pipeline cannot take) is a warning and
        training goes on. A stop asked while sampling ends the sampling only: the step loop's shared stop check
        then stops every process at the same point."""
        acc = self.accelerator
        acc.wait_for_everyone()
        self.sampled_steps.add(step)
        with averaged_weights(self.optimizer):
            if acc.is_main_process:
                self._render_samples(step)
        acc.wait_for_everyone()

    def _render_samples(self, step: int) -> None:
        self.events.emit("sampling", step=step, prompts=len(self.cfg.sample.prompts))
        denoiser = self._unwrapped()[DENOISER]
        precision = weight_dtype(self.accelerator)
        try:
            for path in render_samples(self.cfg, self.family, self.components, denoiser, self.device, step,
                                       precision, self.stop_requested):
                self.events.emit("sample", step=step, path=str(path))
        except Exception as exc:  # noqa: BLE001 - any sampling failure must not cost the training
            self.warn(f"the validation sample at step {step} failed and was skipped: {failure_text(exc)}")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def save_final(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = Path(self.cfg.output.lora_path)
        with averaged_weights(self.optimizer):
            if acc.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_lora(path, self.total_steps, overwrite=self.cfg.output.overwrite)
        acc.wait_for_everyone()
        return path
