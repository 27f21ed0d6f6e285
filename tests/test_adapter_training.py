"""Each adapter type through the trainer: it learns, says what it is, and is refused where it cannot apply,
with a message naming why. (Each resumes to the same file: test_optimizers, one adapter per optimizer.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_cases import ADAPTERS, CONV_ADAPTERS
from conftest import run_trainer, tiny_config
from safetensors import safe_open
from test_config import config_problems
from test_trainer import assert_ok, denoising_loss

from trainer.config import LoraConfig, ModelConfig
from trainer.families import family_for

TRAINED = {"locon": CONV_ADAPTERS["locon"], "loha": ADAPTERS["loha"], "lokr": ADAPTERS["lokr"],
           "dora": ADAPTERS["dora"]}
# the learning rate and steps each learns the tiny model in: LoHa and LoKr start from a smaller update (a product
# of two small factors) and take a larger rate or longer
LEARNING_RATES = {"locon": 1e-2, "loha": 1e-2, "lokr": 3e-2, "dora": 1e-2}
STEPS = {"loha": 150}  # the others: 60
# kohya / LyCORIS's metadata for each, as their loaders and the civitai-style readers look for it
NETWORK = {"locon": ("networks.lora", '"conv_dim"'), "loha": ("lycoris.kohya", '"algo": "loha"'),
           "lokr": ("lycoris.kohya", '"algo": "lokr"'), "dora": ("lycoris.kohya", '"dora_wd": "True"')}


def checkpointed_adapter(cfg: dict) -> Callable[[torch.nn.Module], None]:
    """Puts the run's adapter, as its last checkpoint holds it, on a UNet: peft's own layers, for the adapter
    types diffusers' loader does not take."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    from trainer.adapters import peft_config
    from trainer.families.sd15 import SD15
    from trainer.resume import load_checkpoint, newest_checkpoint

    lo = LoraConfig(**cfg["lora"])
    state = load_checkpoint(newest_checkpoint(cfg["run_dir"]))["adapter"]

    def adapt(unet: torch.nn.Module) -> None:
        inject_adapter_in_model(peft_config(lo, SD15.adapter_targets("lora_unet", lo)), unet)
        set_peft_model_state_dict(unet, {k.removeprefix("lora_unet."): v for k, v in state.items()})

    return adapt


@pytest.mark.parametrize("name", list(TRAINED))
def test_each_adapter_learns_and_says_what_it_is(tmp_path, tiny_model_dir, two_image_folder, name) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, two_image_folder, lora=TRAINED[name],
                      train={"max_steps": STEPS.get(name, 60), "learning_rate": LEARNING_RATES[name]})
    assert_ok(run_trainer(cfg))
    before = denoising_loss(tiny_model_dir, two_image_folder, None)
    after = denoising_loss(tiny_model_dir, two_image_folder, None, checkpointed_adapter(cfg))
    print(f"{name}: loss {before:.4f} -> {after:.4f} ({1 - after / before:.0%} lower)")
    assert after <= 0.7 * before
    if name == "locon":  # diffusers loads LoCon files (LoHa and LoKr it refuses, DoRA's magnitude it drops)
        from_file = denoising_loss(tiny_model_dir, two_image_folder, Path(cfg["output"]["lora_path"]))
        assert abs(from_file - after) < 1e-4
    with safe_open(cfg["output"]["lora_path"], "pt") as f:
        metadata = f.metadata()
    module, arg = NETWORK[name]
    assert metadata["ss_network_module"] == module and arg in metadata.get("ss_network_args", "")


def test_settings_an_adapter_cannot_take_are_refused() -> None:
    refused = {
        "lora.dora: DoRA is a LoRA variant, not 'loha'": {"adapter": "loha", "dora": True},
        "lora.lokr_factor, lokr_decompose_both: only for adapter 'lokr'": {"lokr_factor": 4},
        "lora.lokr_factor: -1 (nearest the square root) or 1 or more": {"adapter": "lokr", "lokr_factor": 0},
        "lora.dropout: LoRA's dropout; loha trains without it here": {"adapter": "loha", "dropout": 0.1},
    }
    for message, lora in refused.items():
        assert config_problems(lora=lora) == [message]
    assert config_problems(lora={"adapter": "lokr", "rank": 100000, "alpha": 100000.0}) == []  # LoKr: any rank
    assert config_problems(lora={"dora": True}, train={"base_quantization": "int8"}) == [
        "lora.dora: DoRA needs the base weights' norms, which a quantized base (train.base_quantization) changes"]


def test_locon_on_a_transformer_is_refused_before_loading(tiny_flux) -> None:
    family = family_for(ModelConfig(**tiny_flux["model"]))
    with pytest.raises(ValueError, match="no convolutions to adapt"):
        family.check_adapter(LoraConfig(adapter="locon"))
