"""``python -m kbitprep``: the same as the ``kbitprep`` command (see :mod:`kbitprep.app.cli`)."""

from __future__ import annotations

from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
