"""An object that looks like a backend at a glance but misses most of the contract."""

from __future__ import annotations


class NotABackend:
    """No name, a string priority, ``requires`` as a bare string, and no ``declare()``."""

    name = ""
    priority = "high"
    requires = "torch"

    def detect(self, model: object) -> None:
        return None
