"""What every ``kbitprep`` command prints in ``--json`` mode: one object, the envelope first."""

from __future__ import annotations

import json
from typing import Any, TextIO

__all__ = ["emit_json"]


def emit_json(data: dict[str, Any], out: TextIO) -> None:
    """Write ``data`` as one JSON object: ``"command"`` and ``"kbitprep_version"`` first, then the rest."""
    from .. import __version__

    payload = {"command": data.pop("command"), "kbitprep_version": __version__, **data}
    out.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()
