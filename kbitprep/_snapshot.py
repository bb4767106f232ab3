"""Snapshots of a model's mutable state and the exact reversal of what changed since.

A snapshot records, for every module, parameter, buffer and config object, a shallow copy of its
``__dict__`` (one level deeper for dict-valued entries such as ``_parameters`` and the hook
dictionaries), and for every tensor its data alias, dtype and ``requires_grad``. Nothing is
copied in memory: only references are kept. :meth:`Snapshot.changes` compares the model now with
the snapshot and returns the :class:`Changes` that :meth:`Changes.revert` undoes, touching only
what changed (so adapters attached afterwards survive an undo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._anatomy import model_configs

__all__ = ["Changes", "Snapshot"]


class _Missing:
    """The absence of an attribute before or after a change. One object, also through ``copy.deepcopy``
    and pickling: a copied model's record of changes (``copy.deepcopy`` of a prepared model) must still
    tell "there was no such attribute" from a value, or its undo would set a placeholder in its place."""

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"  # unpickled as this module's _MISSING

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def _container_copy(value: Any) -> dict[Any, Any] | None:
    if isinstance(value, dict):
        return dict(value)
    return None


@dataclass
class _ObjState:
    obj: Any
    attrs: dict[str, Any]
    containers: dict[str, dict[Any, Any]]


def _capture_obj(obj: Any) -> _ObjState:
    attrs = dict(vars(obj))
    containers = {k: c for k, v in attrs.items() if (c := _container_copy(v)) is not None}
    return _ObjState(obj, attrs, containers)


@dataclass
class _TensorState:
    tensor: torch.Tensor
    data: torch.Tensor
    dtype: torch.dtype
    requires_grad: bool
    key: tuple[Any, ...]


def _data_key(t: torch.Tensor) -> tuple[Any, ...]:
    data = t.data
    try:
        ptr = data.data_ptr() if type(data) is torch.Tensor else id(data)
    except RuntimeError:
        ptr = id(data)
    return (type(data), ptr, data.dtype, tuple(data.shape), data.device)


@dataclass
class _AttrOp:
    obj: Any
    key: str
    before: Any
    after: Any

    def revert(self) -> None:
        d = vars(self.obj)
        if d.get(self.key, _MISSING) is not self.after:
            return  # changed again by someone else since; leave their value
        if self.before is _MISSING:
            d.pop(self.key, None)
        else:
            d[self.key] = self.before


@dataclass
class _ContainerOp:
    container: dict[Any, Any]
    before: dict[Any, Any]
    added: dict[Any, Any]
    replaced: dict[Any, Any]  # key -> value we put there
    removed: list[Any]

    def revert(self) -> None:
        c = self.container
        for k, v in self.added.items():
            if c.get(k, _MISSING) is v:
                del c[k]
        for k, v in self.replaced.items():
            if c.get(k, _MISSING) is v:
                c[k] = self.before[k]
        for k in self.removed:
            if k not in c:
                c[k] = self.before[k]
        # restore the original order of the keys that were there before, others after
        keys = [k for k in self.before if k in c] + [k for k in c if k not in self.before]
        if list(c) != keys:
            items = [(k, c[k]) for k in keys]
            c.clear()
            c.update(items)


@dataclass
class _TensorOp:
    state: _TensorState
    after_key: tuple[Any, ...]
    after_dtype: torch.dtype
    cast_back: bool = False

    def revert(self) -> None:
        t = self.state.tensor
        if self.cast_back:
            if t.dtype != self.state.dtype:
                t.data = t.data.to(self.state.dtype)
        else:
            t.data = self.state.data


@dataclass
class _GradOp:
    tensor: torch.Tensor
    before: bool

    def revert(self) -> None:
        if self.tensor.requires_grad != self.before:
            self.tensor.requires_grad_(self.before)


@dataclass
class Changes:
    """What changed on a model between a snapshot and now, ready to be reverted exactly."""

    ops: list[Any] = field(default_factory=list)

    def revert(self) -> None:
        """Undo every recorded change, newest first."""
        for op in reversed(self.ops):
            op.revert()

    def release_upcast_storage(self, cast_back: Callable[[torch.Tensor], bool]) -> None:
        """For tensors the core only cast, undo by casting back instead of keeping the old storage.

        bf16/fp16 -> fp32 -> bf16/fp16 is exact, so this frees the pre-cast copy without losing anything.
        """
        for op in self.ops:
            if isinstance(op, _TensorOp) and cast_back(op.state.tensor):
                op.cast_back = True
                op.state.data = torch.empty(0)


class Snapshot:
    """References to everything of a model that prepare may change (see the module docstring)."""

    def __init__(self, model: nn.Module, configs: Iterable[Any] | None = None):
        objs: dict[int, Any] = {}
        tensors: dict[int, torch.Tensor] = {}
        for mod in model.modules():
            objs.setdefault(id(mod), mod)
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "__dict__") and not isinstance(cfg, nn.Module):
                objs.setdefault(id(cfg), cfg)
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is not None:
                    tensors.setdefault(id(t), t)
        # every config, sub-configs too (text_config, T5's decoder config ...)
        for cfg in model_configs(model) if configs is None else configs:
            objs.setdefault(id(cfg), cfg)
        for t in tensors.values():
            objs.setdefault(id(t), t)
        self._objs = [_capture_obj(o) for o in objs.values()]
        self._tensors = [_TensorState(t, t.data, t.dtype, t.requires_grad, _data_key(t)) for t in tensors.values()]

    @classmethod
    def of_objects(cls, objs: Iterable[Any]) -> Snapshot:
        """A snapshot of plain objects only (config objects, say), no model: their attributes and
        dict-valued containers, reverted the same way."""
        snap = cls.__new__(cls)
        snap._objs = [_capture_obj(o) for o in objs]
        snap._tensors = []
        return snap

    def changes(self) -> Changes:
        """Compare the model now with the snapshot."""
        ops: list[Any] = []
        for st in self._objs:
            now = vars(st.obj)
            for key in set(st.attrs) | set(now):
                before = st.attrs.get(key, _MISSING)
                after = now.get(key, _MISSING)
                if before is not after:
                    ops.append(_AttrOp(st.obj, key, before, after))
                elif key in st.containers and isinstance(after, dict):
                    op = _container_diff(after, st.containers[key])
                    if op is not None:
                        ops.append(op)
        for ts in self._tensors:
            t = ts.tensor
            key = _data_key(t)
            if key != ts.key:
                ops.append(_TensorOp(ts, key, t.dtype))
            if t.requires_grad != ts.requires_grad:
                ops.append(_GradOp(t, ts.requires_grad))
        return Changes(ops)


def _container_diff(now: dict[Any, Any], before: dict[Any, Any]) -> _ContainerOp | None:
    added = {k: v for k, v in now.items() if k not in before}
    replaced = {k: v for k, v in now.items() if k in before and before[k] is not v}
    removed = [k for k in before if k not in now]
    if not (added or replaced or removed):
        return None
    return _ContainerOp(now, before, added, replaced, removed)
