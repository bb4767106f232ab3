"""A minimal int8 weight-only linear layer (the "quantization library" the broken backend serves)."""

from __future__ import annotations

import torch
from torch import nn


class FaultyQuantLinear(nn.Module):
    """int8 weight (a frozen Parameter) and an fp16 per-output-row scale (a buffer).

    Attributes:
        fault: how the backend's fix-up ends: ``"raise"``, ``"interrupt"`` or ``"none"``.
    """

    def __init__(self, in_features: int, out_features: int, fault: str = "raise") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fault = fault
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fault: str = "raise") -> FaultyQuantLinear:
        """Quantize a float ``nn.Linear`` (symmetric int8, one scale per output row; bias dropped)."""
        layer = cls(linear.in_features, linear.out_features, fault)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        layer.weight.data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.scale = scale.to(torch.float16)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return torch.nn.functional.linear(x, w)
