"""Layers shared by the two random-tree builders (:mod:`.random_models` and :mod:`.random_trees`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

#: the float layer kinds :func:`float_layer` builds
FLOAT_KINDS = ("linear", "embedding", "layernorm", "rmsnorm", "scaler")


@dataclass(frozen=True)
class Leaf:
    """One layer: its kind, dtype, width, whether it has a bias, and whether it starts frozen."""

    kind: str
    dtype: str
    width: int
    bias: bool
    frozen: bool


class Scaler(nn.Module):
    """A layer with a float ``gain`` Parameter and a float32 ``offset`` buffer (another dtype)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width, dtype=dtype))
        self.register_buffer("offset", torch.randn(width, dtype=torch.float32))


class Block(nn.Module):
    """A custom container with a bf16 buffer, an int64 buffer and a non-persistent fp16 buffer (named ``SCRATCH``)."""

    SCRATCH: ClassVar[str] = "scratch"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.randn(4, dtype=torch.bfloat16))
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.register_buffer(self.SCRATCH, torch.randn(2, dtype=torch.float16), persistent=False)


def float_layer(kind: str, width: int, dtype: torch.dtype, bias: bool) -> nn.Module:
    """A fresh float layer of ``kind`` (``linear``, ``embedding``, ``layernorm``, ``rmsnorm`` or ``scaler``)."""
    if kind == "linear":
        return nn.Linear(width, width, bias=bias, dtype=dtype)
    if kind == "embedding":
        return nn.Embedding(width, width, dtype=dtype)
    if kind == "layernorm":
        return nn.LayerNorm(width, bias=bias, dtype=dtype)
    if kind == "rmsnorm":
        return nn.RMSNorm(width, dtype=dtype)
    if kind == "scaler":
        return Scaler(width, dtype)
    raise ValueError(kind)


def attach(container: nn.Module, child: nn.Module, key: str) -> None:
    """Put ``child`` into ``container`` under ``key`` (appended to a ``ModuleList``, which takes no names)."""
    if isinstance(container, nn.ModuleList):
        container.append(child)
    elif isinstance(container, nn.ModuleDict):
        container[key] = child
    else:  # Sequential and the custom containers take named children
        container.add_module(key, child)
