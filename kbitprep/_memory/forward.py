"""The patched forwards: the causal LM's (offload context, chunked head) and its output head's."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import KbitprepWarning, UnsupportedModelError
from .chunked_loss import chunked_causal_lm_loss
from .offload import OffloadHooks, current_session
from .planning import output_head

if TYPE_CHECKING:
    from .._plan_types import Plan

__all__ = ["STATE_ATTR", "MemoryState", "apply_memory_modes", "state_of"]

STATE_ATTR = "_kbitprep_memory"


@dataclass
class MemoryState:
    """Kept on the patched module; what :func:`set_memory_modes` changes at run time."""

    chunked_head: int
    offload: bool
    prepared_chunk: int = 0
    offloader: OffloadHooks = field(default_factory=OffloadHooks)
    head_fallback: str = ""  # why the chunked head was given up on this model, once warned


_CAPTURE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("kbitprep_capture_head", default=None)


class _PatchedHead:
    """Instance ``forward`` of the output head: returns its input unchanged while captured."""

    def __init__(self, module: nn.Module, original: Any) -> None:
        self.module = module
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        session = current_session()
        if session is not None:
            session.start_tail()  # the head, the loss and the norm just before: the backward needs them first
        box = _CAPTURE.get()
        if box is not None and box[0] is self.module and len(args) == 1 and not kwargs:
            box[1] = args[0]
            return args[0]
        forward = self.original if self.original is not None else type(self.module).forward.__get__(self.module)
        return forward(*args, **kwargs)


class _PatchedForward:
    """Instance ``forward`` of the causal LM (or the model): offload context and chunked head."""

    def __init__(self, module: nn.Module, original: Any) -> None:
        self.module = module
        self.original = original
        bound = original if original is not None else type(module).forward.__get__(module)
        with contextlib.suppress(TypeError, ValueError):
            self.__signature__ = inspect.signature(bound)  # Trainer and PEFT inspect forward's parameters

    def _orig(self) -> Callable[..., Any]:
        if self.original is not None:
            return self.original  # type: ignore[no-any-return]
        return type(self.module).forward.__get__(self.module)  # type: ignore[no-any-return]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        state = vars(module).get(STATE_ATTR)
        forward = self._orig()
        if not isinstance(state, MemoryState):
            return forward(*args, **kwargs)
        ctx = state.offloader.context() if state.offload else contextlib.nullcontext()
        with ctx:
            if state.chunked_head and not state.head_fallback and self._wants_chunks(kwargs):
                return self._chunked(state, forward, args, kwargs)
            return forward(*args, **kwargs)

    def _wants_chunks(self, kwargs: Mapping[str, Any]) -> bool:
        return (
            kwargs.get("labels") is not None
            and self.module.training
            and torch.is_grad_enabled()
            and kwargs.get("return_dict", True) is not False
            and not kwargs.get("logits_to_keep")
        )

    def _give_up(self, state: MemoryState, why: str) -> None:
        state.head_fallback = why
        warnings.warn(
            f"kbitprep: the chunked output head does not work with this {type(self.module).__name__} ({why}); "
            "computing full logits instead from now on",
            KbitprepWarning,
            stacklevel=4,
        )

    def _chunked(
        self, state: MemoryState, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        module = self.module
        head = output_head(module)
        if head is None or not _head_is_patched(head):
            self._give_up(state, "its output head was replaced after prepare, e.g. by an adapter on lm_head")
            return forward(*args, **kwargs)
        labels = kwargs["labels"]
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        call = dict(kwargs, labels=None)
        box: list[Any] = [head, None]
        token = _CAPTURE.set(box)
        try:
            out = forward(*args, **call)
        finally:
            _CAPTURE.reset(token)
        hidden: torch.Tensor | None = box[1] if isinstance(box[1], torch.Tensor) else None
        # the forward returned the head's output as is (or moved to another device by accelerate's hooks)
        untouched = hidden is not None and _unchanged_copy(getattr(out, "logits", None), hidden)
        if hidden is None or not untouched or not hasattr(out, "items"):
            self._give_up(state, "its forward transforms the head's output (e.g. logit soft-capping or scaling)")
            return forward(*args, **kwargs)
        shift = loss_kwargs.get("shift_labels")
        reference = shift if shift is not None else labels
        if not isinstance(reference, torch.Tensor) or tuple(hidden.shape[:-1]) != tuple(reference.shape):
            self._give_up(state, "labels do not align with the hidden states")
            return forward(*args, **kwargs)
        loss = chunked_causal_lm_loss(
            hidden,
            labels,
            head,
            chunk_tokens=state.chunked_head,
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            ignore_index=loss_kwargs.get("ignore_index", -100),
            shift_labels=shift,
        )
        device = _io_device(module)
        if device is not None:
            loss = loss.to(device)  # where accelerate's hook on the model moves the outputs (device_map)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, **fields)


def _head_is_patched(head: nn.Module) -> bool:
    """Whether the head's forward is still kbitprep's, also under accelerate's hooks added after prepare."""
    forward = vars(head).get("forward")
    for _ in range(8):
        if isinstance(forward, _PatchedHead):
            return True
        # accelerate's add_hook_to_module: forward = update_wrapper(partial(new_forward), old_forward)
        forward = getattr(forward, "__wrapped__", None)
    return isinstance(vars(head).get("_old_forward"), _PatchedHead)


def _unchanged_copy(logits: Any, hidden: torch.Tensor) -> bool:
    """Whether ``logits`` is the head's output ``hidden`` itself, or a device copy of it (accelerate's hooks)."""
    if logits is hidden:
        return True
    if not isinstance(logits, torch.Tensor) or logits.shape != hidden.shape or logits.dtype != hidden.dtype:
        return False
    node = logits.grad_fn
    if node is None or hidden.grad_fn is None:
        # no autograd graph to read (nothing upstream requires grad): compare the values (tokens x hidden)
        return logits.device != hidden.device and torch.equal(logits.to(hidden.device), hidden)
    for _ in range(8):  # .to(device) copies, possibly several (one per hook)
        if node is None or node.name() != "ToCopyBackward0":
            return False
        node = node.next_functions[0][0]
        if node is hidden.grad_fn:
            return True
    return False


def _io_device(module: nn.Module) -> torch.device | None:
    """Where accelerate's hook on ``module`` moves its outputs (``io_same_device``), if it does."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        if getattr(h, "io_same_device", False) and getattr(h, "input_device", None) is not None:
            return torch.device(h.input_device)
    return None


class _NoReplicas:
    """Instance ``_replicate_for_data_parallel`` of the patched modules: refuse ``nn.DataParallel`` replicas.

    A replica copies the module's ``__dict__``, so it would share the patched ``forward``, which
    calls the original module (its parameters on the first device): the replicas would compute
    with the wrong weights. ``DataParallel`` on one device (or on the CPU) does not replicate and works.
    """

    def __init__(self, module: nn.Module) -> None:
        self.kind = type(module).__name__

    def __call__(self) -> nn.Module:
        raise UnsupportedModelError(
            f"torch.nn.DataParallel cannot replicate this {self.kind}: kbitprep's memory modes (chunked_head, "
            "offload) patched its forward, and the replicas would run the original module's forward with the "
            "first device's weights. Use torch.nn.parallel.DistributedDataParallel (one process per GPU), or "
            "kbitprep.undo(model) and prepare it without memory=..."
        )


def apply_memory_modes(model: nn.Module, plan: Plan) -> str:
    """The transaction step that installs the plan's memory modes (see the module docstring).

    Called by the core inside prepare's transaction; returns the label recorded in the report, or
    ``""`` when the plan has no memory mode.
    """
    spec = plan.memory
    if not isinstance(spec, Mapping) or not (spec.get("chunked_head") or spec.get("offload")):
        return ""
    modules = dict(model.named_modules())
    target = modules[spec["module"]]
    chunk = int(spec["chunked_head"])
    state = MemoryState(chunked_head=chunk, offload=bool(spec["offload"]), prepared_chunk=chunk)
    parts = []
    head_name = spec.get("head") or ""
    if head_name:  # the chunked head captures its input; offload learns where the backward starts
        head = modules[head_name]
        head.__dict__["forward"] = _PatchedHead(head, head.__dict__.get("forward"))
        head.__dict__["_replicate_for_data_parallel"] = _NoReplicas(head)
    if state.chunked_head:
        parts.append(f"chunked output head ({state.chunked_head}-token chunks)")
    if state.offload:
        parts.append("offloaded checkpointing (pinned CPU memory, side CUDA stream, each storage once)")
    target.__dict__["forward"] = _PatchedForward(target, target.__dict__.get("forward"))
    target.__dict__["_replicate_for_data_parallel"] = _NoReplicas(target)
    target.__dict__[STATE_ATTR] = state
    return "memory: " + " + ".join(parts)


def state_of(model: nn.Module) -> MemoryState | None:
    for mod in model.modules():
        state = vars(mod).get(STATE_ATTR)
        if isinstance(state, MemoryState):
            return state
    return None
