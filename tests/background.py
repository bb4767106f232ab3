"""Child processes that start as soon as collection ends and run beside the rest of the suite.

A few tests run a long child process (the ``plan --config`` sweep over every model type, the quick
benchmark). Most of the suite keeps one core busy, so on a 2-core machine such a child finishes on the
other core while the suite goes on; its test only waits for what is left. A test module declares its
children in ``BACKGROUND``: ``{fixture name: Child(...)}``. ``tests/conftest.py`` starts every child
whose fixture a selected test uses; the fixture calls :func:`finished` to wait for it. Output goes to
temporary files, not pipes, so a chatty child never blocks on a full pipe. Each child runs with one
intra-op thread (``OMP_NUM_THREADS=1``) so that it takes one core, not both.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Child:
    """A command to run in the background from the repository root.

    Attributes:
        argv: the command (``sys.executable`` first for a Python child).
        timeout: seconds the test waits for it at most, counted from its start.
    """

    argv: list[str]
    timeout: float = 900.0
    _out_dir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _files: tuple[IO[bytes], IO[bytes]] | None = None
    _started: float = 0.0

    @property
    def out_dir(self) -> Path:
        """A fresh directory the command may write into; ``{out}`` in ``argv`` stands for it."""
        if self._out_dir is None:
            self._out_dir = Path(tempfile.mkdtemp(prefix="kbitprep-bg-"))
        return self._out_dir

    def start(self) -> None:
        """Start the command unless it runs already."""
        if self._proc is not None:
            return
        out = tempfile.TemporaryFile()  # noqa: SIM115  (closed when the child is waited for or stopped)
        err = tempfile.TemporaryFile()  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        argv = [a.replace("{out}", str(self.out_dir)) for a in self.argv]
        self._proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, env=env)
        self._files = (out, err)
        self._started = time.monotonic()

    def finished(self) -> subprocess.CompletedProcess[str]:
        """Wait for the command (starting it now if nobody did) and return its outcome."""
        self.start()
        assert self._proc is not None
        if self._files is None:
            raise RuntimeError(f"{self.argv} was waited for already")
        left = max(1.0, self.timeout - (time.monotonic() - self._started))
        try:
            code = self._proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise
        texts = []
        for f in self._files:
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
            f.close()
        self._files = None
        return subprocess.CompletedProcess(self._proc.args, code, texts[0], texts[1])

    def stop(self) -> None:
        """Kill the command if it still runs (the session ended before its test waited for it)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for f in self._files or ():
            f.close()
        self._files = None
