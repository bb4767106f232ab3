"""A backend that recognises its models and then declares rules that cannot all hold."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, CheckpointMode, Declarations, Detection, quant_method

METHOD = "kbitprep-broken-declarations"


class ContradictoryBackend(Backend):
    """Claims models whose ``quantization_config`` names its method; then forbids upcasting yet
    defaults to upcasting everything, supports no checkpointing mode yet defaults to reentrant
    checkpointing, and is untrainable without a reason."""

    name = "broken-declarations"
    priority = 100

    def detect(self, model: nn.Module) -> Detection | None:
        if quant_method(model) != METHOD:
            return None
        return Detection(evidence=(f"quant_method {METHOD!r}",))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return Declarations(
            allow_upcast=False,
            default_upcast="all",
            checkpointing=frozenset(),
            default_checkpointing=CheckpointMode.REENTRANT,
            trainable=False,
        )
