"""Capturing everything prepare may change, to assert exact equality before/after."""

from __future__ import annotations

from typing import Any

from torch import nn

from kbitprep._anatomy import model_configs
from kbitprep._tensors import storage_digest
from kbitprep.testing import model_state

__all__ = ["config_snapshot", "model_state", "tensor_digests"]


def tensor_digests(model: nn.Module, names: set[str] | frozenset[str]) -> dict[str, str]:
    """Digest of each named parameter or buffer."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return {n: storage_digest(tensors[n]) for n in sorted(names)}


def config_snapshot(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """``(class name, to_dict())`` of every config object of the model, nested sub-configs included."""
    return [(type(c).__name__, c.to_dict()) for c in model_configs(model)]
