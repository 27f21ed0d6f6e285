"""Ready for the Comfy Registry: the metadata its CLI reads from pyproject.toml, and the publishing workflow.

Publishing itself needs GitHub and a registry token; it cannot run here. What can be checked is what the
registry reads: the [project] table, [project.urls], [tool.comfy], and the workflow that runs its action."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from the package index (requirements-dev.txt)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def test_pyproject_has_what_the_registry_reads() -> None:
    project, comfy = pyproject()["project"], pyproject()["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]), project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["description"] and (ROOT / project["license"]["file"]).is_file()
    urls = project["urls"]
    assert urls["Repository"].startswith("https://github.com/")
    assert urls["Bug Tracker"] == urls["Repository"] + "/issues"
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Foundry"
    assert comfy["requires-comfyui"] == ">=0.3.75"


def test_registry_installs_what_the_readme_installs() -> None:
    """The registry installs [project] dependencies; a manual install uses requirements.txt: the same list."""
    assert pyproject()["project"]["dependencies"] == requirement_lines(ROOT / "requirements.txt")
    # no torch pins: ComfyUI's torch is kept (torchao, a library on top of torch, declares no torch requirement)
    project = [re.split(r"[<>=!~;\[ ]", name)[0] for name in pyproject()["project"]["dependencies"]]
    assert not {"torch", "torchvision", "torchaudio"} & set(project)


def test_publishing_workflow_runs_the_registry_action_on_a_version_change() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8"))
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["paths"] == ["pyproject.toml"] and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["publish-node"]["steps"]
    action = next(step for step in steps if step.get("uses", "").startswith("Comfy-Org/publish-node-action@"))
    assert action["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
