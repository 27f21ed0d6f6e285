"""LoRA Foundry: train Stable Diffusion LoRAs inside ComfyUI graphs."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


class LoraFoundryExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import NODES

        return NODES


async def comfy_entrypoint() -> LoraFoundryExtension:
    return LoraFoundryExtension()
