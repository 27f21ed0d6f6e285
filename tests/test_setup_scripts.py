"""The README's commands: scripts/setup.sh with a user's own ComfyUI, and scripts/test.sh narrowed to a file."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import zipfile
from pathlib import Path

from conftest import ROOT

PROBE = "lora_foundry_setup_probe"


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so pip installs it without building anything or asking the index."""
    wheel = folder / f"{PROBE}-0.1-py3-none-any.whl"
    info = f"{PROBE}-0.1.dist-info"
    files = {
        f"{PROBE}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join(record + [f"{info}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_setup_installs_the_requirements_of_the_users_comfyui(tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    wheel = probe_wheel(tmp_path)
    # a torch pin no index has: installing it would fail, so passing proves the torch lines are left out
    (comfy / "requirements.txt").write_text(f"torch==0.0.1\ntorchvision\n{wheel}\n")
    python = ROOT / ".venv" / "bin" / "python"
    try:
        result = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=dict(os.environ, COMFYUI_DIR=str(comfy)),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"installing the requirements of {comfy}" in result.stdout
        check = subprocess.run([python, "-c", f"import {PROBE}; print({PROBE}.VALUE)"], capture_output=True,
                               text=True)
        assert check.stdout.strip() == "42", check.stderr
        assert (comfy / "custom_nodes" / "lora-foundry").resolve() == ROOT
        again = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=dict(os.environ, COMFYUI_DIR=str(comfy)),
                               capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "installing the requirements" not in again.stdout  # done once
    finally:
        subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", PROBE], capture_output=True)


def test_test_script_runs_only_the_named_file() -> None:
    result = subprocess.run(["bash", "scripts/test.sh", "tests/test_faults.py", "--collect-only"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = [line for line in result.stdout.splitlines() if "::" in line]  # ids relative to tests/
    assert collected and all(line.startswith("test_faults.py::") for line in collected), collected


def server_side_selection() -> str:
    """The marker expression scripts/test.sh runs on the second ComfyUI."""
    (expression,) = re.findall(r'^SERVER_SIDE="(.+)"$', (ROOT / "scripts" / "test.sh").read_text(), re.MULTILINE)
    return expression


def collected(result: subprocess.CompletedProcess) -> set[str]:
    return {Path(line.split("::")[0]).name for line in result.stdout.splitlines() if "::" in line}


def test_the_second_comfyui_reruns_every_server_test_and_only_those() -> None:
    result = subprocess.run([ROOT / ".venv" / "bin" / "python", "-m", "pytest", "-q", "--collect-only", "tests",
                             "-m", server_side_selection()], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    files = collected(result)
    assert {"test_e2e_train.py", "test_workflows.py", "test_security.py",
            "test_server_memory.py", "test_browser.py", "test_sdxl_checkpoint.py"} <= files
    assert not files & {"test_config.py", "test_trainer.py", "test_node_schemas.py"}
    assert "test_train_and_validate_runs_and_shows_progress" not in result.stdout  # the browser's slow runs
    # the long runs whose outcome is the trainer's, marked first_comfyui_only
    assert "test_e2e_cancel_phases.py" not in files
    assert "test_the_demo_trains_and_its_compare_grid_shows_the_loras_effect" not in result.stdout
    assert "test_interrupt_stops_the_trainer_and_keeps_the_checkpoint" in result.stdout


def test_without_the_archive_the_server_tests_skip_saying_why(tmp_path: Path) -> None:
    setup = subprocess.run(["bash", "scripts/setup_comfyui.sh", "9.9.9"], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, LORA_FOUNDRY_VENDOR=str(tmp_path)), timeout=60)
    assert setup.returncode == 3, setup.stderr
    assert f"comfyui-9.9.9.tar.gz is in none of {tmp_path}" in setup.stderr, setup.stderr
    reason = "ComfyUI 9.9.9: its source archive is not here"
    result = subprocess.run([ROOT / ".venv" / "bin" / "python", "-m", "pytest", "-q", "-rs",
                             "tests/test_node_defaults.py", "-m", server_side_selection()], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, LORA_FOUNDRY_COMFYUI_ABSENT=reason))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b2 skipped\b", result.stdout) and "passed" not in result.stdout, result.stdout[-2000:]
    assert reason in result.stdout
