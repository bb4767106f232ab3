"""A backend whose detector returns a plain dict (an older, informal protocol)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kbitprep.plugin import Backend, Declarations, Detection


class DetectAnswerBackend(Backend):
    """``detect()`` returns ``{"quantized": True}`` for every model: not a Detection, not None."""

    name = "broken-detect-answer"
    priority = 500

    def detect(self, model: nn.Module) -> Any:
        return {"quantized": True, "bits": 4}

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        return Declarations()
