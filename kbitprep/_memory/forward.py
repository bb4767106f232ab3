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
from .chunked_loss import HeadTransform, chunked_causal_lm_loss, chunked_token_stats, head_transform
from .offload import OffloadHooks, current_session
from .planning import output_head
from .trl_fused import FusedRequest, FusedRouter, clear_request, fused_output, take_request, text_config

if TYPE_CHECKING:
    from .._plan_types import Plan

__all__ = ["HEAD_CALLS", "STATE_ATTR", "MemoryState", "apply_memory_modes", "state_of"]

STATE_ATTR = "_kbitprep_memory"


#: The heads :func:`kbitprep.memory_modes` counts calls of (``head_calls``).
HEAD_CALLS = ("chunked", "fused_kbitprep", "fused_trl")


@dataclass
class MemoryState:
    """Kept on the patched module; what :func:`set_memory_modes` changes at run time, and what ran.

    ``head_calls`` counts training calls by the head that served them: ``chunked`` (kbitprep's chunked
    loss, called with labels), ``fused_kbitprep`` / ``fused_trl`` (TRL's ``fused_lm_head=True`` calls,
    served by kbitprep's chunked head or by TRL's). ``offload_by`` says which offload ran last:
    ``"kbitprep"``, or the other mechanism kbitprep's stepped aside for.
    """

    chunked_head: int
    offload: bool
    prepared_chunk: int = 0
    offloader: OffloadHooks = field(default_factory=OffloadHooks)
    head_fallback: str = ""  # why the chunked head was given up on this model, once warned
    transform: HeadTransform = field(default_factory=HeadTransform)
    head_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEAD_CALLS, 0))
    offload_by: str = ""
    stepped_aside: set[str] = field(default_factory=set)  # warned once each

    def count(self, head: str) -> None:
        """One more call served by ``head`` (a key of :data:`HEAD_CALLS`)."""
        self.head_calls[head] = self.head_calls.get(head, 0) + 1

    def offload_context(self, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        """kbitprep's offload context for one forward of ``module``, or nothing while another offload runs."""
        if not self.offload:
            return contextlib.nullcontext()
        check = getattr(self.offloader, "other_offload", None)
        other = check(module) if check is not None else ""
        if other:
            self.offload_by = other
            if other not in self.stepped_aside:
                self.stepped_aside.add(other)
                warnings.warn(
                    f"kbitprep: {other} keeps the saved tensors of this {type(module).__name__} elsewhere; "
                    "kbitprep's offload steps aside while it runs (two offloads at once would copy twice). "
                    "Turn one of them off to choose: kbitprep.set_memory_modes(model, offload=False), or the other's "
                    "switch (TRL: activation_offloading=False)",
                    KbitprepWarning,
                    stacklevel=4,
                )
            return contextlib.nullcontext()
        self.offload_by = "kbitprep"
        return self.offloader.context()


_CAPTURE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("kbitprep_capture_head", default=None)


class _InstanceForward:
    """An instance ``forward`` kbitprep installs on a module: it calls the forward it stands in front of,
    the instance's own (``original``: another library's, installed before prepare) or else the class's,
    and carries that forward's signature (Trainer and PEFT inspect ``forward``'s parameters)."""

    def __init__(self, module: nn.Module, original: Any) -> None:
        self.module = module
        self.original = original
        with contextlib.suppress(TypeError, ValueError):
            self.__signature__ = inspect.signature(self.replaced())

    def replaced(self) -> Callable[..., Any]:
        """The forward this one stands in front of, bound to the module."""
        if self.original is not None:
            return self.original  # type: ignore[no-any-return]
        return type(self.module).forward.__get__(self.module)  # type: ignore[no-any-return]


class _PatchedHead(_InstanceForward):
    """Instance ``forward`` of the output head: returns its input unchanged while captured."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        session = current_session()
        if session is not None:
            session.start_tail()  # the head, the loss and the norm just before: the backward needs them first
        box = _CAPTURE.get()
        if box is not None and box[0] is self.module and len(args) == 1 and not kwargs:
            box[1] = args[0]
            return args[0]
        return self.replaced()(*args, **kwargs)


class _PatchedForward(_InstanceForward):
    """Instance ``forward`` of the causal LM (or the model): chunked head, and the offload context
    unless the backbone has its own (:class:`_BackboneForward`)."""

    def __init__(self, module: nn.Module, original: Any, offload_here: bool = True) -> None:
        super().__init__(module, original)
        self.offload_here = offload_here

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        state = vars(module).get(STATE_ATTR)
        forward = self.replaced()
        request = take_request()
        if not isinstance(state, MemoryState):
            return forward(*args, **kwargs)
        ctx = state.offload_context(module) if self.offload_here else contextlib.nullcontext()
        with ctx:
            targets = kwargs.get("labels") if kwargs.get("shift_labels") is None else kwargs["shift_labels"]
            if request is not None and targets is not None and not state.head_fallback:
                return self._chunked(state, forward, args, kwargs, request)
            if state.chunked_head and not state.head_fallback and self._wants_chunks(kwargs):
                return self._chunked(state, forward, args, kwargs, None)
            return forward(*args, **kwargs)

    def _wants_chunks(self, kwargs: Mapping[str, Any]) -> bool:
        return (
            kwargs.get("labels") is not None
            and not kwargs.get("fused_lm_head")  # TRL patched the model before prepare: its head serves
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

    def _fallback(
        self, state: MemoryState, forward: Callable[..., Any], args: Any, kwargs: dict[str, Any], fused: bool
    ) -> Any:
        if fused:  # TRL's head after all: call TRL's forward (not through the module, so no pre-hook)
            state.count("fused_trl")
            return vars(self.module)["forward"](*args, **{**kwargs, "fused_lm_head": True})
        return forward(*args, **kwargs)

    def _chunked(
        self,
        state: MemoryState,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        request: FusedRequest | None,
    ) -> Any:
        module = self.module
        fused = request is not None
        head = output_head(module)
        if head is None or not _head_is_patched(head):
            self._give_up(state, "its output head was replaced after prepare, e.g. by an adapter on lm_head")
            return self._fallback(state, forward, args, kwargs, fused)
        labels = kwargs.get("labels")
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
        call = dict(kwargs, labels=None)
        for key in ("num_items_in_batch", "shift_labels") if fused else ():
            call.pop(key, None)
        if fused:
            call["use_cache"] = False
            if getattr(text_config(module), "output_router_logits", False):
                call.setdefault("output_router_logits", True)  # the load-balancing loss, as TRL asks for it
        box: list[Any] = [head, None]
        token = _CAPTURE.set(box)
        try:
            out = forward(*args, **call)
        finally:
            _CAPTURE.reset(token)
        hidden: torch.Tensor | None = box[1] if isinstance(box[1], torch.Tensor) else None
        # the forward returned the head's output as is, or transformed as its config says (or moved to
        # another device by accelerate's hooks)
        config = getattr(module, "config", None)
        state.transform = head_transform(config) if config is not None else HeadTransform()  # as the config says now
        applied = hidden is not None and _applied(state.transform, getattr(out, "logits", None), hidden)
        if hidden is None or not applied or not hasattr(out, "items"):
            self._give_up(state, "its forward transforms the head's output in a way its config does not say")
            return self._fallback(state, forward, args, kwargs, fused)
        shift = loss_kwargs.get("shift_labels")
        reference = shift if shift is not None else labels
        if not isinstance(reference, torch.Tensor) or tuple(hidden.shape[:-1]) != tuple(reference.shape):
            self._give_up(state, "labels do not align with the hidden states")
            return self._fallback(state, forward, args, kwargs, fused)
        chunk = state.chunked_head or state.prepared_chunk
        if request is not None:
            state.count("fused_kbitprep")

            def stats(h: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
                return chunked_token_stats(
                    h,
                    y,
                    head,
                    transform=state.transform,
                    temperature=request.temperature,
                    outputs=request.outputs,
                    chunk_tokens=chunk,
                    fp32_head=request.fp32_head,
                )

            return fused_output(module, out, hidden, kwargs, request, stats)
        state.count("chunked")
        loss = chunked_causal_lm_loss(
            hidden,
            labels,
            head,
            chunk_tokens=chunk,
            num_items_in_batch=loss_kwargs.get("num_items_in_batch"),
            ignore_index=loss_kwargs.get("ignore_index", -100),
            shift_labels=shift,
            transform=state.transform,
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


class _BackboneForward(_InstanceForward):
    """Instance ``forward`` of the backbone (``model.base_model``): the offload context of one forward.

    On the backbone rather than the causal LM, so that it runs whoever calls the backbone: the causal
    LM's own forward, or TRL's fused head, which calls the backbone directly.
    """

    def __init__(self, module: nn.Module, original: Any, owner: nn.Module) -> None:
        super().__init__(module, original)
        self.owner = owner  # the module holding the state (a plain reference: copy.deepcopy maps it to the copy's)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.replaced()
        state = vars(self.owner).get(STATE_ATTR)
        if not isinstance(state, MemoryState):
            return forward(*args, **kwargs)
        with state.offload_context(self.module):
            return forward(*args, **kwargs)


def _steps(transform: HeadTransform) -> list[tuple[str, float | None]]:
    """The autograd nodes the transform leaves, from the logits back to the head's output."""
    steps: list[tuple[str, float | None]] = []
    if transform.softcap is not None:
        steps += [("MulBackward0", transform.softcap), ("TanhBackward0", None), ("DivBackward0", transform.softcap)]
    if transform.divisor != 1.0:
        steps.append(("DivBackward0", transform.divisor))
    if transform.multiplier != 1.0:
        steps.append(("MulBackward0", transform.multiplier))
    return steps


def _saved_scalar(node: Any) -> float | None:
    try:
        return float(node._saved_other)
    except Exception:  # a tensor operand, or a fake tensor (the memory estimate): no value to read
        return None


def _applied(transform: HeadTransform, logits: Any, hidden: torch.Tensor) -> bool:
    """Whether ``logits`` is what the model's forward makes of the head's output ``hidden`` by its config:
    read off the autograd graph where there is one (exactly the transform's steps and constants
    between them, device copies aside), else by value."""
    if transform.identity:
        return _unchanged_copy(logits, hidden)
    if not isinstance(logits, torch.Tensor) or logits.shape != hidden.shape:
        return False
    node, target = logits.grad_fn, hidden.grad_fn
    if node is not None and target is not None:
        for name, value in _steps(transform):
            while node is not None and node.name() == "ToCopyBackward0":
                node = node.next_functions[0][0]
            if node is None or node.name() != name:
                return False
            seen = _saved_scalar(node) if value is not None else None
            if seen is not None and value is not None and abs(seen - value) > 1e-6 * max(1.0, abs(value)):
                return False
            node = node.next_functions[0][0]
        while node is not None and node.name() == "ToCopyBackward0":
            node = node.next_functions[0][0]
        return node is target
    with torch.no_grad():
        expected = transform(hidden.detach())
        got = logits.detach().to(expected.device, expected.dtype)
        return bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-5))


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
    base = modules[spec["backbone"]] if spec.get("backbone") else target
    chunk = int(spec["chunked_head"])
    config = getattr(target, "config", None)
    state = MemoryState(
        chunked_head=chunk,
        offload=bool(spec["offload"]),
        prepared_chunk=chunk,
        transform=head_transform(config) if config is not None else HeadTransform(),
    )
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
    target.__dict__["forward"] = _PatchedForward(target, target.__dict__.get("forward"), offload_here=base is target)
    target.__dict__["_replicate_for_data_parallel"] = _NoReplicas(target)
    target.__dict__[STATE_ATTR] = state
    if base is not target:
        base.__dict__["forward"] = _BackboneForward(base, base.__dict__.get("forward"), target)
        base.__dict__["_replicate_for_data_parallel"] = _NoReplicas(base)
    if chunk:  # TRL's fused-head calls: kbitprep's head serves them where it was measured better
        target.register_forward_pre_hook(FusedRouter(_PatchedForward, STATE_ATTR), with_kwargs=True)
        target.register_forward_hook(clear_request, with_kwargs=True, always_call=True)
    return "memory: " + " + ".join(parts)


def state_of(model: nn.Module) -> MemoryState | None:
    """The :class:`MemoryState` prepare installed on ``model`` (or a module inside it), or ``None``."""
    for mod in model.modules():
        state = vars(mod).get(STATE_ATTR)
        if isinstance(state, MemoryState):
            return state
    return None
