"""Real plugin distributions for the tests: pip-installed into a private target directory.

Each folder under ``tests/dists/`` is a small project with its own ``pyproject.toml`` that declares
``kbitprep.backends`` entry points. :func:`install` runs ``pip install --target`` on it once per
session (no network: ``--no-deps --no-build-isolation``); :func:`on_path` puts the resulting
site directory on ``sys.path`` so ``importlib.metadata`` finds its entry points, for a fresh
:class:`kbitprep.Registry` to discover.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

DISTS = Path(__file__).parent / "dists"
#: Example distributions shipped with the docs (``examples/<name>``); install with ``install(name, where=EXAMPLES)``.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_TARGET_ROOT = Path(tempfile.mkdtemp(prefix="kbitprep-dists-"))


@functools.cache
def install(name: str, where: Path = DISTS) -> Path:
    """pip-install ``<where>/<name>`` (by default ``tests/dists/<name>``) into its own target directory
    (once) and return that directory."""
    target = _TARGET_ROOT / where.name / name
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(where / name),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


@contextlib.contextmanager
def on_path(*sites: Path) -> Iterator[None]:
    """Make installed distributions visible to ``importlib.metadata`` and imports, then remove them."""
    saved = list(sys.path)
    before_modules = set(sys.modules)
    sys.path[:0] = [str(s) for s in sites]
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved
        for mod in set(sys.modules) - before_modules:
            if any(str(s) in str(getattr(sys.modules[mod], "__file__", "") or "") for s in sites):
                del sys.modules[mod]
        importlib.invalidate_caches()


def assert_contract_suite_passes(example: Path, env: dict[str, str], own_tests: int) -> None:
    """Run an example plugin's own tests (kbitprep's shipped contract suite plus ``own_tests`` of its
    own) with pytest in a subprocess, as its author would, and check every contract check ran and passed."""
    import re

    from kbitprep.testing import BackendContract

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    contract_checks = [n for n in dir(BackendContract) if n.startswith("test_")]
    assert passed and int(passed.group(1)) == len(contract_checks) + own_tests, summary
    assert "skipped" not in summary and "failed" not in summary, summary
