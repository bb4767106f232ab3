"""A backend whose detector trips over models it does not expect."""

from __future__ import annotations

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection


class DetectRaisesBackend(Backend):
    """``detect()`` raises KeyError, as code reading a config key that is not there does."""

    name = "broken-detect-raises"
    priority = 500

    def detect(self, model: nn.Module) -> Detection | None:
        config: dict[str, object] = {}
        return Detection(evidence=(str(config["kbitprep_broken_quant_bits"]),))  # the fault: KeyError

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return Declarations()
