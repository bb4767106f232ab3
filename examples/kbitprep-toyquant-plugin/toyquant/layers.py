"""toyquant's one layer: an int8 linear layer with a per-row scale, and the function that swaps it in."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ToyInt8Linear", "quantize"]


class ToyInt8Linear(nn.Module):
    """A linear layer whose weight is stored as int8 with one float scale per output row.

    Both live in *buffers* (``qweight``: int8, ``out x in``; ``scale``: the float dtype of the layer
    it replaced, ``out``); there is no float ``weight``. The forward dequantizes on the fly:
    ``x @ (qweight * scale[:, None]).T + bias``, in the input's dtype. ``bias`` stays a float
    parameter.
    """

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> ToyInt8Linear:
        """Quantize ``linear`` (symmetric, per row: ``scale = max|w| / 127``) into a new layer."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        amax = w.float().abs().amax(dim=1)
        layer.scale.copy_((amax / 127).clamp(min=torch.finfo(w.dtype).tiny))
        layer.qweight.copy_(torch.round(w.float() / layer.scale.float()[:, None]).clamp(-127, 127))
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the layer computes with (``out x in``)."""
        dtype = dtype or self.scale.dtype
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ (qweight * scale).T + bias``, computed in ``x``'s dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`ToyInt8Linear`, in place; return ``model``.

    Layers whose own name (the last part of the qualified name) is in ``skip`` stay as they are.
    """
    skipped = set(skip)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name not in skipped:
                setattr(parent, child_name, ToyInt8Linear.from_linear(child))
    return model
