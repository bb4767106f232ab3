"""toyquant: a tiny int8 weight-only quantization library (the layer class PEFT does not know).

``toyquant.quantize(model)`` swaps every ``nn.Linear`` except ``lm_head`` for a
:class:`ToyInt8Linear` (int8 weight and per-row scale, both buffers). The class is defined in
``toyquant.layers`` and re-exported here, so its public path, ``toyquant.ToyInt8Linear``, is not
the path of its module.
"""

from __future__ import annotations

from .layers import ToyInt8Linear, quantize

__all__ = ["ToyInt8Linear", "quantize"]
