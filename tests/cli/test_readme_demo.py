"""The README shows what `kbitprep demo` really prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_demo_output_is_what_the_demo_prints() -> None:
    shown = re.search(r"What `kbitprep demo` prints.*?```text\n(.*?)\n```", README.read_text(), re.S)
    assert shown, "README lost its demo output block"
    out = subprocess.run(
        [sys.executable, "-m", "kbitprep", "demo"], capture_output=True, text=True, timeout=600, env=None
    )
    assert out.returncode == 0, out.stderr[-2000:]
    expected, actual = shown.group(1).splitlines(), out.stdout.rstrip("\n").splitlines()
    assert actual[-1].startswith("done in ") and expected[-1].startswith("done in ")
    assert actual[:-1] == expected[:-1]  # everything but the timings
