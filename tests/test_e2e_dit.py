"""The FLUX and Z-Image example workflows' training half on the real ComfyUI server, on the tiny models placed
in the folders ComfyUI's own workflows read: the diffusion model in models/diffusion_models, the text encoders
in models/text_encoders, the VAE in models/vae, each picked in the Train node's dropdowns.

The sampling half (UNETLoader, DualCLIPLoader / CLIPLoader, KSampler) needs the full-size text encoders, which
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


FOLDERS = {"transformer": "diffusion_models", "clip_l": "text_encoders", "t5": "text_encoders",
           "qwen3": "text_encoders", "vae": "vae"}
# family -> (workflow, LoRA key prefix, modelspec architecture, the text encoders in the Train node's slots:
# FLUX's T5 first, for the trainer tells them apart by their weights, not by the slot)
FAMILIES = {
    "flux": ("flux_train_and_validate", "transformer.", "flux-1-dev/lora", ("t5", "clip_l")),
    "zimage": ("zimage_train_and_validate", "diffusion_model.", "z-image/lora", ("qwen3",)),
}


@pytest.fixture(params=sorted(FAMILIES))
def dit(request) -> tuple[str, dict]:
    return request.param, request.getfixturevalue("tiny_flux" if request.param == "flux" else "tiny_zimage")


def place(server, tiny: dict) -> dict[str, str]:
    """The tiny files copied into the server's model folders; the names the dropdowns list."""
    names = {}
    for role in tiny["files"]:
        folder = FOLDERS[role]
        source = Path(tiny["files"][role])
        (server.models_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, server.models_dir / folder / source.name)
        names[role] = source.name
    return names


def training_prompt(family: str, names: dict[str, str], output_name: str, with_encoders: bool = True) -> dict:
    workflow, _, _, encoders = FAMILIES[family]
    overrides = [
        f"4.base_model=diffusion_models/{names['transformer']}", f"4.output_name={output_name}",
        "2.resolution=64", "4.max_steps=2", "4.batch_size=2", "4.device=cpu", "4.mixed_precision=no",
        "4.save_every_steps=0", "4.sample_every_steps=0", "4.sample_steps=2", "4.overwrite=true",
        "4.validation_prompts=lfstyle, a purple circle",
    ]
    chosen = [names[role] for role in encoders] if with_encoders else []
    chosen = [*chosen, *["none"] * (2 - len(chosen)), names["vae"] if with_encoders else "none"]
    overrides += [f"4.{slot}={name}" for slot, name in zip(("text_encoder_1", "text_encoder_2", "vae"), chosen,
                                                          strict=True)]
    prompt = api_workflow(workflow, overrides)
    return {node: prompt[node] for node in TRAINING_NODES}


def test_train_node_trains_from_comfyui_model_folders(comfy_server, dit) -> None:
    family, tiny = dit
    _, prefix, architecture, encoders = FAMILIES[family]
    names = place(comfy_server, tiny)
    entry = comfy_server.run(training_prompt(family, names, f"e2e-{family}"), timeout=900)
    (ui,) = [out for out in entry["outputs"].values() if "lora_path" in out]
    lora = Path(ui["lora_path"][0])
    assert lora == comfy_server.loras_dir / f"e2e-{family}.safetensors" and lora.is_file()
    from trainer.lora_file import read_lora_file

    tensors, metadata = read_lora_file(lora)
    assert tensors and all(key.startswith(prefix) for key in tensors)
    assert metadata["modelspec.architecture"] == architecture
    config = metadata["lora_foundry.config"]
    assert names[encoders[0]] in config and names["vae"] in config and str(comfy_server.base_dir) not in config
    samples = sorted((Path(ui["run_dir"][0]) / "samples").glob("*.png"))
    assert samples, "the validation sample through FluxPipeline was not drawn"


def test_a_diffusion_model_without_its_encoders_is_refused_before_training(comfy_server, dit) -> None:
    family, tiny = dit
    names = place(comfy_server, tiny)
    with pytest.raises(ComfyError) as caught:
        comfy_server.run(training_prompt(family, names, f"e2e-{family}-alone", with_encoders=False), timeout=300)
    message = str(caught.value)
    missing = {"flux": "without the CLIP-L text encoder and the T5 text encoder and the VAE",
               "zimage": "without the Qwen3 text encoder and the VAE"}[family]
    assert missing in message and "models/text_encoders" in message
    assert not (comfy_server.loras_dir / f"e2e-{family}-alone.safetensors").exists()
