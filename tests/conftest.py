"""Shared fixtures: the tiny model, drawn training images, and a launcher for the real trainer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "trainer" / "run.py"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds or loads the SD1.5-shaped model (minutes)")


def comfyui_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or ROOT / ".runtime" / "ComfyUI")


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI the suite runs against (its comfyui_version.py), e.g. (0, 33, 0)."""
    text = (comfyui_dir() / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r'__version__\s*=\s*"([0-9.]+)"', text)
    if match is None:
        raise RuntimeError(f"no __version__ in {comfyui_dir() / 'comfyui_version.py'}")
    return tuple(int(part) for part in match.group(1).split("."))


def pytest_report_header(config: pytest.Config) -> str:
    absent = os.environ.get("LORA_FOUNDRY_COMFYUI_ABSENT")
    if absent:
        return f"server-side tests skip: {absent}"
    try:
        version = ".".join(map(str, comfyui_version()))
    except (OSError, RuntimeError) as error:
        version = f"unknown ({error})"
    return f"ComfyUI {version} at {comfyui_dir()}, python {sys.executable}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts the session's server carries the comfy_server marker (what `-m` selects by)."""
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy_server)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    absent = os.environ.get("LORA_FOUNDRY_COMFYUI_ABSENT")
    if absent:
        pytest.skip(absent)
    path = comfyui_dir()
    if not (path / "main.py").is_file():
        pytest.fail(f"ComfyUI not found at {path}: run scripts/setup.sh (or set COMFYUI_DIR)")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(comfy_dir: Path) -> Path:
    return comfy_dir / "comfy" / "sd1_tokenizer"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tiny_model import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    """The tiny FLUX.1 dev as ComfyUI users keep it (separate files), and the config's model section for it."""
    return tiny_flux_model(tmp_path_factory.mktemp("tiny-flux-dev"), tokenizer_dir, guidance=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    return tiny_flux_model(tmp_path_factory.mktemp("tiny-flux-schnell"), tokenizer_dir, guidance=False)


def tiny_flux_model(folder: Path, tokenizer_dir: Path, guidance: bool) -> dict[str, Any]:
    from tiny_model import save_tiny_flux_files

    files = save_tiny_flux_files(folder, guidance)
    # the text encoders in the order T5, CLIP-L: the trainer tells them apart by their weights
    model = {"path": str(files["transformer"]), "text_encoders": [str(files["t5"]), str(files["clip_l"])],
             "vae": str(files["vae"]), "tokenizer_dir": str(tokenizer_dir)}
    return {"files": files, "model": model}


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Any]:
    """The tiny Z-Image as ComfyUI users keep it (separate files), and the config's model section for it."""
    from tiny_model import save_tiny_zimage_files

    files = save_tiny_zimage_files(tmp_path_factory.mktemp("tiny-zimage"))
    model = {"path": str(files["transformer"]), "text_encoders": [str(files["qwen3"])], "vae": str(files["vae"]),
             "tokenizer_dir": str(tokenizer_dir)}
    return {"files": files, "model": model}


def draw_image(path: Path, size: tuple[int, int], color: tuple[int, int, int], shape: str = "circle") -> Path:
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    image.save(path)
    return path


@pytest.fixture
def two_image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    draw_image(folder / "red.png", (64, 64), (220, 30, 30), "circle")
    (folder / "red.txt").write_text("a red circle")
    draw_image(folder / "blue.png", (64, 64), (30, 30, 220), "square")
    (folder / "blue.txt").write_text("a blue square")
    return folder


def tiny_config(run_dir: Path, model_dir: Path, data_folder: Path, **sections: dict[str, Any]) -> dict:
    """A run config for the tiny model on the CPU; `sections` update the defaults per section."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {"path": str(model_dir)},
        "data": {"folder": str(data_folder), "resolution": 64, "random_flip": False},
        "lora": {"rank": 4, "alpha": 4.0},
        "train": {
            "batch_size": 2,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "mixed_precision": "no",
            "device": "cpu",
            "seed": 7,
        },
        "output": {"lora_path": str(run_dir / "out" / "lora.safetensors")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(cfg: dict) -> Path:
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def launch_args(config_path: Path, num_processes: int = 1) -> list[str]:
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
    if num_processes > 1:
        # on the CPU only --multi_gpu makes accelerate start several processes (they join one gloo group
        # because the trainer builds Accelerator(cpu=True))
        args += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        args += ["--num_processes", "1", "--mixed_precision", "no"]
    return args + [str(RUN_PY), "--config", str(config_path)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(num_processes: int = 1) -> dict[str, str]:
    """A fixed thread count: CPU results are bit-for-bit repeatable only at the same one."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1" if num_processes > 1 else "2")


def run_trainer(cfg: dict, num_processes: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    config_path = write_config(cfg)
    return subprocess.run(
        launch_args(config_path, num_processes),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=trainer_env(num_processes),
    )


def read_events(run_dir: Path) -> list[dict]:
    """The events of RUN_DIR/events.jsonl, read as the pack reads them (trainer.events.read_events)."""
    from trainer.events import read_events as read_event_file

    return read_event_file(Path(run_dir) / "events.jsonl")


def kill_after_checkpoint(cfg: dict, step: int, timeout: float = 300) -> None:
    """Launch the run of `cfg` and SIGKILL its whole process group once it has passed the checkpoint event
    and reached step `step` (a kill -9 mid-run: no stop handling, no final save)."""
    import signal
    import time

    proc = subprocess.Popen(launch_args(write_config(cfg)), start_new_session=True, env=trainer_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events_path = Path(cfg["run_dir"]) / "events.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        text = events_path.read_text() if events_path.exists() else ""
        if '"type": "checkpoint", "time"' in text and f'"step": {step}' in text:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_group_exit(proc.pid)


def wait_for_group_exit(pgid: int, timeout: float = 60) -> None:
    """Wait until every process of a process group has exited (the launcher can go before its children)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"process group {pgid} still alive after {timeout} s")


# ---- one real ComfyUI server for the session (tests/comfy_server.py) ------------------------------------

RANDOM_CHECKPOINT_NAME = "sd15-random-fp16.safetensors"
_configure_before_comfy_server = pytest_configure


def pytest_configure(config: pytest.Config) -> None:  # noqa: F811 - extends the hook above with one marker
    _configure_before_comfy_server(config)
    config.addinivalue_line("markers", "comfy_server: uses the session's real ComfyUI server (comfy_server fixture)")
    config.addinivalue_line("markers", "browser: drives the real ComfyUI frontend in headless Chromium")
    config.addinivalue_line("markers", "comfy_code: runs ComfyUI's own loaders in a probe subprocess")
    config.addinivalue_line("markers", "first_comfyui_only: a long run on the server whose outcome does not depend "
                            "on ComfyUI's version beyond what the other server tests check there; "
                            "scripts/test.sh runs it on the default ComfyUI only")


_STARTED_SERVERS: list = []  # the session's server once started, so a module can pause it (whole_machine)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, comfy_dir: Path):
    """A started ComfyUI (--cpu) serving the pack from an isolated base directory, for the whole session.

    server.url, .object_info(), .post_prompt(), .wait(), .run(), .interrupt(), .listen() (websocket messages),
    .child_processes(); paths: .base_dir, .loras_dir, .output_dir, .input_dir, .dataset_dir (the sample set,
    'lora-foundry-sample'), .checkpoints_dir, .log_path; .checkpoint_name is the random SD1.5 checkpoint's name.
    """
    absent = os.environ.get("LORA_FOUNDRY_COMFYUI_ABSENT")
    if absent:
        pytest.skip(absent)
    from scripts.comfy_server import ComfyServer
    from scripts.make_random_sd15 import ensure_random_sd15

    checkpoint = ensure_random_sd15()
    server = ComfyServer(tmp_path_factory.mktemp("comfy-base"), checkpoints={RANDOM_CHECKPOINT_NAME: checkpoint},
                         comfy_dir=comfy_dir)
    with server:
        _STARTED_SERVERS.append(server)
        yield server


@pytest.fixture(scope="module")
def whole_machine():
    """For a module that needs most of this machine's memory (a full-size SDXL model in two processes, one after
    the other): the session's ComfyUI server, if it was started, is stopped for the module and started again
    after it, so an SD 1.5 model it holds does not sit beside them."""
    paused = [server for server in _STARTED_SERVERS if server.running]
    for server in paused:
        server.stop()
    yield
    for server in paused:
        server.start()
