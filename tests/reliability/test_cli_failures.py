"""``python -m kbitprep backends`` lists the broken plugins, in a real subprocess that sees them on PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kbitprep import Registry

from .support import recorded_warnings
from .test_broken_plugins import FAULTS


def _run(sites: list[Path], *args: str, strict: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KBITPREP_STRICT"}
    env["PYTHONPATH"] = os.pathsep.join([*(str(s) for s in sites), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if strict:
        env["KBITPREP_STRICT"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "kbitprep", "backends", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_backends_command_lists_every_broken_plugin(broken_sites: dict[str, Path]) -> None:
    done = _run(list(broken_sites.values()), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    failures = {f["distribution"]: f for f in data["failures"]}
    registered = {b["name"]: b for b in data["backends"]}
    for fault in FAULTS:
        if fault.stage in ("load", "contract", "conflict"):  # found while loading: listed as failures
            failure = failures[fault.dist]
            assert failure["stage"] == fault.stage
            assert all(part in failure["reason"] for part in fault.reason), failure
            assert [f["distribution"] for f in data["failures"]].count(fault.dist) == 1
        else:  # loads fine; fails only on the models it misjudges, so it is listed as a backend
            assert registered[fault.dist]["distribution"] == fault.dist
    assert registered["unquantized"]["distribution"] == "kbitprep"  # the clash did not replace it
    assert registered["broken-fixup"]["distribution"] == "broken-fixup"


def test_backends_command_in_strict_mode_names_the_broken_plugin(broken_sites: dict[str, Path]) -> None:
    done = _run([broken_sites["broken-import"]], strict=True)
    assert done.returncode == 1
    assert done.stderr.startswith("kbitprep: error: kbitprep plugin ")
    assert "(strict mode)" in done.stderr and "failed at load" in done.stderr
    with recorded_warnings():
        builtin_failures = Registry(strict=False).failures()
    if not builtin_failures:  # with every built-in loading, the first failure is ours
        assert "broken-import (from broken-import) failed at load: ModuleNotFoundError" in done.stderr
