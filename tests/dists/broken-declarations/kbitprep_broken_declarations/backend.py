"""A backend that recognises every model and then declares rules that cannot all hold."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, CheckpointMode, Declarations, Detection


class ContradictoryBackend(Backend):
    """Forbids upcasting yet defaults to upcasting everything; supports no checkpointing mode yet
    defaults to reentrant checkpointing; untrainable without a reason."""

    name = "broken-declarations"
    priority = 500

    def detect(self, model: nn.Module) -> Detection | None:
        return Detection(evidence=("claims every model",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return Declarations(
            allow_upcast=False,
            default_upcast="all",
            checkpointing=frozenset(),
            default_checkpointing=CheckpointMode.REENTRANT,
            trainable=False,
        )
