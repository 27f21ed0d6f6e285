"""A real ComfyUI server, headless: for the tests (an isolated base directory) and the demo (ComfyUI's own).

    with ComfyServer(tmp_path / "comfy", checkpoints={"sd15.safetensors": ckpt}) as server:
        prompt_id = server.post_prompt(prompt)
        entry = server.wait(prompt_id, timeout=600)

The base directory gets the pack (custom_nodes/lora-foundry -> this repo), the checkpoints (symlinks), the sample
dataset (input/lora-foundry-sample), and its own output/, user/ and temp/. ComfyUI runs from COMFYUI_DIR (or
.runtime/ComfyUI) with `--cpu`, in its own process group, logging to BASE/comfyui.log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
API_DIR = ROOT / "workflows_api"
SAMPLE_DATASET = "lora-foundry-sample"
PACK_NAME = "lora-foundry"
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "diffusers", "embeddings")


def api_workflow(name: str, overrides: Iterable[str] = ()) -> dict:
    """workflows_api/<name>.json with run_workflow.py's NODE_ID.INPUT=VALUE overrides applied."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_workflow import apply_overrides

    prompt = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return apply_overrides(prompt, list(overrides))


def tiny_train_and_validate(checkpoint_name: str, output_name: str = "lfstyle-shapes", steps: int = 2) -> list[str]:
    """Overrides that make train_and_validate a CPU smoke run: 64 px, `steps` steps, 2 sampling steps."""
    return [
        f"1.ckpt_name={checkpoint_name}", f"4.base_model={checkpoint_name}", f"4.output_name={output_name}",
        "2.resolution=64", f"4.max_steps={steps}", "4.batch_size=2", "4.device=cpu", "4.mixed_precision=no",
        "4.save_every_steps=0", "4.sample_every_steps=0", "4.sample_steps=2", "4.overwrite=true",
        "13.width=64", "13.height=64", "14.steps=2", "15.steps=2", "18.cell=64",
    ]


# A random-weight base draws noise whatever is trained: these settings make a LoRA's effect visible there within
# minutes on a CPU (the demo's, and its test's). Measured on the CPU: the samples at strength 1 sit several times
# closer to the training latents than at strength 0.
SOLID_DATASET = "lora-foundry-solid-red"  # scripts/make_sample_dataset.py make_solid_dataset
RANDOM_BASE_SETTINGS = [
    f"2.folder={SOLID_DATASET}", "2.resolution=64", "3.rank=8", "3.alpha=8.0", "4.max_steps=80", "4.batch_size=2",
    "4.learning_rate=0.001", "4.save_every_steps=40", "4.sample_every_steps=40", "4.sample_steps=8",
    "13.width=64", "13.height=64", "14.steps=20", "15.steps=20", "18.cell=256",
    # the samplers draw the training caption without guidance: a random text encoder's prompts differ at random,
    # and guidance 7 would multiply that difference rather than what the LoRA learned
    "9.text=lfstyle, solid red", "11.text=lfstyle, solid red", "14.cfg=1.0", "15.cfg=1.0",
]


def random_base_settings(on_gpu: bool) -> list[str]:
    """train_and_validate's overrides for a random-weight base (on the CPU: fp32 on the CPU device)."""
    return RANDOM_BASE_SETTINGS + ([] if on_gpu else ["4.device=cpu", "4.mixed_precision=no"])


def effect_prompt(prompt: dict, colors: Mapping[str, tuple[int, int, int]], prefix: str) -> dict:
    """train_and_validate's prompt plus what measures its LoRA's effect: the two samplers' latents saved
    (strength 0 and 1), and each training colour encoded by the base's VAE and saved. Queued after the
    workflow itself, its nodes come from ComfyUI's cache; only the new ones run."""
    extra: dict[str, dict] = {
        "effect-s0": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"{prefix}-s0"}},
        "effect-s1": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": f"{prefix}-s1"}},
    }
    width, height = prompt["13"]["inputs"]["width"], prompt["13"]["inputs"]["height"]
    for name, (r, g, b) in colors.items():
        extra[f"effect-{name}"] = {"class_type": "EmptyImage", "inputs": {
            "width": width, "height": height, "batch_size": 1, "color": (r << 16) | (g << 8) | b}}
        extra[f"effect-{name}-latent"] = {"class_type": "VAEEncode", "inputs": {
            "pixels": [f"effect-{name}", 0], "vae": ["1", 2]}}
        extra[f"effect-{name}-save"] = {"class_type": "SaveLatent", "inputs": {
            "samples": [f"effect-{name}-latent", 0], "filename_prefix": f"{prefix}-train-{name}"}}
    return prompt | extra


def lora_effect(server: ComfyServer, prompt: dict, colors: Mapping[str, tuple[int, int, int]]) -> tuple[float, float]:
    """(strength 0, strength 1): the RMS distance of the sampled latent to the nearest training picture's latent.
    The LoRA works when strength 1 sits far closer than strength 0."""
    from safetensors.torch import load_file

    prefix = f"lora-foundry/effect-{uuid.uuid4().hex[:8]}"
    entry = server.run(effect_prompt(prompt, colors, prefix), timeout=600)

    def latent(node: str) -> Any:
        (saved,) = entry["outputs"][node]["latents"]
        return load_file(server.output_dir / saved["subfolder"] / saved["filename"])["latent_tensor"].float()

    training = [latent(f"effect-{name}-save") for name in colors]
    return tuple(min(float((latent(node) - t).pow(2).mean().sqrt()) for t in training)
                 for node in ("effect-s0", "effect-s1"))


class ComfyError(RuntimeError):
    """The server refused a request or a prompt failed; `details` holds the server's JSON."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


def default_comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or ROOT / ".runtime" / "ComfyUI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(link: Path, target: Path) -> None:
    """Point `link` at `target`; an existing symlink is re-pointed, anything else is never replaced."""
    if link.exists() and link.resolve() == target.resolve():
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ComfyError(f"{link} exists and is not a link to {target}; not replacing it")
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def _pack_installed_in(custom_nodes: Path) -> bool:
    return custom_nodes.is_dir() and any(p.resolve() == ROOT for p in custom_nodes.iterdir())


class ComfyServer:
    """One ComfyUI process serving the pack from `base_dir`; start() / stop(), or use it as a context manager."""

    def __init__(
        self,
        base_dir: Path | str,
        checkpoints: Mapping[str, Path | str] | None = None,
        comfy_dir: Path | str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        cpu: bool = True,
    ):
        self.base_dir = Path(base_dir).resolve()
        self.comfy_dir = Path(comfy_dir) if comfy_dir else default_comfy_dir()
        self.checkpoints = {name: Path(path) for name, path in (checkpoints or {}).items()}
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.cpu = cpu
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._object_info: dict | None = None

    # ---- paths -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def checkpoint_name(self) -> str | None:
        """The first checkpoint's name as ComfyUI lists it (what ckpt_name / base_model take)."""
        return next(iter(self.checkpoints), None)

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def checkpoints_dir(self) -> Path:
        return self.models_dir / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        return self.models_dir / "loras"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def user_dir(self) -> Path:
        return self.base_dir / "user"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    @property
    def dataset_dir(self) -> Path:
        return self.input_dir / SAMPLE_DATASET

    @property
    def log_path(self) -> Path:
        return self.base_dir / "comfyui.log"

    # ---- lifecycle -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Lay out the base directory (idempotent)."""
        from scripts.make_sample_dataset import make_sample_dataset

        for folder in (self.input_dir, self.output_dir, self.user_dir, self.temp_dir, self.base_dir / "custom_nodes"):
            folder.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        if not _pack_installed_in(self.base_dir / "custom_nodes"):  # twice would clash on every node id
            _link(self.base_dir / "custom_nodes" / PACK_NAME, ROOT)
        for name, path in self.checkpoints.items():
            _link(self.checkpoints_dir / name, path)
        make_sample_dataset(self.dataset_dir)

    def command(self) -> list[str]:
        device = ["--cpu"] if self.cpu else []
        return [sys.executable, "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base_dir), *self.extra_args]

    def start(self, timeout: float = 180) -> ComfyServer:
        if not (self.comfy_dir / "main.py").is_file():
            raise ComfyError(f"ComfyUI not found at {self.comfy_dir}: run scripts/setup.sh (or set COMFYUI_DIR)")
        self.prepare()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command(), cwd=self.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self._object_info = self.get_json("/object_info", timeout=30)
                return
            except (OSError, ComfyError):
                time.sleep(0.5)
        raise ComfyError(f"ComfyUI did not answer /object_info within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float = 15) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `grace` seconds."""
        # the Train node starts its trainer in a session of its own: note the descendants before they are orphaned
        descendants = self.child_processes()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        elif process is not None:
            self._signal_group(process.pid, signal.SIGKILL)  # children it may have left behind
        for child in descendants:
            self._kill_leftover(child)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _kill_leftover(child: psutil.Process) -> None:
        try:
            if child.is_running():
                child.kill()
        except psutil.Error:
            pass

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> ComfyServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def child_processes(self) -> list[psutil.Process]:
        """Every live descendant of the server process (trainer launches, their workers, ...)."""
        if not self.running:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]

    def wait_no_children(self, timeout: float = 30) -> list[psutil.Process]:
        """Wait until the server has no child processes; returns those still alive at the timeout."""
        deadline = time.monotonic() + timeout
        children = self.child_processes()
        while children and time.monotonic() < deadline:
            time.sleep(0.2)
            children = self.child_processes()
        return children

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ---- HTTP ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """JSON in, JSON out; an HTTP error becomes ComfyError with the decoded body as details."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                details = json.loads(raw)
            except ValueError:
                details = raw.decode(errors="replace")
            raise ComfyError(f"{method} {path}: HTTP {error.code}", details) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post_json(self, path: str, body: Any = None, timeout: float = 30) -> Any:
        return self.request("POST", path, body if body is not None else {}, timeout=timeout)

    def object_info(self, node: str | None = None, refresh: bool = False) -> dict:
        """All node definitions (cached after the first call unless refresh), or one node's definition."""
        if node is not None:
            return self.get_json(f"/object_info/{urllib.parse.quote(node)}")[node]
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info", timeout=60)
        return self._object_info

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format prompt; a validation failure raises ComfyError with the node errors."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        try:
            answer = self.post_json("/prompt", body)
        except ComfyError as error:
            raise ComfyError(f"prompt refused: {describe_prompt_error(error.details)}", error.details) from None
        return answer["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get_json(f"/history/{prompt_id}" if prompt_id else "/history")

    def queue(self) -> dict:
        return self.get_json("/queue")

    def wait(self, prompt_id: str, timeout: float = 600, check: bool = True, poll: float = 0.25) -> dict:
        """The history entry of a finished prompt; with check, a failed or interrupted one raises ComfyError."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry and "status" in entry:  # history gets an entry only when the prompt has ended
                break
            if not self.running:
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(poll)
        if check and entry["status"].get("status_str") != "success":
            raise ComfyError(f"prompt {prompt_id} failed: {describe_history_error(entry)}", entry)
        return entry

    def run(self, prompt: dict, timeout: float = 600, check: bool = True) -> dict:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(prompt), timeout=timeout, check=check)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self) -> None:
        """Ask ComfyUI to unload its models (between tests that load different ones)."""
        self.post_json("/free", {"unload_models": True, "free_memory": True})

    def clear_history(self) -> None:
        self.post_json("/history", {"clear": True})

    @contextmanager
    def listen(self, client_id: str | None = None) -> Iterator[WsRecorder]:
        """Record this client's websocket messages while the block runs (post prompts with its client_id)."""
        recorder = WsRecorder(self.url, client_id or uuid.uuid4().hex)
        recorder.start()
        try:
            yield recorder
        finally:
            recorder.stop()


def describe_prompt_error(details: Any) -> str:
    """The /prompt 400 answer as text: the error, then one line per failing node input."""
    if not isinstance(details, dict):
        return str(details)
    error = details.get("error") or {}
    lines = [f"{error.get('message', '')} {error.get('details', '')}".strip()]
    for node_id, node in (details.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            lines.append(f"node {node_id} ({node.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "\n".join(line for line in lines if line)


def describe_history_error(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')}"
    return json.dumps(entry.get("status"))


def ws_url(http_url: str, client_id: str) -> str:
    scheme, rest = http_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={client_id}"


def decode_binary(data: bytes) -> dict:
    """A binary websocket frame: 4-byte event type, then (for progress text) node id and text."""
    event = int.from_bytes(data[:4], "big")
    if event == 3:  # BinaryEventTypes.TEXT: 4-byte node id length, node id, utf-8 text
        size = int.from_bytes(data[4:8], "big")
        return {"type": "progress_text", "data": {"node": data[8 : 8 + size].decode(),
                                                  "text": data[8 + size :].decode(errors="replace")}}
    return {"type": "binary", "data": {"event": event, "bytes": len(data) - 4}}


class WsRecorder:
    """Collects /ws messages on a background thread (aiohttp in its own event loop)."""

    def __init__(self, http_url: str, client_id: str):
        self.url = ws_url(http_url, client_id)
        self.client_id = client_id
        self.messages: list[dict] = []
        self._lock = threading.Condition()
        self._connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._error: BaseException | None = None

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._connected.wait(timeout) or self._error:
            raise ComfyError(f"websocket {self.url} did not connect: {self._error}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed on its own (the server went away)
                pass
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as error:  # noqa: BLE001 - reported to start() or left in self._error
            self._error = error
            self._connected.set()

    async def _listen(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, max_msg_size=0) as ws:
            self._connected.set()
            stop = asyncio.ensure_future(self._stopping.wait())
            while not stop.done():
                receive = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    break
                msg = receive.result()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._add(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._add(decode_binary(msg.data))
                else:
                    break
            stop.cancel()

    def _add(self, message: dict) -> None:
        with self._lock:
            self.messages.append(message)
            self._lock.notify_all()

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        """Messages of one type (optionally of one prompt), in arrival order, as their data dicts."""
        with self._lock:
            found = [m["data"] for m in self.messages if m.get("type") == kind]
        if prompt_id is not None:
            found = [d for d in found if d.get("prompt_id") in (None, prompt_id)]
        return found

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60) -> dict:
        """The first message (whole: type and data) that satisfies predicate, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._lock:
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise ComfyError(f"no matching websocket message within {timeout:.0f}s")
                self._lock.wait(min(left, 0.5))

    def wait_done(self, prompt_id: str, timeout: float = 600) -> dict:
        """The message that ends a prompt: execution_success, execution_error or execution_interrupted."""
        ends = ("execution_success", "execution_error", "execution_interrupted")
        return self.wait_for(lambda m: m.get("type") in ends and m.get("data", {}).get("prompt_id") == prompt_id,
                             timeout)
