"""The pack in the real ComfyUI frontend, driven in headless Chromium against the session's ComfyUI server.

A user drops each example workflow on the canvas (no missing-nodes dialog, every node has its widgets and
values), queues a shrunk train_and_validate with the Run button and watches the Train node's progress bar and
step/loss text advance to the end, queues a long train_only and presses the ✕ (Cancel current run) to stop
it, finds the examples under the pack's name in the templates browser, and adds every pack node from the
node search box. Screenshots of the loaded graph and of the finished run go to $LORA_FOUNDRY_SCREENSHOTS
(default .runtime/screenshots/; the README's pictures in docs/screenshots/ come from this test).

Skipped, with the reason, only where Chromium is not installed (scripts/setup.sh installs Debian's package).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import comfyui_version
from frontend import (
    ComfyPage,
    chromium_unavailable,
    expected_widgets,
    launch_chromium,
    set_widget_values,
    wait_until,
)
from PIL import Image

from scripts.comfy_server import ComfyServer, tiny_train_and_validate

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "example_workflows"
UI_WORKFLOWS = sorted(UI_DIR.glob("*.json"))
PACK_NAME = "lora-foundry"
PACK_MODULE = "custom_nodes.lora-foundry"
SCREENSHOT_LIMIT = 300 * 1024
STEP_TEXT = re.compile(r"step (\d+)/(\d+) · loss \d+\.\d+")

UNAVAILABLE = chromium_unavailable()
pytestmark = [pytest.mark.browser, pytest.mark.comfy_server,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"browser tests: {UNAVAILABLE}")]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    with launch_chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def ui(browser: object, comfy_server: ComfyServer) -> Iterator[ComfyPage]:
    page = ComfyPage.open(browser, comfy_server.url)
    page.prepare()
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshot_dir() -> Path:
    return Path(os.environ.get("LORA_FOUNDRY_SCREENSHOTS") or ROOT / ".runtime" / "screenshots").resolve()


def check_screenshot(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1280, 800), (path, image.size)
    assert path.stat().st_size < SCREENSHOT_LIMIT, f"{path} is {path.stat().st_size} bytes"


def widget_problems(shown: list[dict], workflow: dict, object_info: dict) -> list[str]:
    """Nodes of the workflow whose widgets (names, then values) differ in the page."""
    saved = {str(node["id"]): node for node in workflow["nodes"]}  # newer frontends give string ids
    problems = []
    for node in shown:
        info = object_info.get(node["type"])
        if info is None:
            continue  # a frontend-only node (the notes)
        names = [name for name in node["widgets"] if not name.startswith("$$")]
        if names != expected_widgets(info):
            problems.append(f"node {node['id']} ({node['type']}): widgets {names}, expected {expected_widgets(info)}")
        elif node["values"] != saved[str(node["id"])].get("widgets_values", []):
            problems.append(f"node {node['id']} ({node['type']}): values {node['values']}")
    return problems


def drop(ui: ComfyPage, name: str, workflow: dict) -> None:
    ui.drop_workflow(name, json.dumps(workflow), node_count=len(workflow["nodes"]))


# ---- loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_when_dropped(path: Path, ui: ComfyPage, comfy_server: ComfyServer,
                                             screenshot_dir: Path) -> None:
    workflow = load(path)
    drop(ui, path.name, workflow)
    assert ui.missing_node_types() == []
    shown = ui.nodes()
    assert sorted(n["type"] for n in shown) == sorted(n["type"] for n in workflow["nodes"])
    assert any(n["type"].startswith("LoraFoundry") for n in shown)
    problems = widget_problems(shown, workflow, comfy_server.object_info())
    assert not problems, "\n".join(problems)
    if path.stem == "train_and_validate":
        ui.close_dialogs()  # the missing-models warning: the test server has no v1-5 checkpoint
        ui.fit_nodes([20, 2, 3, 4, 5, 6])
        check_screenshot(ui.screenshot(screenshot_dir / "loaded_graph.png"))


def test_a_missing_node_type_is_reported(ui: ComfyPage) -> None:
    """The check above can fail: an unknown node type does bring up the missing-nodes dialog."""
    workflow = load(UI_DIR / "train_only.json")
    workflow["nodes"][0]["type"] = "LoraFoundryNoSuchNode"
    drop(ui, "broken.json", workflow)
    missing = wait_until(ui.missing_node_types, 10, "the missing node being reported")
    assert missing == ["LoraFoundryNoSuchNode"]


# ---- running and cancelling ----------------------------------------------------------------------------


def follow(ui: ComfyPage, server: ComfyServer, node_id: int, timeout: float, until=None) -> tuple[str, list[dict]]:
    """Sample the node's progress state until its prompt has ended (or until(states) is true).

    Returns the prompt id and the distinct states seen, in order."""
    states: list[dict] = []
    prompt_id = wait_until(lambda: ui.node_state(node_id)["prompt_id"], 60, "the prompt starting")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, dom_text = ui.node_state(node_id), ui.progress_text_in_dom(node_id)
        if not states or state != {k: v for k, v in states[-1].items() if k != "dom_text"}:
            states.append(state)
        states[-1]["dom_text"] = dom_text  # the page's text late in this state (the DOM follows a tick later)
        if until is not None and until(states):
            return prompt_id, states
        if "status" in server.history(prompt_id).get(prompt_id, {}):
            return prompt_id, states
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} still running after {timeout:.0f} s:\n{server.log_tail()}")


def steps_shown(states: list[dict]) -> list[int]:
    return [int(m.group(1)) for s in states if s["text"] and (m := STEP_TEXT.search(s["text"]))]


@pytest.mark.slow  # loads the SD1.5-shaped checkpoint
def test_train_and_validate_runs_and_shows_progress(ui: ComfyPage, comfy_server: ComfyServer,
                                                    screenshot_dir: Path) -> None:
    steps = 3
    workflow = set_widget_values(load(UI_DIR / "train_and_validate.json"), comfy_server.object_info(),
                                 tiny_train_and_validate(comfy_server.checkpoint_name, "browser-run", steps))
    drop(ui, "train_and_validate-tiny.json", workflow)
    assert ui.missing_node_types() == []
    ui.close_dialogs()
    ui.run()
    prompt_id, states = follow(ui, comfy_server, 4, timeout=900)

    entry = comfy_server.wait(prompt_id, timeout=30)
    shown = steps_shown(states)
    assert shown == sorted(shown) and shown[-1] == steps and len(set(shown)) >= 2, [s["text"] for s in states]
    bars = [s["bar"] for s in states if s["bar"] is not None]
    assert bars == sorted(bars) and len({b for b in bars if b > 0}) >= 2 and max(bars) == pytest.approx(1.0), bars
    stored = [(s["value"], s["max"]) for s in states if s["state"] == "running" and s["max"] == steps]
    assert {value for value, _ in stored} >= {1, steps}, stored  # the execution store, fed by the websocket
    with_dom = [s for s in states if STEP_TEXT.search(s["text"] or "")]
    assert all(STEP_TEXT.search(s["dom_text"]) for s in with_dom), [s["dom_text"] for s in with_dom]

    lora = next(out for out in entry["outputs"].values() if "lora_path" in out)["lora_path"][0]
    assert Path(lora).name == "browser-run.safetensors"
    assert ui.node_state(4)["text"].startswith(f"done: {steps} steps in "), states[-1]
    wait_until(lambda: ui.node_output_images(19) and ui.node_output_images(5), 30, "the grid and curve shown")
    ui.fit_nodes([4, 5, 6])
    check_screenshot(ui.screenshot(screenshot_dir / "finished_run.png"))


@pytest.mark.slow  # loads the SD1.5-shaped checkpoint
def test_cancel_button_stops_the_training(ui: ComfyPage, comfy_server: ComfyServer) -> None:
    overrides = ["1.resolution=64", f"3.base_model={comfy_server.checkpoint_name}", "3.output_name=browser-cancel",
                 "3.max_steps=100000", "3.batch_size=2", "3.device=cpu", "3.mixed_precision=no",
                 "3.save_every_steps=0", "3.sample_every_steps=0", '3.validation_prompts=""', "3.overwrite=true"]
    workflow = set_widget_values(load(UI_DIR / "train_only.json"), comfy_server.object_info(), overrides)
    drop(ui, "train_only-long.json", workflow)
    ui.close_dialogs()
    ui.run()
    prompt_id, states = follow(ui, comfy_server, 3, timeout=600, until=lambda s: len(set(steps_shown(s))) >= 2)
    assert comfy_server.child_processes(), "the trainer should be running"
    assert ui.cancel_enabled() and any(s["bar"] for s in states), states[-1]

    asked = time.monotonic()
    ui.cancel()
    entry = comfy_server.wait(prompt_id, timeout=60, check=False)
    left = comfy_server.wait_no_children(timeout=15)
    stopped_after = time.monotonic() - asked
    assert not left, f"trainer processes left {stopped_after:.1f} s after Cancel: {left}"
    assert stopped_after < 20, f"stopping took {stopped_after:.1f} s"
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    wait_until(lambda: ui.node_state(3)["prompt_id"] is None and not ui.cancel_enabled(), 30, "the page seeing it stop")
    last = ui.node_state(3)
    time.sleep(3)
    assert ui.node_state(3)["text"] == last["text"], "the progress text went on after Cancel"
    assert last["bar"] is None, "the progress bar is still shown"
    assert not (comfy_server.loras_dir / "browser-cancel.safetensors").exists()


# ---- finding things --------------------------------------------------------------------------------------


def test_templates_browser_lists_the_examples_under_the_pack(ui: ComfyPage) -> None:
    ui.open_templates()
    cards = ui.template_category(PACK_NAME)
    assert sorted(cards) == sorted(path.stem for path in UI_WORKFLOWS)
    ui.open_template("train_only")
    wait_until(lambda: any(n["type"] == "LoraFoundryTrain" for n in ui.nodes()), 30, "train_only loading")
    assert ui.missing_node_types() == []


def test_every_pack_node_can_be_added_from_the_search_box(ui: ComfyPage, comfy_server: ComfyServer) -> None:
    info = comfy_server.object_info()
    pack = {name: node for name, node in info.items() if node.get("python_module") == PACK_MODULE}
    assert len(pack) >= 5
    ui.new_blank_workflow()
    for node_id, node in sorted(pack.items()):
        added = ui.search_and_add(node["display_name"])
        assert added["type"] == node_id, f"searching {node['display_name']!r} added {added['type']}"
        assert added["widgets"] == expected_widgets(node)
        ui.remove_node(added["id"])


def test_the_train_node_is_found_by_its_search_aliases(ui: ComfyPage, comfy_server: ComfyServer) -> None:
    """Where the server declares search aliases (ComfyUI 0.3x and later; 0.3.75 has none), the search box finds
    the Train node by each of them."""
    aliases = comfy_server.object_info("LoraFoundryTrain").get("search_aliases")
    if not aliases:
        pytest.skip(f"ComfyUI {'.'.join(map(str, comfyui_version()))}'s node schema has no search_aliases")
    assert sorted(aliases) == ["dreambooth", "lora trainer", "train lora"]
    ui.new_blank_workflow()
    for alias in aliases:
        ui.search(alias)
        wait_until(lambda: "LoRA Foundry Train" in ui.search_results(), 10, f"{alias!r} finding the Train node")
        ui.page.keyboard.press("Escape")
