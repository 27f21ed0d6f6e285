"""Draws a thumbnail of a UI-format workflow from its layout: groups, nodes with their titles, and links.

    python scripts/render_workflow_thumbnail.py                       # every example_workflows/*.json
    python scripts/render_workflow_thumbnail.py path/to/workflow.json

Writes <workflow>.jpg beside each file: the name ComfyUI's template browser looks for (same stem, .jpg).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "example_workflows"
SIZE = (768, 480)
MARGIN = 24
TITLE_H = 30
SLOT_H = 20
BACKGROUND = (32, 32, 34)
NODE_BODY = (53, 53, 56)
NODE_TITLE = (34, 34, 36)
PACK_TITLE = (52, 84, 120)
TEXT = (225, 225, 225)
LINK_COLORS = {
    "MODEL": (179, 157, 219), "CLIP": (255, 213, 0), "VAE": (255, 110, 110), "CONDITIONING": (255, 169, 49),
    "LATENT": (255, 156, 249), "IMAGE": (100, 181, 246), "STRING": (119, 221, 119), "INT": (41, 182, 246),
}
OTHER_LINK = (160, 200, 160)


def pretty_type(node_type: str) -> str:
    """'LoraFoundryTrain' -> 'LoRA Foundry Train' when the node has no title of its own."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", node_type)
    return re.sub(r"\bLora\b", "LoRA", words)


def hex_color(value: str | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if not value or not value.startswith("#"):
        return default
    digits = value[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))


class View:
    """Graph coordinates -> thumbnail pixels: the whole layout, scaled to fit and centred."""

    def __init__(self, boxes: list[tuple[float, float, float, float]]):
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        self.scale = min((SIZE[0] - 2 * MARGIN) / (x1 - x0), (SIZE[1] - 2 * MARGIN) / (y1 - y0))
        self.dx = (SIZE[0] - (x1 - x0) * self.scale) / 2 - x0 * self.scale
        self.dy = (SIZE[1] - (y1 - y0) * self.scale) / 2 - y0 * self.scale

    def point(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale + self.dx, y * self.scale + self.dy

    def box(self, x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (*self.point(x, y), *self.point(x + w, y + h))


def node_box(node: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def group_box(group: dict) -> tuple[float, float, float, float]:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def slot_point(node: dict, slot: int, output: bool) -> tuple[float, float]:
    (x, y), (w, _) = node["pos"], node["size"]
    return (x + w if output else x), y + SLOT_H * (slot + 0.5)


def bezier(start: tuple[float, float], end: tuple[float, float], steps: int = 24) -> list[tuple[float, float]]:
    (x0, y0), (x3, y3) = start, end
    pull = max(abs(x3 - x0) * 0.5, 20)
    x1, x2 = x0 + pull, x3 - pull
    points = []
    for i in range(steps + 1):
        t = i / steps
        u = 1 - t
        points.append((u**3 * x0 + 3 * u * u * t * x1 + 3 * u * t * t * x2 + t**3 * x3,
                       u**3 * y0 + 3 * u * u * t * y0 + 3 * u * t * t * y3 + t**3 * y3))
    return points


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def render(workflow: dict) -> Image.Image:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    groups = workflow.get("groups", [])
    view = View([node_box(n) for n in nodes.values()] + [group_box(g) for g in groups])
    image = Image.new("RGB", SIZE, BACKGROUND)
    overlay = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    draw_groups(ImageDraw.Draw(overlay), groups, view)
    image.paste(overlay, mask=overlay)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(9, round(15 * view.scale * 1.6)))
    draw_group_titles(draw, groups, view, font)
    draw_links(draw, workflow.get("links", []), nodes, view)
    for node in sorted(nodes.values(), key=lambda n: n.get("order", 0)):
        draw_node(draw, node, view, font)
    return image


def draw_groups(draw: ImageDraw.ImageDraw, groups: list[dict], view: View) -> None:
    for group in groups:
        color = hex_color(group.get("color"), (63, 120, 158))
        x0, y0, x1, y1 = group_box(group)
        draw.rectangle((*view.point(x0, y0), *view.point(x1, y1)), fill=(*color, 70), outline=(*color, 200))


def draw_group_titles(draw: ImageDraw.ImageDraw, groups: list[dict], view: View, font) -> None:
    for group in groups:
        x0, y0, x1, _ = group_box(group)
        left, top = view.point(x0, y0)
        right, _ = view.point(x1, y0)
        draw.text((left + 4, top + 2), fit_text(draw, group.get("title", ""), font, right - left - 8), fill=TEXT,
                  font=font)


def draw_links(draw: ImageDraw.ImageDraw, links: list[list], nodes: dict, view: View) -> None:
    width = max(1, round(3 * view.scale))
    for _, origin, origin_slot, target, target_slot, link_type in (link[:6] for link in links):
        if origin not in nodes or target not in nodes:
            continue
        start = view.point(*slot_point(nodes[origin], origin_slot, True))
        end = view.point(*slot_point(nodes[target], target_slot, False))
        draw.line(bezier(start, end), fill=LINK_COLORS.get(link_type, OTHER_LINK), width=width, joint="curve")


def draw_node(draw: ImageDraw.ImageDraw, node: dict, view: View, font) -> None:
    x0, y0, x1, y1 = node_box(node)
    left, top = view.point(x0, y0)
    right, bottom = view.point(x1, y1)
    title_bottom = view.point(x0, y0 + TITLE_H)[1]
    radius = max(2, round(8 * view.scale))
    body = hex_color(node.get("bgcolor"), NODE_BODY)
    default_title = PACK_TITLE if node["type"].startswith("LoraFoundry") else NODE_TITLE
    draw.rounded_rectangle((left, top, right, bottom), radius=radius, fill=body, outline=(20, 20, 20))
    draw.rounded_rectangle((left, top, right, title_bottom), radius=radius, fill=hex_color(node.get("color"),
                                                                                          default_title))
    title = fit_text(draw, node.get("title") or pretty_type(node["type"]), font, right - left - 8)
    draw.text((left + 4, (top + title_bottom) / 2), title, fill=TEXT, font=font, anchor="lm")
    for slot, _ in enumerate(node.get("inputs", [])):
        dot(draw, view.point(*slot_point(node, slot, False)), view)
    for slot, _ in enumerate(node.get("outputs", [])):
        dot(draw, view.point(*slot_point(node, slot, True)), view)


def dot(draw: ImageDraw.ImageDraw, center: tuple[float, float], view: View) -> None:
    r = max(1.5, 5 * view.scale)
    x, y = center
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(170, 170, 170))


def thumbnail_path(workflow_path: Path) -> Path:
    return workflow_path.with_suffix(".jpg")


def render_file(workflow_path: Path) -> Path:
    image = render(json.loads(workflow_path.read_text(encoding="utf-8")))
    target = thumbnail_path(workflow_path)
    image.save(target, "JPEG", quality=85, optimize=True)
    return target


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or sorted(UI_DIR.glob("*.json"))
    for path in paths:
        print(f"wrote {render_file(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
