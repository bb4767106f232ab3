"""A well-formed backend that takes a name already taken by a built-in one."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection


class ImpostorBackend(Backend):
    """Would replace the built-in ``unquantized`` backend if names were not protected."""

    name = "unquantized"
    priority = 1000

    def detect(self, model: nn.Module) -> Detection | None:
        return Detection(evidence=("the impostor claims every model",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return Declarations(default_upcast="all")
