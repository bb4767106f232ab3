"""The documentation names real things: exceptions, backends, matrix rows, tests, API names, numbers.

``tests/test_quality.py::test_docs_build_strict`` builds the site (broken links, anchors, snippet
includes and cross-references fail it); these tests check what a build cannot: that what the pages
say matches the code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import json
import re
from pathlib import Path

import pytest
import tomllib

import kbitprep
from kbitprep.testing import BackendContract

from .backends.registry_of_cases import all_cases

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages written by others (checked by their own tests).
NOT_HERE = {"cli.md", "benchmarks.md", "training.md"}
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.name not in NOT_HERE or p.parent != DOCS)
BENCH = ROOT.parent / "shared" / "bench"


def _text(name: str) -> str:
    return (DOCS / name).read_text()


def _builtin_entry_points() -> dict[str, str]:
    eps = md.entry_points(group=kbitprep.ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in eps if ep.dist is not None and ep.dist.name == "kbitprep"}


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_exception_and_warning_has_a_troubleshooting_entry() -> None:
    headings = set(re.findall(r"^### `(\w+)`$", _text("troubleshooting.md"), re.M))
    assert headings == set(kbitprep.errors.__all__)


def test_every_builtin_backend_has_a_page_with_its_class_priority_and_rows() -> None:
    eps = _builtin_entry_points()
    assert len(eps) >= 11
    registry = kbitprep.Registry(discover=True)
    rows: dict[str, list[str]] = {}
    for case in all_cases():
        rows.setdefault(case.backend, []).append(case.id)
    index = _text("backends/index.md")
    nav = (ROOT / "mkdocs.yml").read_text()
    for name, value in eps.items():
        page = _text(f"backends/{name}.md")
        assert f"backends/{name}.md" in nav
        assert f"`{value}`" in page, f"backends/{name}.md does not name {value}"
        if name in registry:  # the plugin loads here: its priority and requires must be the documented ones
            backend = registry.get(name).backend
            assert f"priority {backend.priority}" in page
            for module in backend.requires:
                assert f"`{module}`" in page
            assert f"| [`{name}`]({name}.md) | {backend.priority} |" in index
        for row in rows.get(name, []):
            assert f"`{row}`" in page and f"`{row}`" in index, f"matrix row {row} is not on backends/{name}.md"


def test_named_kbitprep_objects_exist() -> None:
    names: set[str] = set()
    for page in PAGES:
        names |= set(re.findall(r"\bkbitprep(?:\.[A-Za-z_]\w*)+", page.read_text()))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"the docs name objects that do not exist: {missing}"


def test_named_entry_point_values_and_tests_exist() -> None:
    text = "\n".join(p.read_text() for p in PAGES)
    for value in set(re.findall(r"`(kbitprep_plugins\.\w+:\w+)`", text)):
        module, attr = value.split(":")
        assert hasattr(importlib.import_module(module), attr), value
    for path, func in set(re.findall(r"(?<![\w/-])(tests/[\w/]+\.py)(?:::(\w+))?", text)):
        assert (ROOT / path).exists(), path
        if func:
            tree = ast.parse((ROOT / path).read_text())
            assert func in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, f"{path}::{func}"


def test_the_guide_lists_exactly_the_contract_checks() -> None:
    listed = re.findall(r"^\| `(test_\w+)` \|", _text("plugins.md"), re.M)
    assert listed == [n for n in vars(BackendContract) if n.startswith("test_")]


def test_install_commands_use_the_constraints_file_and_cover_every_extra() -> None:
    page = _text("getting-started.md")
    installs = [line for line in page.splitlines() if "pip install" in line and not line.startswith("#")]
    assert installs and all("-c constraints.txt" in line for line in installs)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in set(extras) - {"test", "docs", "dev"}:
        assert f"| `{extra}` |" in page, f"extra {extra!r} is not in the install table"
        if extra != "peft":
            assert f"-e '.[{extra}]'" in page, f"no install line for extra {extra!r}"


@pytest.mark.skipif(not BENCH.is_dir(), reason="shared/bench (the H200 measurements) is not beside the checkout")
def test_migration_numbers_are_the_measured_ones() -> None:
    page = _text("migrating.md")
    variants = json.loads((BENCH / "h200-peft-baseline.json").read_text())["variants"]
    for variant in variants.values():
        assert f"{variant['param_bytes_after'] / 1e9:.3f} GB" in page
        assert f"{variant['peak_train'] / 1e9:.3f} GB" in page
    peft, ours = variants["peft_default"], variants["no_upcast_reentrant"]
    assert f"{peft['param_bytes_after']:,}" in page and f"{peft['param_bytes_before']:,}" in page
    growth = round(100 * (peft["param_bytes_after"] / peft["param_bytes_before"] - 1))
    assert f"+{growth}%" in page
    assert f"{ours['peak_train'] / peft['peak_train']:.3f} \N{MULTIPLICATION SIGN}" in page
    runs = json.loads((BENCH / "h200-memory-modes.json").read_text())["runs"]
    for run in ("8b-peft_default", "8b-no_upcast_reentrant", "8b-no_upcast_reentrant_chunkedloss"):
        assert f"{runs[run]['peak_train'] / 1e9:.3f} GB" in page
