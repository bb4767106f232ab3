"""``python -m kbitprep``: the same as the ``kbitprep`` command (see :mod:`kbitprep.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
