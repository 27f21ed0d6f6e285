"""Compare grid node: pictures side by side with labels, e.g. the same seed at LoRA strength 0 and 1."""

from __future__ import annotations

from comfy_api.latest import io

from .images import labelled_grid, to_image_batch, to_pil


def grid_title(title: str, step: int | None) -> str:
    """The title above the grid: the title widget, then "step N" when a step is linked in."""
    parts = [title.strip()] if title.strip() else []
    if step is not None:
        parts.append(f"step\u00a0{step}")  # a no-break space: wrapping never splits "step" from its number
    return " · ".join(parts)


class LoraFoundryCompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraFoundryCompareGrid",
            display_name="LoRA Foundry Compare Grid",
            category="LoRA Foundry",
            description="One labelled grid from up to four image batches (every picture of each batch).",
            inputs=[
                io.Image.Input(
                    "image_a",
                    tooltip="First pictures (e.g. LoRA strength 0)",
                ),
                io.Image.Input(
                    "image_b",
                    optional=True,
                    tooltip="Second pictures (e.g. LoRA strength 1)",
                ),
                io.Image.Input(
                    "image_c",
                    optional=True,
                    tooltip="Third pictures",
                ),
                io.Image.Input(
                    "image_d",
                    optional=True,
                    tooltip="Fourth pictures",
                ),
                io.String.Input(
                    "labels",
                    default="strength 0.0\nstrength 1.0",
                    multiline=True,
                    tooltip="One label per input, one per line, in order a, b, c, d",
                ),
                io.String.Input(
                    "title",
                    default="",
                    tooltip="Optional title above the grid",
                ),
                io.Int.Input(
                    "cell",
                    default=384,
                    min=64,
                    max=2048,
                    step=16,
                    tooltip="Size of each cell, pixels",
                ),
                io.Int.Input(
                    "step",
                    optional=True,
                    force_input=True,
                    min=0,
                    tooltip="Training step of the LoRA (link the Train node's steps output): the title then ends "
                    "with 'step N'",
                ),
            ],
            outputs=[io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, image_a, labels: str, title: str, cell: int, image_b=None, image_c=None,
                image_d=None, step: int | None = None) -> io.NodeOutput:
        names = [line.strip() for line in labels.splitlines()]
        batches = [b for b in (image_a, image_b, image_c, image_d) if b is not None]
        pictures, captions = [], []
        for index, batch in enumerate(batches):
            label = names[index] if index < len(names) and names[index] else f"input {'abcd'[index]}"
            for k, image in enumerate(batch):
                pictures.append(to_pil(image))
                captions.append(label if batch.shape[0] == 1 else f"{label} #{k + 1}")
        columns = len(batches) if all(b.shape[0] == 1 for b in batches) else max(b.shape[0] for b in batches)
        grid = labelled_grid(pictures, captions, cell=cell, columns=columns, title=grid_title(title, step))
        return io.NodeOutput(to_image_batch([grid]))
