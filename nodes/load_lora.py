"""Load LoRA node: apply a LoRA at a strength, and refuse files that would silently do nothing."""

from __future__ import annotations

import comfy.lora
import comfy.lora_convert
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from . import paths

NO_LORA = "none"


def check_lora_applies(model, clip, lora: dict) -> int:
    """The number of weights the LoRA patches; raises when it patches none or leaves keys unused."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)
    used: set[str] = set()
    for patch in loaded.values():
        used |= set(getattr(patch, "loaded_keys", ()))
    if not loaded:
        raise ValueError("this LoRA patches none of the model's layers: it was made for another model family, "
                         "or its keys are in a format ComfyUI does not read")
    unused = sorted(set(lora) - used)
    if unused:
        raise ValueError(f"{len(unused)} of {len(lora)} tensors in this LoRA match no layer of the model "
                         f"(e.g. {', '.join(unused[:3])}): it would only partly apply")
    return len(loaded)


class LoraFoundryLoadLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoadLora",
            display_name="LoRA Foundry Load LoRA",
            category="LoRA Foundry",
            description="Apply a LoRA to a model and its CLIP at a strength; errors if it would not apply.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model to patch",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="The text encoder to patch (text-encoder LoRAs); leave it out to patch the model only",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=[NO_LORA] + folder_paths.get_filename_list("loras"),
                    tooltip="A LoRA from models/loras (ignored when trained_lora is connected)",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="How strongly the LoRA changes the diffusion model (0: not at all)",
                ),
                io.Float.Input(
                    "strength_clip",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="How strongly the LoRA changes the text encoder",
                ),
                io.String.Input(
                    "trained_lora",
                    optional=True,
                    force_input=True,
                    tooltip="Connect the Train node's lora_name here to use the LoRA it just made",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Clip.Output(display_name="clip"),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float, strength_clip: float, clip=None,
                trained_lora: str | None = None) -> io.NodeOutput:
        name = trained_lora or lora_name
        if name == NO_LORA:
            raise ValueError("choose a LoRA in lora_name, or connect the Train node's lora_name to trained_lora")
        path = paths.resolve_lora(name)
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        check_lora_applies(model, clip, lora)
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        return io.NodeOutput(patched_model, patched_clip)
