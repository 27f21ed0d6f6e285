"""Converts UI-format ComfyUI workflows (what the frontend saves) into API-format prompts (what /prompt takes).

    python scripts/workflow_to_api.py --server http://127.0.0.1:8188             # example_workflows/ -> workflows_api/
    python scripts/workflow_to_api.py --object-info info.json a.json --out DIR   # offline, from a saved /object_info
    python scripts/workflow_to_api.py --server URL --check                      # exit 1 if a twin is out of date

Widget values are matched to input names the way the frontend does it: the node's inputs in `input_order`
(required, then optional), skipping sockets, with one extra value after each widget that has a "control after
generate" combo (INT seeds, and widgets marked control_after_generate) or an upload button. Notes and other
frontend-only nodes are dropped, reroutes and bypassed nodes are followed through, muted nodes are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "example_workflows"
API_DIR = ROOT / "workflows_api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute", "Label (rgthree)"}
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
MODE_NEVER, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    pass


# ---- input specs -----------------------------------------------------------------------------------


def input_type(spec: list) -> str:
    """"COMBO" for a list of options (old style) or "COMBO" type, else the type name."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else input_options(spec).get("options", [])


def ordered_inputs(info: dict) -> Iterator[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order: input_order's required, then its optional names."""
    sections = info.get("input", {})
    order = info.get("input_order") or {key: list(value) for key, value in sections.items()}
    for section in ("required", "optional"):
        specs = sections.get(section, {})
        for name in order.get(section, []):
            if name in specs:
                yield name, specs[name], section == "optional"


def is_widget(spec: list) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def has_control_widget(name: str, spec: list) -> bool:
    """Whether the frontend puts a "control after generate" value after this widget's value."""
    flag = input_options(spec).get("control_after_generate")
    if input_type(spec) == "INT":
        return bool(flag) if flag is not None else name in SEED_NAMES
    return input_type(spec) == "COMBO" and bool(flag)


def has_upload_widget(spec: list) -> bool:
    return any(input_options(spec).get(key) for key in UPLOAD_OPTIONS)


def widget_slots(info: dict) -> list[tuple[str, list | None]]:
    """One (input name, spec) per widgets_values entry; the extra control/upload values get spec None."""
    slots: list[tuple[str, list | None]] = []
    for name, spec, _ in ordered_inputs(info):
        if not is_widget(spec):
            continue
        slots.append((name, spec))
        if has_control_widget(name, spec):
            slots.append((f"{name}.control_after_generate", None))
        if has_upload_widget(spec):
            slots.append((f"{name}.upload", None))
    return slots


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """The node's widget values by input name (extra control/upload values left out)."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {name: values[name] for name, spec in widget_slots(info) if spec is not None and name in values}
    slots = widget_slots(info)
    if len(values) != len(slots):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values for {len(slots)} "
                            f"widgets ({', '.join(name for name, _ in slots)})")
    return {name: value for (name, spec), value in zip(slots, values, strict=True) if spec is not None}


# ---- links -----------------------------------------------------------------------------------------


class Graph:
    def __init__(self, workflow: dict):
        if "nodes" not in workflow:
            raise WorkflowError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported")
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = {link[0]: link for link in workflow.get("links", [])}

    def source(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[int, int] | None:
        """(node id, output slot) that really feeds a link, following reroutes and bypassed nodes."""
        if link_id is None or link_id not in self.links or link_id in seen:
            return None
        _, origin_id, origin_slot, _, _, link_type = self.links[link_id][:6]
        origin = self.nodes.get(origin_id)
        if origin is None or origin.get("mode") == MODE_NEVER:
            return None
        if origin["type"] == "Reroute":
            return self.source(origin["inputs"][0].get("link"), seen | {link_id})
        if origin["type"] in FRONTEND_ONLY:
            return None  # a PrimitiveNode: its value is already in the target's widget
        if origin.get("mode") == MODE_BYPASS:
            for slot in origin.get("inputs", []):
                if slot.get("type") == link_type and slot.get("link") is not None:
                    return self.source(slot["link"], seen | {link_id})
            return None
        return origin_id, origin_slot


def convert_node(graph: Graph, node: dict, info: dict) -> dict:
    inputs: dict[str, Any] = dict(widget_values(node, info))
    known = {name for name, _, _ in ordered_inputs(info)}
    for slot in node.get("inputs", []):
        name = slot.get("widget", {}).get("name") or slot["name"]
        source = graph.source(slot.get("link"))
        if source is not None and name in known:
            inputs[name] = [str(source[0]), source[1]]
    return {"inputs": inputs, "class_type": node["type"], "_meta": {"title": node.get("title") or
                                                                    info.get("display_name") or node["type"]}}


def convert(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt of a UI-format workflow, keyed by node id (as strings, in numeric order)."""
    graph = Graph(workflow)
    prompt: dict[str, dict] = {}
    for node_id in sorted(graph.nodes):
        node = graph.nodes[node_id]
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node_id}: type {node['type']!r} is not known to this ComfyUI")
        prompt[str(node_id)] = convert_node(graph, node, info)
    return prompt


def dumps(prompt: dict) -> str:
    return json.dumps(prompt, indent=2, ensure_ascii=False) + "\n"


# ---- command line ----------------------------------------------------------------------------------


def fetch_object_info(server: str) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as response:
        return json.loads(response.read())


def load_object_info(server: str | None, path: Path | None) -> dict:
    if path is not None:
        return json.loads(path.read_text(encoding="utf-8"))
    if server is None:
        raise SystemExit("give --server URL (a running ComfyUI with this pack) or --object-info FILE")
    return fetch_object_info(server)


def twin_path(ui_path: Path, out_dir: Path) -> Path:
    return out_dir / ui_path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="*", type=Path, help=f"UI-format files (default: {UI_DIR}/*.json)")
    parser.add_argument("--server", help="ComfyUI URL to read /object_info from")
    parser.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of --server")
    parser.add_argument("--out", type=Path, default=API_DIR, help=f"folder for the API twins (default {API_DIR})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a twin differs")
    args = parser.parse_args(argv)

    object_info = load_object_info(args.server, args.object_info)
    stale = 0
    for ui_path in args.workflows or sorted(UI_DIR.glob("*.json")):
        text = dumps(convert(json.loads(ui_path.read_text(encoding="utf-8")), object_info))
        target = twin_path(ui_path, args.out)
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current == text:
            continue
        if args.check:
            print(f"out of date: {target} (from {ui_path})", file=sys.stderr)
            stale += 1
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
