"""The real ComfyUI frontend in headless Chromium (Playwright's sync API): what a user does, and what it shows.

    with launch_chromium(tmp_path / "profile") as context:
        ui = ComfyPage.open(context, server.url)
        ui.drop_workflow("train_and_validate.json", text)
        ui.run()

Chromium is Debian's package (/usr/bin/chromium, or $LORA_FOUNDRY_CHROMIUM); Playwright never downloads a
browser here. State the page does not draw as text (dialogs, the execution store, node widgets) is read from
the app's own objects: `window.app` and the Pinia stores behind the Vue app.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from run_workflow import parse_set  # noqa: E402
from workflow_to_api import widget_slots  # noqa: E402

CHROMIUM = Path(os.environ.get("LORA_FOUNDRY_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_NOTE = ROOT / ".venv" / ".chromium-unavailable"  # scripts/setup.sh writes why it could not install it
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}
MISSING_NODES_DIALOG = "global-missing-nodes"
PROGRESS_TEXT_WIDGET = "$$node-text-preview"
PINIA = "document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia"
# settings that make screenshots readable: nodes drawn in full at any zoom, no minimap over the graph
SCREENSHOT_SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": False}

# Dropping a file: the same DragEvent sequence a drag from the file manager produces, on the canvas; the
# frontend's document-level drop handler reads the File from dataTransfer and loads it (app.handleFile).
DROP_JS = """async ([name, text]) => {
  const file = new File([text], name, {type: 'application/json', lastModified: Date.now()});
  const data = new DataTransfer();
  data.items.add(file);
  const canvas = document.querySelector('#graph-canvas');
  const box = canvas.getBoundingClientRect();
  const at = {bubbles: true, cancelable: true, composed: true, dataTransfer: data,
              clientX: box.x + box.width / 2, clientY: box.y + box.height / 2};
  for (const type of ['dragenter', 'dragover', 'drop']) canvas.dispatchEvent(new DragEvent(type, at));
}"""
DIALOGS_JS = f"() => {PINIA}.state.value.dialog.dialogStack.map(d => d.key)"
# The node types a loaded workflow lacks, as the page reports them: frontends before ~1.40 open the
# missing-nodes dialog (its props list them); newer ones keep them in the missingNodesError store that feeds
# the "errors found" overlay and the Errors panel, and open no dialog.
MISSING_NODE_TYPES_JS = f"""() => {{
  const name = t => typeof t === 'string' ? t : t.type;
  const store = {PINIA}.state.value.missingNodesError;
  if (store) return (store.missingNodesError?.nodeTypes ?? []).map(name);
  const dialog = {PINIA}.state.value.dialog.dialogStack.find(d => d.key === '{MISSING_NODES_DIALOG}');
  if (!dialog) return [];
  const props = dialog.contentProps ?? {{}};
  return (props.missingNodeTypes ?? props.nodeTypes ?? ['(unlisted)']).map(name);
}}"""
CLOSE_DIALOGS_JS = f"""() => {{
  const store = {PINIA}._s.get('dialog');
  for (const dialog of [...store.dialogStack]) store.closeDialog({{key: dialog.key}});
}}"""
NODES_JS = """() => window.app.graph.nodes.map(node => ({
  id: node.id, type: node.type, title: node.title,
  widgets: (node.widgets || []).map(w => w.name),
  values: node.serialize().widgets_values ?? [],
}))"""
# The Train node as the user sees it: LiteGraph's progress bar (node.progress, 0..1, set from the execution
# store), the progress-text widget, and the store's own websocket-fed state for that node.
NODE_STATE_JS = f"""(id) => {{
  const node = window.app.graph.getNodeById(id);
  const text = (node.widgets || []).find(w => w.name === '{PROGRESS_TEXT_WIDGET}');
  const execution = {PINIA}.state.value.execution;
  const state = execution.nodeProgressStates[String(id)] ?? null;
  return {{bar: node.progress ?? null, text: text ? text.value : null, value: state ? state.value : null,
           max: state ? state.max : null, state: state ? state.state : null,
           prompt_id: execution.activePromptId ?? null}};
}}"""
FIT_JS = """([ids, margin]) => {
  // the nodes' bounding box, scaled to fit the canvas area that the sidebar, menu and action bar leave free
  const nodes = ids.map(id => window.app.graph.getNodeById(id));
  const left = Math.min(...nodes.map(n => n.pos[0])) - margin;
  const top = Math.min(...nodes.map(n => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT)) - margin;
  const width = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + margin - left;
  const height = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + margin - top;
  const area = {x: 64, y: 136, w: window.innerWidth - 72, h: window.innerHeight - 144};
  const ds = window.app.canvas.ds;
  ds.scale = Math.min(area.w / width, area.h / height, 1);
  ds.offset[0] = (area.x + (area.w - width * ds.scale) / 2) / ds.scale - left;
  ds.offset[1] = area.y / ds.scale - top;
  window.app.canvas.setDirty(true, true);
}"""


def chromium_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium and Playwright are both there."""
    if not CHROMIUM.is_file():
        note = CHROMIUM_NOTE.read_text(encoding="utf-8").strip() if CHROMIUM_NOTE.is_file() else ""
        return f"Chromium is not installed at {CHROMIUM}" + (f": {note}" if note else
                                                              " (scripts/setup.sh installs Debian's chromium as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: run scripts/setup.sh (it is in requirements-dev.txt)"
    return None


@contextmanager
def launch_chromium(profile_dir: Path) -> Iterator[Any]:
    """A persistent Chromium context on a fresh profile directory, headless, with the flags above."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True,
            viewport=VIEWPORT, accept_downloads=False)
        try:
            yield context
        finally:
            context.close()


def wait_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    """check()'s first truthy result, polled until `timeout` seconds; TimeoutError naming `what` after."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def set_widget_values(workflow: dict, object_info: dict, items: Iterable[str]) -> dict:
    """A copy of a UI-format workflow with NODE_ID.INPUT=VALUE widget values set (run_workflow.py's syntax)."""
    workflow = json.loads(json.dumps(workflow))
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    for item in items:
        node_id, name, value = parse_set(item)
        node = nodes[node_id]
        names = [slot for slot, _ in widget_slots(object_info[node["type"]])]
        if name not in names:
            raise KeyError(f"{item}: node {node_id} ({node['type']}) has no widget {name!r} ({names})")
        node["widgets_values"][names.index(name)] = value
    return workflow


def expected_widgets(info: dict) -> list[str]:
    """The widget names the frontend gives a node of this definition, in order."""
    return [name.rsplit(".", 1)[-1] if spec is None else name for name, spec in widget_slots(info)]


class ComfyPage:
    """One browser tab on the ComfyUI page, with the actions the tests take and the state they read."""

    def __init__(self, page: Any):
        self.page = page
        self.console_errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    @classmethod
    def open(cls, context: Any, url: str, timeout: float = 120) -> ComfyPage:
        ui = cls(context.new_page())
        ui.page.goto(url, timeout=timeout * 1000)
        ui.page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady",
                                  timeout=timeout * 1000)
        ui.page.wait_for_function(f"() => {PINIA}._s.get('nodeDef') && window.app.extensionManager?.setting",
                                  timeout=timeout * 1000)
        return ui

    def close(self) -> None:
        self.page.close()

    # ---- chrome around the canvas ----------------------------------------------------------------

    def dialogs(self) -> list[str]:
        return self.page.evaluate(DIALOGS_JS)

    def missing_node_types(self) -> list[str]:
        """The node types the page says the loaded workflow lacks (dialog or errors panel, by frontend)."""
        return self.page.evaluate(MISSING_NODE_TYPES_JS)

    def close_dialogs(self) -> None:
        """Close whatever dialog is open (the first visit's Templates dialog, a missing-models warning)."""
        self.page.evaluate(CLOSE_DIALOGS_JS)
        wait_until(lambda: not self.dialogs(), 10, "dialogs closing")

    def dismiss_banner(self) -> None:
        """Close the "Introducing Nodes 2.0" banner when it is shown."""
        close = self.page.locator("xpath=//span[contains(., 'Introducing Nodes 2.0')]/../../button")
        if close.count():
            close.first.click()

    def set_settings(self, settings: dict[str, Any]) -> None:
        for key, value in settings.items():
            self.page.evaluate("([k, v]) => window.app.extensionManager.setting.set(k, v)", [key, value])

    def prepare(self) -> None:
        """Settle the first view: no dialogs, no banner, readable nodes."""
        self.page.wait_for_timeout(1000)  # the first visit's Templates dialog opens a moment after load
        self.close_dialogs()
        self.dismiss_banner()
        self.set_settings(SCREENSHOT_SETTINGS)

    # ---- the graph ---------------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        return self.page.evaluate(NODES_JS)

    def drop_workflow(self, name: str, text: str, node_count: int, timeout: float = 30) -> None:
        """Drop a workflow file on the canvas and wait until the graph holds its `node_count` nodes."""
        self.page.evaluate(DROP_JS, [name, text])
        wait_until(lambda: len(self.nodes()) == node_count and self.active_workflow() == Path(name).stem,
                   timeout, f"{name} loading")
        self.page.wait_for_timeout(500)  # dialogs about the loaded graph open right after it

    def active_workflow(self) -> str | None:
        return self.page.evaluate(f"() => {PINIA}._s.get('workflow').activeWorkflow?.filename ?? null")

    def fit_nodes(self, node_ids: list[int], margin: int = 20) -> None:
        self.page.evaluate(FIT_JS, [node_ids, margin])
        self.page.wait_for_timeout(300)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.mouse.move(2, VIEWPORT["height"] - 2)  # no hover tooltip in the picture
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))
        return path

    # ---- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        self.page.get_by_role("button", name="Run", exact=True).click()

    def cancel(self) -> None:
        """The action bar's ✕ ("Cancel current run"): ComfyUI's interrupt."""
        self.page.get_by_role("button", name="Cancel current run").click()

    def cancel_enabled(self) -> bool:
        return self.page.get_by_role("button", name="Cancel current run").is_enabled()

    def node_state(self, node_id: int) -> dict:
        return self.page.evaluate(NODE_STATE_JS, node_id)

    def progress_text_in_dom(self, node_id: int) -> str:
        """The node's progress text as the page draws it: the DOM widget over the canvas that shows it."""
        return self.page.evaluate(f"""(id) => {{
          const widget = window.app.graph.getNodeById(id).widgets.find(w => w.name === '{PROGRESS_TEXT_WIDGET}');
          if (!widget?.value) return '';
          const shown = [...document.querySelectorAll('.dom-widget')].map(e => e.innerText.trim());
          return shown.find(text => text === widget.value.trim()) ?? '';
        }}""", node_id)

    def node_output_images(self, node_id: int) -> list[str]:
        """File names of the images the page shows on an output node after a run."""
        return self.page.evaluate(
            "(id) => (window.app.nodeOutputs?.[String(id)]?.images ?? []).map(i => i.filename)", node_id)

    # ---- the templates browser and the node search box -------------------------------------------

    def open_templates(self) -> None:
        self.page.get_by_role("button", name="Templates", exact=True).click()
        self.page.locator("[data-testid=template-workflows-content]").wait_for(timeout=30_000)

    def template_category(self, name: str) -> list[str]:
        """Click a category of the templates browser; the ids of the template cards it then shows."""
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(name, exact=True).first.click()
        self.page.wait_for_timeout(500)
        heading = dialog.get_by_text(name, exact=True)
        wait_until(lambda: heading.count() >= 2, 10, f"the {name} category opening")  # nav entry + title
        cards = self.page.locator("[data-testid^=template-workflow-]")
        return [card.get_attribute("data-testid").removeprefix("template-workflow-") for card in cards.all()]

    def open_template(self, name: str) -> None:
        self.page.locator(f"[data-testid=template-workflow-{name}]").click()

    def search_and_add(self, query: str, at: tuple[int, int] = (640, 420)) -> dict:
        """Double-click empty canvas, type `query` in the node search box, take the first match with Enter.

        Returns the node that was added."""
        before = {node["id"] for node in self.nodes()}
        self.search(query, at)
        wait_until(lambda: self.search_results()[:1] and self.search_results()[0].startswith(query), 10,
                   f"{query!r} as the first search result")
        self.page.keyboard.press("Enter")
        added = wait_until(lambda: [n for n in self.nodes() if n["id"] not in before], 10, f"{query} being added")
        return added[0]

    def search(self, query: str, at: tuple[int, int] = (640, 420)) -> None:
        """Open the node search box on empty canvas and type `query` (Escape closes it)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        search = self.page.get_by_role("combobox").or_(self.page.locator(".comfy-vue-node-search-box input"))
        for attempt in range(3):  # a double-click the canvas takes while still settling opens nothing: again
            self.page.locator("#graph-canvas").dblclick(position={"x": at[0], "y": at[1]})
            try:
                search.first.wait_for(timeout=5_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    raise
        self.page.keyboard.type(query, delay=20)

    def search_results(self) -> list[str]:
        """The node search box's results, first line of each (the display name), in order."""
        texts = self.page.evaluate("() => [...document.querySelectorAll('[role=option]')].map(e => e.innerText)")
        return [text.strip().splitlines()[0].strip() for text in texts if text.strip()]

    def remove_node(self, node_id: int) -> None:
        self.page.evaluate("(id) => window.app.graph.remove(window.app.graph.getNodeById(id))", node_id)

    def new_blank_workflow(self) -> None:
        self.page.get_by_role("button", name="Create a new blank workflow").click()
        wait_until(lambda: not self.nodes(), 10, "a blank workflow")
