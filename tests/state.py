"""Capturing everything prepare may change, to assert exact equality before/after."""

from __future__ import annotations

from typing import Any

from torch import nn

from kbitprep._tensors import storage_digest


def model_state(model: nn.Module) -> dict[str, Any]:
    """Dtypes, tensor types, value digests, requires_grad, hooks, checkpointing flags and use_cache."""
    params = {
        n: (p.dtype, type(p).__name__, type(p.data).__name__, p.requires_grad, storage_digest(p))
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    buffers = {
        n: (b.dtype, type(b).__name__, storage_digest(b)) for n, b in model.named_buffers(remove_duplicate=False)
    }
    hooks = {
        n: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_backward_pre_hooks", {})),
        )
        for n, m in model.named_modules()
    }
    flags = {
        n: (getattr(m, "gradient_checkpointing", None), "_gradient_checkpointing_func" in vars(m), m.training)
        for n, m in model.named_modules()
    }
    cfg = getattr(model, "config", None)
    return {
        "params": params,
        "buffers": buffers,
        "hooks": hooks,
        "flags": flags,
        "use_cache": getattr(cfg, "use_cache", None),
        "attrs": sorted(k for k in vars(model) if not k.startswith("_kbitprep")),
    }


def tensor_digests(model: nn.Module, names: set[str] | frozenset[str]) -> dict[str, str]:
    """Digest of each named parameter or buffer."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return {n: storage_digest(tensors[n]) for n in sorted(names)}
