"""The pack as a real ComfyUI server sees it: node definitions, the example workflows, their API twins, the client.

Every test here that needs the server uses the one session server (the comfy_server fixture); none trains.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from scripts.comfy_server import ComfyServer, api_workflow, tiny_train_and_validate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import run_workflow  # noqa: E402
import workflow_to_api  # noqa: E402
from render_workflow_thumbnail import SIZE, render  # noqa: E402
from workflow_to_api import (  # noqa: E402
    CONTROL_VALUES,
    FRONTEND_ONLY,
    combo_values,
    convert,
    dumps,
    input_options,
    input_type,
    is_widget,
    ordered_inputs,
    widget_slots,
)

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "example_workflows"
API_DIR = ROOT / "workflows_api"
UI_WORKFLOWS = sorted(UI_DIR.glob("*.json"))
PACK_MODULE = "custom_nodes.lora-foundry"
CATEGORY = "LoRA Foundry"
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
# combos whose options are the files of one model folder: they differ per machine, so only the kind is checked
MODEL_COMBOS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraFoundryTrain", "base_model"): "checkpoints",
    ("LoraFoundryLoadLora", "lora_name"): "loras",
    ("LoraLoader", "lora_name"): "loras",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("LoraFoundryTrain", "text_encoder_1"): "text_encoders",
    ("LoraFoundryTrain", "text_encoder_2"): "text_encoders",
    ("LoraFoundryTrain", "vae"): "vae",
}
THUMBNAIL_LIMIT = 100 * 1024

needs_server = pytest.mark.comfy_server


def pack_node_ids() -> set[str]:
    """Every node_id declared in nodes/*.py: the nodes the server must list."""
    ids = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids |= set(re.findall(r'node_id="(LoraFoundry\w+)"', path.read_text(encoding="utf-8")))
    return ids


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- (a) the pack's nodes on the server --------------------------------------------------------------


@needs_server
def test_every_pack_node_is_served_with_category_and_tooltips(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    served = {name for name, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert pack_node_ids() <= served, f"missing from /object_info: {pack_node_ids() - served}"
    assert len(pack_node_ids()) >= 5
    problems = []
    for name in sorted(served):
        node = info[name]
        if node["category"] != CATEGORY:
            problems.append(f"{name}: category {node['category']!r}")
        if not node.get("description"):
            problems.append(f"{name}: no description")
        for input_name, spec, _ in ordered_inputs(node):
            if not input_options(spec).get("tooltip"):
                problems.append(f"{name}.{input_name}: no tooltip")
    assert not problems, "\n".join(problems)


# ---- (b) the UI-format example workflows ---------------------------------------------------------------


def check_value(node_type: str, name: str, spec: list, value: object) -> str | None:
    """Why a widget value does not fit its input, or None."""
    kind, options = input_type(spec), input_options(spec)
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{value!r} is not an integer"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{value!r} is not a number"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            return f"{value!r} outside [{options.get('min')}, {options.get('max')}]"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    if kind == "COMBO":
        folder = MODEL_COMBOS.get((node_type, name))
        if folder is not None and value not in combo_values(spec):
            return check_model_name(folder, value)
        if folder is None and value not in combo_values(spec):
            return f"{value!r} not among {combo_values(spec)}"
    return None


def check_model_name(folder: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"{value!r} is not a file name"
    if folder == "checkpoints" and value.startswith("diffusers/"):
        return None
    if not value.endswith(MODEL_EXTENSIONS):
        return f"{value!r} is not a {folder} file name"
    return None


def check_widgets(node: dict, info: dict) -> list[str]:
    where = f"node {node['id']} ({node['type']})"
    slots, values = widget_slots(info), node.get("widgets_values") or []
    if len(values) != len(slots):
        return [f"{where}: {len(values)} widget values for {[name for name, _ in slots]}"]
    problems = []
    for (name, spec), value in zip(slots, values, strict=True):
        if spec is None:
            if name.endswith(".control_after_generate") and value not in CONTROL_VALUES:
                problems.append(f"{where}: {name} = {value!r}")
            continue
        reason = check_value(node["type"], name, spec, value)
        if reason:
            problems.append(f"{where}: {name}: {reason}")
    return problems


def check_slots(node: dict, info: dict) -> list[str]:
    """Socket inputs and outputs as the node defines them; required sockets connected."""
    where = f"node {node['id']} ({node['type']})"
    problems = []
    specs = {name: (spec, optional) for name, spec, optional in ordered_inputs(info)}
    for slot in node.get("inputs", []):
        name = slot.get("widget", {}).get("name") or slot["name"]
        if name not in specs:
            problems.append(f"{where}: input {name!r} is not an input of {node['type']}")
        elif slot["type"] != input_type(specs[name][0]):
            problems.append(f"{where}: input {name!r} typed {slot['type']}, node says {input_type(specs[name][0])}")
    connected = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    for name, (spec, optional) in specs.items():
        if not optional and not is_widget(spec) and name not in connected:
            problems.append(f"{where}: required input {name!r} is not connected")
    declared = list(zip(info["output"], info["output_name"], strict=True))
    saved = [(slot["type"], slot["name"]) for slot in node.get("outputs", [])]
    if node["type"].startswith("LoraFoundry"):
        if saved != declared:
            problems.append(f"{where}: outputs {saved}, node declares {declared}")
    elif saved != declared[: len(saved)]:
        # a core node may have gained outputs after the ones a workflow saved on an older ComfyUI lists
        # (SaveImage and PreviewImage declare an IMAGE output since ComfyUI 0.26); the saved ones stay its first
        problems.append(f"{where}: outputs {saved}, node declares {declared} (the saved ones must come first)")
    return problems


def check_links(workflow: dict) -> list[str]:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    problems = []
    for link_id, origin, origin_slot, target, target_slot, link_type in (link[:6] for link in workflow["links"]):
        where = f"link {link_id}"
        if origin not in nodes or target not in nodes:
            problems.append(f"{where}: joins missing nodes {origin} -> {target}")
            continue
        outputs, inputs = nodes[origin].get("outputs", []), nodes[target].get("inputs", [])
        if origin_slot >= len(outputs) or target_slot >= len(inputs):
            problems.append(f"{where}: slot out of range")
            continue
        out, into = outputs[origin_slot], inputs[target_slot]
        if not (link_type == out["type"] == into["type"]):
            problems.append(f"{where}: {out['type']} -> {into['type']} saved as {link_type}")
        if link_id not in (out.get("links") or []) or into.get("link") != link_id:
            problems.append(f"{where}: not recorded on both of its nodes")
    ids = [link[0] for link in workflow["links"]]
    if len(set(ids)) != len(ids) or (ids and workflow["last_link_id"] < max(ids)):
        problems.append("link ids repeat or exceed last_link_id")
    if workflow["last_node_id"] < max(nodes):
        problems.append("a node id exceeds last_node_id")
    return problems


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    problems = check_links(workflow)
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"node {node['id']}: unknown type {node['type']!r}")
            continue
        problems += check_widgets(node, info) + check_slots(node, info)
    return problems


def test_thumbnails_render_from_the_layout() -> None:
    for path in UI_WORKFLOWS:
        assert render(load(path)).size == SIZE
        with Image.open(path.with_suffix(".jpg")) as image:
            assert image.size == SIZE and image.format == "JPEG"


def test_there_are_example_workflows_with_thumbnails() -> None:
    names = {path.stem for path in UI_WORKFLOWS}
    assert {"train_and_validate", "train_only", "compare_lora"} <= names
    for path in UI_WORKFLOWS:
        workflow = load(path)
        assert workflow.get("version") == 0.4 and "ds" in workflow.get("extra", {}), path.name
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name}"
        assert thumbnail.stat().st_size < THUMBNAIL_LIMIT, f"{thumbnail.name} is over 100 KB"


@needs_server
def test_server_lists_the_examples_as_templates(comfy_server: ComfyServer) -> None:
    listed = comfy_server.get_json("/workflow_templates").get("lora-foundry", [])
    assert sorted(listed) == sorted(path.stem for path in UI_WORKFLOWS), "workflows_api/ must not be listed"
    for path in UI_WORKFLOWS:
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/lora-foundry/{path.stem}.jpg") as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"


@needs_server
@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_fits_the_served_nodes(path: Path, comfy_server: ComfyServer) -> None:
    problems = check_workflow(load(path), comfy_server.object_info())
    assert not problems, "\n".join(problems)


def test_train_and_validate_compares_strength_0_and_1_at_one_seed() -> None:
    prompt = load(API_DIR / "train_and_validate.json")
    by_type: dict[str, list[dict]] = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    loaders = by_type["LoraFoundryLoadLora"]
    assert sorted(n["strength_model"] for n in loaders) == [0.0, 1.0]
    train_id = next(k for k, n in prompt.items() if n["class_type"] == "LoraFoundryTrain")
    assert all(n["trained_lora"] == [train_id, 0] for n in loaders)
    assert len({n["seed"] for n in by_type["KSampler"]}) == 1
    assert by_type["LoraFoundryCompareGrid"][0]["labels"].splitlines() == ["strength 0.0", "strength 1.0"]
    assert "SaveImage" in by_type and "PreviewImage" in by_type


def test_tiny_overrides_fit_the_train_and_validate_twin() -> None:
    prompt = api_workflow("train_and_validate", tiny_train_and_validate("sd15.safetensors", "smoke", steps=3))
    assert prompt["2"]["inputs"]["resolution"] == 64 and prompt["4"]["inputs"]["max_steps"] == 3
    assert prompt["4"]["inputs"]["output_name"] == "smoke" and prompt["1"]["inputs"]["ckpt_name"] == "sd15.safetensors"


# ---- (c) the API twins -----------------------------------------------------------------------------------


@needs_server
def test_api_twins_equal_a_fresh_conversion(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    twins = {path.name for path in API_DIR.glob("*.json")}
    assert twins == {path.name for path in UI_WORKFLOWS}, "workflows_api/ must hold exactly one twin per example"
    for path in UI_WORKFLOWS:
        expected = dumps(convert(load(path), info))
        assert (API_DIR / path.name).read_text(encoding="utf-8") == expected, (
            f"workflows_api/{path.name} is stale: run scripts/workflow_to_api.py --server URL")


@needs_server
def test_conversion_script_checks_the_twins(comfy_server: ComfyServer, tmp_path: Path) -> None:
    saved = tmp_path / "object_info.json"
    saved.write_text(json.dumps(comfy_server.object_info()), encoding="utf-8")
    assert workflow_to_api.main(["--object-info", str(saved), "--check"]) == 0
    assert workflow_to_api.main(["--object-info", str(saved), "--out", str(tmp_path / "api")]) == 0
    assert workflow_to_api.main(["--object-info", str(saved), "--out", str(tmp_path / "api"), "--check"]) == 0


def test_conversion_skips_control_values_and_notes() -> None:
    info = {"KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}],
                                                "steps": ["INT", {}]}},
                         "input_order": {"required": ["model", "seed", "steps"]}, "display_name": "KSampler"},
            "Loader": {"input": {"required": {"name": [["a", "b"], {}]}}, "input_order": {"required": ["name"]},
                       "display_name": "Loader"}}
    workflow = {
        "nodes": [
            {"id": 1, "type": "Loader", "inputs": [], "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}],
             "widgets_values": ["b"]},
            {"id": 2, "type": "KSampler", "title": "mine", "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
             "outputs": [], "widgets_values": [7, "randomize", 3]},
            {"id": 3, "type": "MarkdownNote", "widgets_values": ["hello"]},
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"]],
    }
    assert convert(workflow, info) == {
        "1": {"inputs": {"name": "b"}, "class_type": "Loader", "_meta": {"title": "Loader"}},
        "2": {"inputs": {"seed": 7, "steps": 3, "model": ["1", 0]}, "class_type": "KSampler",
              "_meta": {"title": "mine"}},
    }


# ---- (d) the client script --------------------------------------------------------------------------------


def grid_prompt(cell: int = 64) -> dict:
    """Two generated images side by side: exercises the pack's compare node without loading a model."""
    def empty(color: int) -> dict:
        return {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}}

    return {
        "1": empty(0xFF0000),
        "2": empty(0x0000FF),
        "3": {"class_type": "LoraFoundryCompareGrid",
              "inputs": {"image_a": ["1", 0], "image_b": ["2", 0], "labels": "red\nblue", "title": "", "cell": cell}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "lf-client-test/grid"}},
    }


def run_client(server: ComfyServer, prompt: dict, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    args = [sys.executable, str(ROOT / "scripts" / "run_workflow.py"), str(path), "--server", server.url,
            "--timeout", "120"]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


@needs_server
def test_client_runs_a_prompt_and_prints_saved_files(comfy_server: ComfyServer, tmp_path: Path) -> None:
    result = run_client(comfy_server, grid_prompt(), tmp_path, "3.title=\"client test\"", "3.cell=96")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "▶ node 3 (" in result.stdout
    saved = [line.split("images: ", 1)[1] for line in result.stdout.splitlines() if "images: " in line]
    assert len(saved) == 1, result.stdout
    path = Path(saved[0])
    assert path.is_file() and path.parent == comfy_server.output_dir / "lf-client-test"
    with Image.open(path) as image:
        assert image.width >= 2 * 96


@needs_server
def test_client_reports_a_refused_prompt(comfy_server: ComfyServer, tmp_path: Path) -> None:
    result = run_client(comfy_server, grid_prompt(), tmp_path, "3.cell=8")
    assert result.returncode == run_workflow.EXIT_REFUSED, result.stdout + result.stderr
    assert "node 3 (LoraFoundryCompareGrid)" in result.stdout and "smaller than min" in result.stdout


@needs_server
def test_client_reports_a_failing_node(comfy_server: ComfyServer, tmp_path: Path) -> None:
    prompt = {
        "1": {"class_type": "LoraFoundryDataset", "inputs": {
            "source": "images", "folder": "lora-foundry-sample", "hub_dataset": "", "captions": "", "resolution": 64,
            "crop": "center", "random_flip": False, "bucketing": False, "top_rows": 0, "repeats": 1}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
    }
    result = run_client(comfy_server, prompt, tmp_path)
    assert result.returncode == run_workflow.EXIT_FAILED, result.stdout + result.stderr
    assert "node 1 (LoraFoundryDataset) failed" in result.stdout and "images input" in result.stdout


def test_client_arguments_are_checked_before_queueing(tmp_path: Path) -> None:
    prompt = grid_prompt()
    assert run_workflow.apply_overrides(prompt, ["3.cell=128", "3.title=a=b", '4.filename_prefix="x"'])["3"][
        "inputs"]["title"] == "a=b"
    for bad in ("3cell=1", "9.cell=1", "3.size=1", "3.image_a=1"):
        with pytest.raises(run_workflow.UsageError):
            run_workflow.apply_overrides(prompt, [bad])
    assert prompt["3"]["inputs"]["cell"] == 64  # the original is left alone


def test_client_follows_only_its_prompt_and_stops_on_interrupt() -> None:
    out = io.StringIO()
    follower = run_workflow.Follower(grid_prompt(), out=out)
    follower.prompt_id = "mine"
    follower.handle({"type": "executing", "data": {"node": "3", "prompt_id": "other"}})
    follower.handle({"type": "progress", "data": {"value": 5, "max": 10, "node": "3", "prompt_id": "mine"}})
    follower.handle({"type": "progress_text", "data": {"node": "3", "text": "step 5/10"}})
    assert follower.outcome is None
    follower.handle({"type": "execution_interrupted", "data": {"node_id": "3", "prompt_id": "mine"}})
    text = out.getvalue()
    assert "other" not in text and "5/10" in text and "step 5/10" in text
    assert follower.outcome == "interrupted"
    assert "interrupted at node 3" in run_workflow.describe_error(follower.error, follower)


@needs_server
def test_server_layout_is_what_training_tests_need(comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    assert comfy_server.checkpoint_name in combo_values(info["LoraFoundryTrain"]["input"]["required"]["base_model"])
    assert "lora-foundry-sample" in combo_values(info["LoraFoundryDataset"]["input"]["required"]["folder"])
    assert len(list(comfy_server.dataset_dir.glob("*.png"))) == 8
    assert comfy_server.loras_dir.is_dir() and comfy_server.output_dir.is_dir()
    assert comfy_server.wait_no_children(30) == []
