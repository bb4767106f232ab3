"""Project hygiene as tests: lint, types, doctests, docs build, and the README / CI commands."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import kbitprep

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev,docs]')"
    return found


def test_ruff_lint_and_format() -> None:
    out = _run(_tool("ruff"), "check", ".")
    assert out.returncode == 0, out.stdout[-4000:]
    out = _run(_tool("ruff"), "format", "--check", ".")
    assert out.returncode == 0, out.stdout[-4000:]


def test_mypy_strict_on_package_and_plugins() -> None:
    out = _run(_tool("mypy"))
    assert out.returncode == 0, out.stdout[-4000:]


def test_docstring_examples_run() -> None:
    failed = attempted = 0
    for info in pkgutil.walk_packages(kbitprep.__path__, "kbitprep."):
        mod = importlib.import_module(info.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        failed += res.failed
        attempted += res.attempted
    assert attempted >= 5 and failed == 0


def test_every_public_name_has_a_docstring() -> None:
    missing = [n for n in kbitprep.__all__ if not n.startswith("__") and not getattr(kbitprep, n).__doc__]
    assert not missing
    import kbitprep.plugin as plugin

    assert not [n for n in plugin.__all__ if not getattr(plugin, n).__doc__ and not n.isupper()]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_starts_with_the_two_commands_and_ci_calls_the_second() -> None:
    demo, tests = _readme_commands()
    assert demo.endswith("kbitprep demo") and "-c constraints.txt" in demo
    assert tests.endswith("python -m pytest") and "-c constraints.txt" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_constraints_pin_torch_to_the_cpu_build() -> None:
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"].startswith("5.24") and pins["peft"].startswith("0.21")


def test_docs_build_strict(tmp_path: Path) -> None:
    out = _run(_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
