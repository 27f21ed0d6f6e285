"""LoRA config node: the adapter's shape, as a LORA_FOUNDRY_LORA_CONFIG value for the Train node."""

from __future__ import annotations

import typing

from comfy_api.latest import io

from ..trainer.config import Adapter, LoraInit, TargetPreset
from .api_features import advanced

LoraConfigType = io.Custom("LORA_FOUNDRY_LORA_CONFIG")
RANK_LIMIT = 65536  # the widget's bound only: the trainer checks the rank against the layers it adapts


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
                    max=RANK_LIMIT,
                    tooltip="Adapter rank (dimension); 4-32 is typical. LoRA and LoHa: at most the smallest adapted "
                    "layer's width (checked when training starts); LoKr: any (large ranks keep its factors whole)",
                ),
                io.Float.Input(
                    "alpha",
                    default=4.0,
                    min=0.01,
                    max=float(RANK_LIMIT),
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
                io.Combo.Input(
                    "adapter",
                    options=list(typing.get_args(Adapter)),
                    default="lora",
                    optional=True,  # as every input after it: workflows saved before they existed still run
                    tooltip="lora: low-rank update; locon: LoRA on the UNet's convolutions too (SD 1.5, SDXL); "
                    "loha: Hadamard product of two low-rank updates; lokr: Kronecker product (LyCORIS). ComfyUI and "
                    "Forge load all four; diffusers loads LoRA and LoCon only",
                ),
                io.Boolean.Input(
                    "dora",
                    default=False,
                    optional=True,
                    tooltip="DoRA: train each weight's magnitude apart from its direction (LoRA and LoCon)",
                ),
                io.Int.Input(
                    "lokr_factor",
                    default=-1,
                    min=-1,
                    max=RANK_LIMIT,
                    optional=True,
                    tooltip="LoKr: the size of the small Kronecker factor (-1: the one nearest the square root)",
                    **advanced(),
                ),
                io.Boolean.Input(
                    "lokr_decompose_both",
                    default=False,
                    optional=True,
                    tooltip="LoKr: make the small factor low-rank as well",
                    **advanced(),
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
        adapter: str = "lora",
        dora: bool = False,
        lokr_factor: int = -1,
        lokr_decompose_both: bool = False,
    ) -> io.NodeOutput:
        # checked with the rest of the run's config by the Train node; at their defaults the adapter settings
        # leave a run's identity as it was before they existed (trainer/identity.py)
        return io.NodeOutput({"rank": rank, "alpha": float(alpha), "init": init, "targets": targets,
                              "dropout": float(dropout), "train_text_encoder": train_text_encoder,
                              "train_text_encoder_2": train_text_encoder_2, "adapter": adapter, "dora": dora,
                              "lokr_factor": lokr_factor, "lokr_decompose_both": lokr_decompose_both})
