"""Tensor facts the planner needs: real storage bytes (also for tensor subclasses), fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["iter_unique_parameters", "storage_digest", "tensor_nbytes"]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes the tensor's values occupy.

    For wrapper subclasses (torchao, quanto) that report a float dtype, the sizes of the inner
    tensors are summed (via ``__tensor_flatten__``), so an int8-quantized weight counts 1 byte an element.
    """
    data = t.data if isinstance(t, nn.Parameter) else t
    flatten = getattr(type(data), "__tensor_flatten__", None)
    if type(data) is not torch.Tensor and flatten is not None:
        try:
            names, _ = flatten(data)
        except Exception:
            names = []
        if names:
            return sum(tensor_nbytes(getattr(data, n)) for n in names)
    return int(data.numel() * data.element_size())


def storage_digest(t: torch.Tensor) -> str:
    """A SHA-256 over a tensor's raw bytes (inner tensors for subclasses), to prove storage untouched."""
    h = hashlib.sha256()
    data = t.data if isinstance(t, nn.Parameter) else t
    flatten = getattr(type(data), "__tensor_flatten__", None)
    if type(data) is not torch.Tensor and flatten is not None:
        names, _ = flatten(data)
        for n in names:
            h.update(n.encode())
            h.update(storage_digest(getattr(data, n)).encode())
        return h.hexdigest()
    flat = data.detach().contiguous().cpu().reshape(-1)
    h.update(str(data.dtype).encode())
    h.update(str(tuple(data.shape)).encode())
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def iter_unique_parameters(model: nn.Module) -> Iterator[tuple[str, list[str], nn.Parameter, nn.Module]]:
    """Each distinct parameter once: (first name, every name it goes by, parameter, owning module).

    Tied parameters (one Parameter object reachable under two names) are reported once with both names.
    """
    seen: dict[int, tuple[str, list[str], nn.Parameter, nn.Module]] = {}
    order: list[int] = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            entry = seen.get(id(p))
            if entry is None:
                seen[id(p)] = (full, [full], p, mod)
                order.append(id(p))
            elif full not in entry[1]:
                entry[1].append(full)
    for key in order:
        yield seen[key]
