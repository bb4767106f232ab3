"""Built-in plugins use only kbitprep's public plugin contract, like third-party plugins must."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
ALLOWED = {"kbitprep.plugin", "kbitprep.errors"}


def private_uses(source: str) -> list[str]:
    """Every way ``source`` reaches into kbitprep beyond ``kbitprep.plugin`` / ``kbitprep.errors``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kbitprep" and alias.name not in ALLOWED:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "kbitprep":
                continue
            if node.module not in ALLOWED:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [f"line {node.lineno}: private name {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("kbitprep._"):
            found.append(f"line {node.lineno}: string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "kbitprep":
                found.append(f"line {node.lineno}: kbitprep.{node.attr}")
    return found


PLUGIN_FILES = sorted(PLUGINS.glob("*.py"))


def test_there_are_plugins_to_check() -> None:
    assert {p.name for p in PLUGIN_FILES} >= {"unquantized.py", "bitsandbytes.py", "hf_fallback.py"}


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: p.name)
def test_plugin_imports_only_public_kbitprep(path: Path) -> None:
    assert private_uses(path.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "from kbitprep._planning import Plan",
        "from kbitprep import _api",
        "import kbitprep._registry",
        "from kbitprep.plugin import _class_matches",
        "from kbitprep import plan",
        "import kbitprep",
        "import importlib; importlib.import_module('kbitprep._mutation')",
        "import kbitprep.plugin as p; import kbitprep; kbitprep._api",
    ],
)
def test_checker_catches_private_imports(snippet: str) -> None:
    assert private_uses(snippet), snippet


def test_checker_accepts_the_public_contract() -> None:
    ok = (
        "from kbitprep.plugin import Backend, Declarations\n"
        "from kbitprep.errors import KbitprepWarning\n"
        "import kbitprep.plugin\n"
        "from . import unquantized\n"
        "import torch._C\n"
    )
    assert private_uses(ok) == []
