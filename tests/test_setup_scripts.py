"""The README's commands: scripts/setup.sh with a user's own ComfyUI, and scripts/test.sh narrowed to a file."""

from __future__ import annotations

import base64
import hashlib
import os
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
