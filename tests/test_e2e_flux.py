"""The FLUX example workflow's training half on the real ComfyUI server, on the tiny FLUX.1 placed in the
folders ComfyUI's FLUX workflows read: the diffusion model in models/diffusion_models, CLIP-L and T5 in
models/text_encoders, the VAE in models/vae, each picked in the Train node's dropdowns.

The sampling half (UNETLoader, DualCLIPLoader, KSampler) needs FLUX.1's full-size text encoders, which
ComfyUI builds at fixed sizes: too large for this machine, so it is checked against /object_info only
(test_workflows.py) and run at full size by bench/gpu.py where a GPU is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.comfy_server import ComfyError, api_workflow

pytestmark = [pytest.mark.comfy_server]
TRAINING_NODES = ("2", "3", "4")  # Dataset, LoRA Config, Train


def place(server, tiny: dict) -> dict[str, str]:
    """The tiny files copied into the server's model folders; the names the dropdowns list."""
    folders = {"transformer": "diffusion_models", "clip_l": "text_encoders", "t5": "text_encoders", "vae": "vae"}
    names = {}
    for role, folder in folders.items():
        source = Path(tiny["files"][role])
        (server.models_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, server.models_dir / folder / source.name)
        names[role] = source.name
    return names


def flux_training_prompt(names: dict[str, str], output_name: str, with_encoders: bool = True) -> dict:
    overrides = [
        f"4.base_model=diffusion_models/{names['transformer']}", f"4.output_name={output_name}",
        "2.resolution=64", "4.max_steps=2", "4.batch_size=2", "4.device=cpu", "4.mixed_precision=no",
        "4.save_every_steps=0", "4.sample_every_steps=0", "4.sample_steps=2", "4.overwrite=true",
        "4.validation_prompts=lfstyle, a purple circle",
    ]
    # the T5 first: the trainer tells the encoders apart by their weights, not by the slot
    chosen = [names["t5"], names["clip_l"], names["vae"]] if with_encoders else ["none"] * 3
    overrides += [f"4.{slot}={name}" for slot, name in zip(("text_encoder_1", "text_encoder_2", "vae"), chosen,
                                                          strict=True)]
    prompt = api_workflow("flux_train_and_validate", overrides)
    return {node: prompt[node] for node in TRAINING_NODES}


def test_train_node_trains_flux_from_comfyui_model_folders(comfy_server, tiny_flux) -> None:
    names = place(comfy_server, tiny_flux)
    entry = comfy_server.run(flux_training_prompt(names, "e2e-flux"), timeout=900)
    (ui,) = [out for out in entry["outputs"].values() if "lora_path" in out]
    lora = Path(ui["lora_path"][0])
    assert lora == comfy_server.loras_dir / "e2e-flux.safetensors" and lora.is_file()
    from trainer.lora_file import read_lora_file

    tensors, metadata = read_lora_file(lora)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    config = metadata["lora_foundry.config"]
    assert names["t5"] in config and names["vae"] in config and str(comfy_server.base_dir) not in config
    samples = sorted((Path(ui["run_dir"][0]) / "samples").glob("*.png"))
    assert samples, "the validation sample through FluxPipeline was not drawn"


def test_a_flux_diffusion_model_without_its_encoders_is_refused_before_training(comfy_server, tiny_flux) -> None:
    names = place(comfy_server, tiny_flux)
    with pytest.raises(ComfyError) as caught:
        comfy_server.run(flux_training_prompt(names, "e2e-flux-alone", with_encoders=False), timeout=300)
    message = str(caught.value)
    assert "without the CLIP-L text encoder and the T5 text encoder and the VAE" in message
    assert "models/text_encoders" in message
    assert not (comfy_server.loras_dir / "e2e-flux-alone.safetensors").exists()
