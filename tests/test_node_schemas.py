"""The nodes' schemas and execute methods agree, read from the source (no ComfyUI import needed).

With `execute(cls, **kw)` a misspelt input name is a KeyError when the node runs; with every input a named
parameter, a misspelt name is an undefined variable that ruff reports, and a missing one a TypeError ComfyUI
shows at once. These tests hold every pack node to that, and to ComfyUI's one-keyword-per-line schema style.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NODES_DIR = Path(__file__).resolve().parent.parent / "nodes"


def node_classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in sorted(NODES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                isinstance(item, ast.FunctionDef) and item.name == "define_schema" for item in node.body
            ):
                found.append((path.name, node))
    return found


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(item for item in cls.body if isinstance(item, ast.FunctionDef) and item.name == name)


def input_calls(schema: ast.FunctionDef) -> list[ast.Call]:
    """Every `<Type>.Input("name", ...)` call in define_schema."""
    return [call for call in ast.walk(schema) if isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute) and call.func.attr == "Input"]


def input_names(schema: ast.FunctionDef) -> list[str]:
    return [call.args[0].value for call in input_calls(schema)]


NODES = node_classes()


def test_every_node_of_the_pack_is_found() -> None:
    assert sorted(cls.name for _, cls in NODES) == [
        "LoraFoundryCompareGrid", "LoraFoundryDataset", "LoraFoundryLoadLora", "LoraFoundryLoraConfig",
        "LoraFoundryTrain"]


@pytest.mark.parametrize(("module", "cls"), NODES, ids=[cls.name for _, cls in NODES])
def test_execute_takes_each_input_as_a_named_parameter(module: str, cls: ast.ClassDef) -> None:
    execute = method(cls, "execute")
    assert execute.args.kwarg is None and execute.args.vararg is None, f"{cls.name}.execute takes **/*"
    parameters = [arg.arg for arg in execute.args.args[1:] + execute.args.kwonlyargs]
    assert sorted(parameters) == sorted(input_names(method(cls, "define_schema"))), cls.name


@pytest.mark.parametrize(("module", "cls"), NODES, ids=[cls.name for _, cls in NODES])
def test_schema_inputs_take_one_keyword_per_line(module: str, cls: ast.ClassDef) -> None:
    crowded = []
    for call in input_calls(method(cls, "define_schema")):
        lines = [call.args[0].lineno] + [keyword.value.lineno for keyword in call.keywords]
        if len(set(lines)) != len(lines):
            crowded.append(f"{module}:{call.lineno} {call.args[0].value}")
    assert not crowded, crowded
