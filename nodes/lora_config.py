"""LoRA config node: the adapter's shape, as a LORA_FOUNDRY_LORA_CONFIG value for the Train node."""

from __future__ import annotations

import typing

from comfy_api.latest import io

from ..trainer.config import LoraInit, TargetPreset
from .api_features import advanced

LoraConfigType = io.Custom("LORA_FOUNDRY_LORA_CONFIG")


class LoraFoundryLoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryLoraConfig",
            display_name="LoRA Foundry LoRA Config",
            category="LoRA Foundry",
            description="Rank, alpha, initialisation and which layers the LoRA adapts.",
            inputs=[
                io.Int.Input(
                    "rank",
                    default=4,
                    min=1,
                    max=1024,
                    tooltip="LoRA rank (dimension); 4-32 is typical",
                ),
                io.Float.Input(
                    "alpha",
                    default=4.0,
                    min=0.01,
                    max=1024.0,
                    step=0.5,
                    tooltip="Scale: the update is multiplied by alpha / rank; alpha = rank is common",
                ),
                io.Combo.Input(
                    "init",
                    options=list(typing.get_args(LoraInit)),
                    default="gaussian",
                    tooltip="Initialisation of the down weights (the up weights start at zero)",
                    **advanced(),
                ),
                io.Combo.Input(
                    "targets",
                    options=list(typing.get_args(TargetPreset)),
                    default="attention",
                    tooltip="attention: to_q/k/v/out; attention_ff: plus feed-forward; all: kohya's LoCon set, "
                    "every linear and conv layer of the transformer, resnet and down/upsample blocks (not conv_in, "
                    "conv_out or the time embedding, which kohya and older diffusers do not load). With the text "
                    "encoder, attention_ff and all also train its MLP",
                ),
                io.Float.Input(
                    "dropout",
                    default=0.0,
                    min=0.0,
                    max=0.9,
                    step=0.05,
                    tooltip="Dropout on the LoRA path during training",
                    **advanced(),
                ),
                io.Boolean.Input(
                    "train_text_encoder",
                    default=False,
                    tooltip="Also train a LoRA on the (first) text encoder (slower: captions are encoded every "
                    "step instead of once)",
                ),
                io.Boolean.Input(
                    "train_text_encoder_2",
                    default=False,
                    optional=True,  # workflows saved before it existed still run
                    tooltip="Also train the second text encoder, where the base model has one (an error where it "
                    "has not)",
                ),
            ],
            outputs=[LoraConfigType.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(
        cls,
        rank: int,
        alpha: float,
        init: str,
        targets: str,
        dropout: float,
        train_text_encoder: bool,
        train_text_encoder_2: bool = False,
    ) -> io.NodeOutput:
        return io.NodeOutput({"rank": rank, "alpha": float(alpha), "init": init, "targets": targets,
                              "dropout": float(dropout), "train_text_encoder": train_text_encoder,
                              "train_text_encoder_2": train_text_encoder_2})
