"""fp32 master weights for parameters that train in full after prepare.

kbitprep's default keeps frozen parameters in their loaded dtype. A parameter that trains in full and
only becomes trainable after prepare (PEFT's ``modules_to_save`` copies and ``trainable_token_indices``
deltas, a layer a user unfreezes by hand) would then train in bf16/fp16: AdamW's small steps round
away (after 3 steps at lr 1e-5, 16% of a bf16 ``lm_head`` copy's elements had changed, against 100%
in fp32 after PEFT's function, which upcasts everything).

So prepare installs :class:`MasterWeights`, a forward pre-hook on the prepared model. At a training
forward (``model.training`` and grad enabled) it looks for trainable fp16/bf16 parameters it has not
seen, stores them in fp32 (master weights: the optimizer, created lazily at its first step, keeps fp32
state), and makes their modules compute as before: a pre-hook casts their half-precision floating
inputs to fp32 and a post-hook casts the floating output back to the parameter's half dtype (under
``torch.autocast`` the matmul runs in the autocast dtype anyway). Parameters that do not train keep
their dtype, so parameter memory stays at kbitprep's level for everything frozen.

Finding new candidates must not cost a walk of the module tree at every forward (3 ms for an 8B-shaped
model with LoRA on all linear layers). The hook keeps the model's parameters in a flat tuple and checks
those (``requires_grad`` and dtype are read live, so a parameter unfrozen by hand is seen); it walks the
tree again only when a parameter, or a module never registered before, was registered anywhere in
the process since (torch's global registration hooks: PEFT adding ``modules_to_save`` copies, a layer
replaced by assignment), which a process-wide counter tells. Registering a known module again does not
count: transformers slices its ``ModuleList`` of layers at every forward, which registers each layer
into a temporary list. (Modules are known by weak reference; parameters are not, since a weak reference
keeps ``torch.utils.swap_tensors``, which ``model.to()`` uses for tensor subclasses, from swapping them.)

The changes are added to the prepared model's record: :func:`kbitprep.undo` removes the hooks and
casts those parameters back to their dtype; :func:`kbitprep.report` lists them among the steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._anatomy import own_adapter_params
from ._snapshot import Changes, Snapshot
from .plugin import HALF_DTYPES, is_plain_tensor

__all__ = ["MASTER_WEIGHTS_NOTE", "MasterWeights"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()  # one for all models: upcasts are rare (a first training forward), and hooks stay copyable

#: How many parameters, and modules never registered before, were registered in this process (while watched).
_registrations = [0]
_known_modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules hash and compare by identity
_watching: list[Any] = []


def _count_module(module: nn.Module, name: str, value: Any) -> None:
    try:
        if value in _known_modules:
            return
        _known_modules.add(value)
    except TypeError:  # a module class that cannot be hashed or weakly referenced: count it each time
        pass
    _registrations[0] += 1


def _count_parameter(module: nn.Module, name: str, value: Any) -> None:
    _registrations[0] += 1


def _watch_registrations() -> None:
    """Count module and parameter registrations process-wide from now on (torch's global hooks; once)."""
    with _LOCK:
        if not _watching:
            from torch.nn.modules import module as torch_module

            _watching.append(torch_module.register_module_module_registration_hook(_count_module))
            _watching.append(torch_module.register_module_parameter_registration_hook(_count_parameter))


#: The plan's note on what :class:`MasterWeights` does.
MASTER_WEIGHTS_NOTE = (
    "half-precision parameters made trainable after prepare (PEFT's modules_to_save, trainable_token_indices, "
    "by hand) get fp32 master weights at the first training forward"
)


def _cast_floats(value: Any, dtype: torch.dtype, only: Collection[torch.dtype]) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in only else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype, only) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype, only) for v in value]
    return value


class Fp32Compute:
    """Forward pre-hook (with kwargs) of a module holding fp32 master weights: half-precision inputs to fp32."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _cast_floats(args, torch.float32, HALF_DTYPES), {
            k: _cast_floats(v, torch.float32, HALF_DTYPES) for k, v in kwargs.items()
        }


class BackToHalf:
    """Forward hook of a module holding fp32 master weights: its fp32 outputs back to the half dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return _cast_floats(output, self.dtype, (torch.float32,))


class MasterWeights:
    """Forward pre-hook on the prepared model: fp32 master weights for half-precision parameters that
    became trainable after prepare (see the module docstring)."""

    def __init__(self, record: Callable[[nn.Module, Changes, str], None]) -> None:
        """``record(model, changes, step)`` adds the changes to the model's prepared record (the mutation site's)."""
        self.record = record
        self.seen: set[int] = set()
        self.params: tuple[nn.Parameter, ...] = ()  # the model's parameters at the last walk
        self.walked_at = -1  # the registration count then
        _watch_registrations()

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self.walked_at != _registrations[0]:  # something was registered somewhere since: walk again
            self.walked_at = _registrations[0]
            self.params = tuple(module.parameters())
        if not any(self._candidate(p) for p in self.params):  # the common case: nothing new
            return
        with _LOCK:
            found = self._trainable_half(module)
            if found:
                self._upcast(module, found)

    def _candidate(self, p: torch.Tensor) -> bool:
        return p.requires_grad and id(p) not in self.seen and is_plain_tensor(p) and p.dtype in HALF_DTYPES

    def _trainable_half(self, module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
        """The new candidates, but PEFT's own adapter tensors (LoRA's A and B ...), whose dtype PEFT (its
        ``autocast_adapter_dtype``) and the trainer (TRL casts them to bf16 for bitsandbytes) decide: those
        are marked seen and left alone. ``modules_to_save`` copies are not adapters in that sense: they train."""
        adapters = {i for mod in module.modules() for i in own_adapter_params(mod, saved_copies=False)}
        found = []
        for owner_name, owner in module.named_modules():
            for local, p in owner.named_parameters(recurse=False):
                if not self._candidate(p):
                    continue
                if id(p) in adapters:
                    self.seen.add(id(p))
                    continue
                found.append((f"{owner_name}.{local}" if owner_name else local, p, owner))
        return found

    @contextlib.contextmanager
    def ignoring(self, params: Iterable[torch.Tensor]) -> Iterator[None]:
        """Within the block these parameters are not given master weights (the gradient-flow probe's
        stand-ins: the probe is not a training step, and what it changes is reverted)."""
        added = [id(p) for p in params if id(p) not in self.seen]
        self.seen.update(added)
        try:
            yield
        finally:
            self.seen.difference_update(added)

    def _upcast(self, model: nn.Module, found: list[tuple[str, nn.Parameter, nn.Module]]) -> None:
        owners = {id(o): o for _, _, o in found}
        snapshots = [Snapshot(o) for o in owners.values()]
        upcast: set[int] = set()
        hooked: set[int] = set()
        for _, p, owner in found:
            half = p.dtype
            p.data = p.data.to(torch.float32)
            upcast.add(id(p))
            self.seen.add(id(p))
            if id(owner) not in hooked:
                hooked.add(id(owner))
                # the module computes in fp32: its frozen half-precision parameters (a Linear's bias) too
                for q in owner.parameters(recurse=False):
                    if q is not p and id(q) not in upcast and is_plain_tensor(q) and q.dtype in HALF_DTYPES:
                        q.data = q.data.to(torch.float32)
                        upcast.add(id(q))
                owner.register_forward_pre_hook(Fp32Compute(), with_kwargs=True)
                owner.register_forward_hook(BackToHalf(half))
        changes = Changes([op for snap in snapshots for op in snap.changes().ops])
        changes.release_upcast_storage(lambda t: id(t) in upcast)
        names = [name for name, _, _ in found]
        step = f"fp32 master weights for {len(found)} parameters trained after prepare: " + ", ".join(names[:4])
        self.record(model, changes, step + (f" and {len(names) - 4} more" if len(names) > 4 else ""))
        log.info("kbitprep: fp32 master weights for %d parameters: %s", len(found), ", ".join(names))
