"""Runs a workflow on a ComfyUI server and follows it: progress while it runs, outputs when it is done.

    python scripts/run_workflow.py workflows_api/train_and_validate.json
    python scripts/run_workflow.py workflows_api/train_and_validate.json --server http://127.0.0.1:8188 \\
        --set 2.resolution=64 --set 4.max_steps=4 --set 4.device=cpu

The file is an API-format prompt (workflows_api/); a UI-format workflow (example_workflows/) is converted first
with the server's /object_info. `--set NODE_ID.INPUT=VALUE` changes one input before queueing; VALUE is read as
JSON when it parses (4, 0.5, true, "text") and as a plain string otherwise.

It queues the prompt with its own client_id, prints what the server says over /ws (node started, progress bars,
the nodes' progress text, cached nodes), then prints the outputs from /history: saved/previewed images as paths
under the server's output/temp folder, and every other UI value (the Train node's lora_path, run_dir, ...).

Exit status: 0 done, 1 a node failed (its error is printed), 2 the server refused the prompt or the arguments
are wrong, 3 interrupted, 4 timed out or lost the server. Ctrl-C interrupts the prompt on the server too.
Needs only the standard library and aiohttp (installed with ComfyUI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_LOST = 0, 1, 2, 3, 4
IMAGE_KEYS = ("images", "gifs", "videos", "audio", "3d")


class UsageError(ValueError):
    pass


# ---- the prompt --------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(item: str) -> tuple[str, str, Any]:
    """"4.max_steps=2" -> ("4", "max_steps", 2)."""
    target, sep, value = item.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise UsageError(f"--set {item!r}: write NODE_ID.INPUT=VALUE, e.g. 4.max_steps=10")
    return node_id.strip(), name.strip(), parse_value(value)


def apply_overrides(prompt: dict, items: list[str]) -> dict:
    """A copy of the prompt with each NODE_ID.INPUT=VALUE applied; unknown nodes or inputs are errors."""
    prompt = json.loads(json.dumps(prompt))
    for item in items:
        node_id, name, value = parse_set(item)
        node = prompt.get(node_id)
        if node is None:
            raise UsageError(f"--set {item!r}: no node {node_id} (nodes: {', '.join(prompt)})")
        if name not in node["inputs"]:
            raise UsageError(f"--set {item!r}: node {node_id} ({node['class_type']}) has no input {name!r} "
                             f"(inputs: {', '.join(node['inputs'])})")
        if isinstance(node["inputs"][name], list):
            raise UsageError(f"--set {item!r}: input {name!r} of node {node_id} is a link, not a value")
        node["inputs"][name] = value
    return prompt


def load_workflow(path: Path, object_info: dict | None = None) -> dict:
    """An API-format prompt from the file (converting a UI-format workflow with object_info)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if "nodes" not in data:
        return data
    if object_info is None:
        raise UsageError(f"{path} is a UI-format workflow: converting it needs the server's /object_info")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workflow_to_api import convert

    return convert(data, object_info)


def is_ui_workflow(path: Path) -> bool:
    return "nodes" in json.loads(path.read_text(encoding="utf-8"))


def describe_refusal(body: Any) -> str:
    """The /prompt 400 answer: the error, then one line per failing node input."""
    if not isinstance(body, dict):
        return str(body)
    error = body.get("error") or {}
    lines = [f"{error.get('message', 'refused')}: {error.get('details', '')}".rstrip(": ")]
    for node_id, node in (body.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "\n".join(lines)


# ---- following the run ---------------------------------------------------------------------------------


@dataclass
class Follower:
    """Turns /ws messages of one prompt into printed lines, and knows when and how the prompt ended."""

    prompt: dict
    out: TextIO = sys.stdout
    prompt_id: str | None = None
    outcome: str | None = None  # "success", "error" or "interrupted"
    error: dict = field(default_factory=dict)
    last_text: dict[str, str] = field(default_factory=dict)
    last_bar: tuple[str, int, bool] | None = None

    def node_name(self, node_id: str | None) -> str:
        node = self.prompt.get(str(node_id), {})
        title = node.get("_meta", {}).get("title") or node.get("class_type") or "?"
        return f"node {node_id} ({title})"

    def mine(self, data: dict) -> bool:
        return self.prompt_id is not None and data.get("prompt_id") == self.prompt_id

    def handle(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "progress_text":
            self.on_text(data)
        elif not self.mine(data):
            return
        elif kind == "executing" and data.get("node") is not None:
            self.say(f"▶ {self.node_name(data['node'])}")
        elif kind == "execution_cached" and data.get("nodes"):
            self.say(f"cached: {', '.join(map(str, data['nodes']))}")
        elif kind == "progress":
            self.on_progress(data)
        elif kind == "execution_success":
            self.outcome = "success"
        elif kind == "execution_error":
            self.outcome, self.error = "error", data
        elif kind == "execution_interrupted":
            self.outcome, self.error = "interrupted", data

    def on_text(self, data: dict) -> None:
        node, text = str(data.get("node")), data.get("text", "")
        if node in self.prompt and text and self.last_text.get(node) != text:
            self.last_text[node] = text
            self.say(f"  [{node}] {text}")

    def on_progress(self, data: dict) -> None:
        value, total = int(data.get("value", 0)), max(int(data.get("max", 1)), 1)
        node = str(data.get("node"))
        # a bar at every tenth and at the end, not at every step (nor again for a repeated message)
        mark = (node, value * 10 // total, value == total)
        if self.last_bar == mark:
            return
        self.last_bar = mark
        self.say(f"  [{node}] {progress_bar(value, total)}")

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def progress_bar(value: int, total: int, width: int = 24) -> str:
    filled = min(width, value * width // max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {value}/{total}"


def decode_binary(data: bytes) -> dict:
    """Progress text arrives as a binary frame: event 3, node id length, node id, utf-8 text."""
    event = int.from_bytes(data[:4], "big")
    if event != 3:
        return {"type": "binary", "data": {"event": event}}
    size = int.from_bytes(data[4:8], "big")
    return {"type": "progress_text", "data": {"node": data[8 : 8 + size].decode(errors="replace"),
                                              "text": data[8 + size :].decode(errors="replace")}}


# ---- outputs -------------------------------------------------------------------------------------------


def output_roots(system_stats: dict) -> dict[str, str]:
    """Where the server keeps output/ and temp/, when its command line says so (else relative names)."""
    argv = system_stats.get("system", {}).get("argv", [])
    options = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    base = options.get("--base-directory")
    roots = {"output": "output", "temp": "temp", "input": "input"}
    if base:
        roots = {kind: str(Path(base) / kind) for kind in roots}
    if options.get("--output-directory"):
        roots["output"] = options["--output-directory"]
    return roots


def file_path(item: dict, roots: dict[str, str]) -> str:
    kind = item.get("type", "output")
    parts = [roots.get(kind, kind), item.get("subfolder", ""), item.get("filename", "")]
    return str(Path(*[p for p in parts if p]))


def describe_outputs(entry: dict, prompt: dict, roots: dict[str, str]) -> list[str]:
    """One line per saved file and per other UI value, grouped by node."""
    lines = []
    for node_id, output in sorted(entry.get("outputs", {}).items(), key=lambda kv: _node_key(kv[0])):
        title = prompt.get(node_id, {}).get("_meta", {}).get("title") or prompt.get(node_id, {}).get("class_type")
        lines.append(f"node {node_id} ({title}):")
        for key, values in output.items():
            if key == "animated":
                continue
            for value in values if isinstance(values, list) else [values]:
                if key in IMAGE_KEYS and isinstance(value, dict) and "filename" in value:
                    lines.append(f"  {key}: {file_path(value, roots)}")
                else:
                    lines.append(f"  {key}: {value}")
    return lines


def _node_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def describe_error(error: dict, follower: Follower) -> str:
    where = follower.node_name(error.get("node_id"))
    if follower.outcome == "interrupted":
        return f"interrupted at {where}"
    message = f"{where} failed: {error.get('exception_type', 'error')}: {error.get('exception_message', '')}"
    return message.rstrip()


# ---- talking to the server -----------------------------------------------------------------------------


async def get_json(session, url: str) -> Any:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def queue_prompt(session, server: str, prompt: dict, client_id: str) -> str:
    async with session.post(f"{server}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise UsageError(describe_refusal(body))
        return body["prompt_id"]


async def follow(ws, follower: Follower, deadline: float) -> None:
    import aiohttp

    while follower.outcome is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        msg = await ws.receive(timeout=left)
        if msg.type == aiohttp.WSMsgType.TEXT:
            follower.handle(json.loads(msg.data))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            follower.handle(decode_binary(msg.data))
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            raise ConnectionError("the server closed the websocket")  # an OSError: main() reports it


async def history_entry(session, server: str, prompt_id: str, timeout: float = 30) -> dict:
    """The prompt's /history entry; the server stores it just after it sends execution_success, so wait a bit."""
    deadline = time.monotonic() + timeout
    while True:
        entry = (await get_json(session, f"{server}/history/{prompt_id}")).get(prompt_id)
        if entry or time.monotonic() > deadline:
            return entry or {}
        await asyncio.sleep(0.1)


async def cancel(session, server: str, prompt_id: str | None) -> None:
    if prompt_id is None:
        return
    async with session.post(f"{server}/queue", json={"delete": [prompt_id]}):
        pass
    async with session.post(f"{server}/interrupt", json={"prompt_id": prompt_id}):
        pass


async def run(path: Path, server: str, overrides: list[str], timeout: float, out: TextIO = sys.stdout) -> int:
    import aiohttp

    server = server.rstrip("/")
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        object_info = await get_json(session, f"{server}/object_info") if is_ui_workflow(path) else None
        prompt = apply_overrides(load_workflow(path, object_info), overrides)
        ws_url = server.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            follower = Follower(prompt, out)
            try:
                follower.prompt_id = await queue_prompt(session, server, prompt, client_id)
            except UsageError as error:
                print(f"the server refused the prompt:\n{error}", file=out)
                return EXIT_REFUSED
            print(f"queued {follower.prompt_id} on {server}", file=out, flush=True)
            try:
                await follow(ws, follower, time.monotonic() + timeout)
            except (asyncio.CancelledError, KeyboardInterrupt):
                await cancel(session, server, follower.prompt_id)
                raise
            except (TimeoutError, asyncio.TimeoutError):
                print(f"no result after {timeout:.0f}s; prompt {follower.prompt_id} left running", file=out)
                return EXIT_LOST
        if follower.outcome != "success":
            print(describe_error(follower.error, follower), file=out)
            return EXIT_INTERRUPTED if follower.outcome == "interrupted" else EXIT_FAILED
        entry = await history_entry(session, server, follower.prompt_id)
        roots = output_roots(await get_json(session, f"{server}/system_stats"))
    print("done. outputs:", file=out)
    for line in describe_outputs(entry, prompt, roots):
        print(line, file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    import aiohttp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("workflow", type=Path, help="API-format (or UI-format) workflow JSON")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                        help="change one input before queueing (repeatable)")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait (default: a day)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.workflow, args.server, args.overrides, args.timeout))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("cancelled: the prompt was interrupted on the server", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, aiohttp.ClientError) as error:
        print(f"error: lost {args.server}: {error}", file=sys.stderr)
        return EXIT_LOST


if __name__ == "__main__":
    sys.exit(main())
