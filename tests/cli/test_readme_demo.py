"""The README shows what `kbitprep demo` really prints, on CPUs with and without AVX512-BF16.

The README's block is this machine kind's output. Its two ``fix-up`` lines (the ``bnb-cpu-unpack``
fix-up, in the plan and in the report) appear only where ``bitsandbytes.functional.has_avx512bf16()``
is True, as the README says; everywhere else the demo prints the block without exactly those lines.
The first test checks the real CPU. The second runs the demo as on a CPU without the flag (bitsandbytes'
``Linear4bit`` is told the CPU lacks it, which is all that differs there), so one machine with the flag
checks both variants of the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FIXUP = "fix-up         : bnb-cpu-unpack"

#: Imported first in the child (``sitecustomize``): once ``bitsandbytes.nn.modules`` is imported, its
#: ``has_avx512bf16`` answers False, so every ``Linear4bit`` is built as on a CPU without AVX512-BF16.
_NO_AVX512_BF16 = """
import importlib.abc, importlib.machinery, sys

class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.nn.modules":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Patch())
"""


def _has_avx512bf16() -> bool:
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bool(bnb.has_avx512bf16())


def _readme_block() -> list[str]:
    shown = re.search(r"What `kbitprep demo` prints(.*?)```text\n(.*?)\n```", README.read_text(), re.S)
    assert shown, "README lost its demo output block"
    intro, block = " ".join(shown.group(1).split()), shown.group(2).splitlines()
    fixups = [line for line in block if line.startswith(FIXUP)]
    assert len(fixups) == 2, "the block shows the fix-up in the plan and in the report"
    assert "The two `fix-up` lines appear on CPUs with AVX512-BF16" in intro, "the README says where they appear"
    return block


def _demo(env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "kbitprep", "demo"], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rstrip("\n").splitlines()


def _assert_same(expected: list[str], actual: list[str]) -> None:
    assert actual[-1].startswith("done in ") and expected[-1].startswith("done in ")
    assert actual[:-1] == expected[:-1]  # everything but the timings


def test_readme_demo_output_is_what_the_demo_prints() -> None:
    block = _readme_block()
    expected = block if _has_avx512bf16() else [line for line in block if not line.startswith(FIXUP)]
    _assert_same(expected, _demo())


@pytest.mark.slow
def test_readme_demo_output_on_a_cpu_without_avx512_bf16(tmp_path: Path) -> None:
    if not _has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the test above already checked the README without the fix-up lines")
    (tmp_path / "sitecustomize.py").write_text(_NO_AVX512_BF16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    block = _readme_block()
    _assert_same([line for line in block if not line.startswith(FIXUP)], _demo(env))
