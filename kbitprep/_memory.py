"""Memory modes: a chunked output head, offloaded checkpointing, and the named presets combining them.

Three things cut training memory beyond kbitprep's default (which already keeps frozen parameters
in their loaded dtype where the backend allows it, instead of PEFT's fp32 upcast):

* **chunked output head** (``chunked_head``): for causal-LM training with ``labels``, the output
  projection and the loss are computed in checkpointed chunks of ``chunked_head`` tokens, so the
  ``tokens x vocabulary`` logits (and their fp32 copy for the loss) never exist at once; the
  backward recomputes one chunk at a time. The loss is the one transformers' ``ForCausalLMLoss``
  computes (same label shift, ``ignore_index``, ``shift_labels`` and ``num_items_in_batch``). While
  it is active the model returns ``logits=None``: call the model without ``labels`` (or switch the
  mode off with :func:`set_memory_modes`) to get logits.
* **offloaded checkpointing** (``offload``): tensors autograd saves for backward during the
  forward (with reentrant checkpointing: the inputs of each checkpointed layer, and whatever the
  embedding, the final norm and the head save) are kept in pinned CPU memory. The device-to-host
  copies run on a separate CUDA stream so the forward does not wait for them; the backward copies
  them back asynchronously on its own stream. Where tensors already live in CPU memory (a CPU
  model) nothing is copied and training is unchanged.
* **presets** (``memory="lowest"``): no upcast + reentrant checkpointing + chunked head + offload.

The modes are chosen with ``kbitprep.plan(model, memory=...)`` / ``kbitprep.prepare(model,
memory=...)``, carried by the plan (``plan.extras["memory"]``) and installed by
:func:`apply_memory_modes`, a step of the core's atomic transaction (``kbitprep._mutation``): it
sets instance attributes (``forward`` of the causal-LM module and of its output head, and a state
object), so a failing prepare and :func:`kbitprep.undo` remove them exactly. Nothing in this module
changes a model outside that step.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InvalidPolicyError, KbitprepWarning, NotPreparedError
from .plugin import CheckpointMode

if TYPE_CHECKING:
    from ._planning import Plan

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "MEMORY_PRESETS",
    "OFFLOAD_MIN_BYTES",
    "MemoryChoice",
    "MemoryModes",
    "OffloadHooks",
    "apply_memory_modes",
    "chunked_causal_lm_loss",
    "memory_modes",
    "memory_plan",
    "resolve_memory",
    "set_memory_modes",
]

#: Tokens per chunk of the chunked output head unless chosen otherwise.
DEFAULT_CHUNK_TOKENS = 256
#: Saved tensors smaller than this stay on the device when offloading (copies cost more than they save).
OFFLOAD_MIN_BYTES = 1 << 20

#: The named memory presets, with what each does.
MEMORY_PRESETS: dict[str, str] = {
    "default": "kbitprep's defaults: the backend's upcast policy (no upcast of frozen parameters where the "
    "backend allows it) and its default checkpointing; no extra memory mode",
    "chunked_head": f"output head and loss in checkpointed {DEFAULT_CHUNK_TOKENS}-token chunks "
    "(causal-LM training with labels; the model returns logits=None then)",
    "offload": "tensors saved for backward kept in pinned CPU memory, copied on a separate CUDA stream",
    "lowest": "no upcast + reentrant checkpointing + chunked output head + offloaded checkpointing",
}

_MAPPING_KEYS = ("preset", "chunked_head", "offload")
_STATE_ATTR = "_kbitprep_memory"


@dataclass(frozen=True)
class MemoryModes:
    """A resolved memory choice.

    Attributes:
        preset: the preset it starts from (a key of :data:`MEMORY_PRESETS`).
        chunked_head: tokens per chunk of the chunked output head; ``0`` turns it off.
        offload: whether saved tensors are offloaded to pinned CPU memory.
        upcast: the upcast policy the preset asks for when the caller gives none (``None``: the backend's).
        checkpointing: the checkpointing mode the preset asks for when the caller asks for the
            default one and the backend supports it (``None``: the backend's).
        strict: whether a mode that does not apply to the model is an error (a mode asked for by
            name) rather than a note (a combined preset skips what does not apply).
    """

    preset: str = "default"
    chunked_head: int = 0
    offload: bool = False
    upcast: str | None = None
    checkpointing: str | None = None
    strict: bool = True

    @property
    def active(self) -> bool:
        """Whether any mode needs installing on the model."""
        return bool(self.chunked_head or self.offload)


#: A user's ``memory=`` value: a preset name, a mapping (``{"preset": "lowest", "chunked_head": 512}``;
#: keys ``preset``, ``chunked_head`` (``True``/``False``/tokens), ``offload``), a :class:`MemoryModes`, or ``None``.
MemoryChoice = str | Mapping[str, Any] | MemoryModes | None


def _valid_choices() -> str:
    return (
        "valid choices: "
        + ", ".join(repr(k) for k in MEMORY_PRESETS)
        + ", None, or a mapping with keys "
        + ", ".join(repr(k) for k in _MAPPING_KEYS)
        + " (e.g. {'preset': 'lowest', 'chunked_head': 512})"
    )


def _preset(name: str) -> MemoryModes:
    if name == "default":
        return MemoryModes("default")
    if name == "chunked_head":
        return MemoryModes("chunked_head", chunked_head=DEFAULT_CHUNK_TOKENS)
    if name == "offload":
        return MemoryModes("offload", offload=True)
    if name == "lowest":
        return MemoryModes(
            "lowest",
            chunked_head=DEFAULT_CHUNK_TOKENS,
            offload=True,
            upcast="none",
            checkpointing=CheckpointMode.REENTRANT.value,
            strict=False,
        )
    raise InvalidPolicyError(f"memory={name!r} is not a memory preset; {_valid_choices()}")


def resolve_memory(memory: MemoryChoice) -> MemoryModes:
    """Turn the user's ``memory=`` value into :class:`MemoryModes`.

    Raises:
        InvalidPolicyError: an unknown preset, key or value; the message lists the valid choices.
    """
    if memory is None:
        return MemoryModes("default")
    if isinstance(memory, MemoryModes):
        if memory.preset not in MEMORY_PRESETS or memory.chunked_head < 0:
            raise InvalidPolicyError(f"invalid MemoryModes {memory!r}; {_valid_choices()}")
        return memory
    if isinstance(memory, str):
        return _preset(memory)
    if isinstance(memory, Mapping):
        unknown = sorted(str(k) for k in memory if k not in _MAPPING_KEYS)
        if unknown:
            raise InvalidPolicyError(f"memory= has unknown key(s) {', '.join(unknown)}; {_valid_choices()}")
        base_name = memory.get("preset", "default")
        if not isinstance(base_name, str):
            raise InvalidPolicyError(f"memory['preset']={base_name!r} is not a preset name; {_valid_choices()}")
        modes = _preset(base_name)
        if "chunked_head" in memory:
            value = memory["chunked_head"]
            if value is True:
                tokens = DEFAULT_CHUNK_TOKENS
            elif value is False or value is None:
                tokens = 0
            elif isinstance(value, int) and value > 0:
                tokens = value
            else:
                raise InvalidPolicyError(
                    f"memory['chunked_head']={value!r} is not valid; use True, False or a positive token count"
                )
            modes = replace(modes, chunked_head=tokens, strict=True)
        if "offload" in memory:
            value = memory["offload"]
            if not isinstance(value, bool):
                raise InvalidPolicyError(f"memory['offload']={value!r} is not valid; use True or False")
            modes = replace(modes, offload=value, strict=True)
        return modes
    raise InvalidPolicyError(f"memory={memory!r} is not valid; {_valid_choices()}")


def preset_options(
    modes: MemoryModes, upcast: Any, checkpointing: Any, supported: frozenset[CheckpointMode]
) -> tuple[Any, Any]:
    """The ``upcast`` / ``checkpointing`` to plan with: the caller's, or the preset's where the caller
    left the default (``upcast=None``; ``checkpointing=True``/``None`` when the backend supports the mode)."""
    if upcast is None and modes.upcast is not None:
        upcast = modes.upcast
    if checkpointing in (True, None) and modes.checkpointing is not None:
        wanted = CheckpointMode(modes.checkpointing)
        if wanted in supported:
            checkpointing = wanted.value
    return upcast, checkpointing


# --------------------------------------------------------------------------- where the modes go


def _is_causal_lm_loss(fn: Any) -> bool:
    return getattr(fn, "__name__", "") == "ForCausalLMLoss" and "transformers" in getattr(fn, "__module__", "")


def _output_head(module: nn.Module) -> nn.Module | None:
    getter = getattr(type(module), "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        head = getter(module)
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _causal_lm(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(name, module, why-not) of the transformers causal LM inside ``model`` (also under a PEFT wrapper)."""
    why = f"{type(model).__name__} has no transformers *ForCausalLM inside"
    for name, mod in model.named_modules():
        if not hasattr(type(mod), "get_output_embeddings") or "labels" not in _parameters_of(mod):
            continue
        if _output_head(mod) is None:
            why = f"{type(mod).__name__} has no output embeddings"
            continue
        try:
            loss_fn = mod.loss_function
        except Exception:
            loss_fn = None
        if not _is_causal_lm_loss(loss_fn):
            why = f"{type(mod).__name__} does not use transformers' ForCausalLMLoss"
            continue
        return name, mod, ""
    return "", model, why


def _parameters_of(mod: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(type(mod).forward).parameters
    except (TypeError, ValueError):
        return {}


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return str(name)
    return ""


def _forward_target(model: nn.Module) -> nn.Module:
    """The module whose forward the offload context wraps: the transformers model, else the root."""
    for mod in model.modules():
        if hasattr(type(mod), "gradient_checkpointing_enable") or hasattr(type(mod), "activation_checkpointing_enable"):
            return mod
    return model


def memory_plan(
    modes: MemoryModes, model: nn.Module, checkpointing: CheckpointMode
) -> tuple[dict[str, Any], list[str]]:
    """What the memory modes will do to ``model``: the plan's ``extras`` entry and notes.

    Returns ``({}, [])`` for the default preset.

    Raises:
        InvalidPolicyError: a mode asked for by name does not apply to this model.
    """
    if modes.preset == "default" and not modes.active:
        return {}, []
    notes: list[str] = []
    chunk = modes.chunked_head
    lm_name, head_name = "", ""
    if chunk:
        lm_name, lm, why = _causal_lm(model)
        if why:
            if modes.strict:
                raise InvalidPolicyError(f"memory: the chunked output head does not apply: {why}")
            notes.append(f"memory: chunked output head skipped: {why}")
            chunk = 0
        else:
            head = _output_head(lm)
            assert head is not None
            head_name = _module_name(model, head)
            notes.append(
                f"memory: trained with labels, {type(lm).__name__} computes {head_name} and the loss in "
                f"{chunk}-token chunks and returns logits=None"
            )
    offload = modes.offload
    target = lm if chunk else _forward_target(model)
    target_name = lm_name if chunk else _module_name(model, target)
    if offload:
        devices = {p.device.type for p in model.parameters()}
        if devices <= {"cpu"}:
            notes.append(
                "memory: the model is in CPU memory, so saved tensors already are: offload copies nothing here"
            )
        if checkpointing is CheckpointMode.OFF:
            notes.append("memory: offload without checkpointing moves every saved activation to CPU memory (slow)")
        elif checkpointing is CheckpointMode.NON_REENTRANT:
            notes.append(
                "memory: with non-reentrant checkpointing torch keeps each layer's inputs itself; "
                "offload saves most with reentrant checkpointing"
            )
    if not (chunk or offload):
        return {"memory": {"preset": modes.preset, "chunked_head": 0, "offload": False}}, notes
    spec: dict[str, Any] = {
        "preset": modes.preset,
        "chunked_head": chunk,
        "offload": offload,
        "module": target_name,
        "head": head_name,
    }
    return {"memory": spec}, notes


# --------------------------------------------------------------------------- the chunked head


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(head(hidden), labels, ...)``, computed ``chunk_tokens`` tokens at a time.

    Each chunk's logits are computed, cast to fp32 and reduced to a summed cross-entropy inside a
    (non-reentrant) checkpoint, so at most one chunk's logits exist at a time, in the forward and in
    the backward. Positions whose label is ``ignore_index`` are skipped entirely.

    Args:
        hidden: the last hidden states, ``(..., tokens, hidden)``.
        labels: token ids aligned with ``hidden``; shifted left by one as transformers does
            (ignored when ``shift_labels`` is given).
        head: the output projection (called on ``(n, hidden)`` chunks).
        chunk_tokens: tokens per chunk.
        num_items_in_batch: divide the summed loss by this instead of the number of counted tokens
            (what transformers' Trainer passes under gradient accumulation).
        ignore_index: the label value that does not count.
        shift_labels: labels already shifted (transformers' ``shift_labels`` keyword).

    Returns:
        The scalar fp32 loss (NaN when no token counts and ``num_items_in_batch`` is not given, as
        with transformers).
    """
    if chunk_tokens <= 0:
        raise InvalidPolicyError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if shift_labels is None:
        if labels is None:
            raise InvalidPolicyError("chunked_causal_lm_loss needs labels or shift_labels")
        padded = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = shift_labels.reshape(-1).to(flat_h.device)
    keep = (flat_y != ignore_index).nonzero().squeeze(1)
    h = flat_h.index_select(0, keep)
    y = flat_y.index_select(0, keep)
    total = flat_h[:0].sum().float()  # 0, but part of the graph, so backward works with nothing counted

    def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hc).float(), yc, ignore_index=ignore_index, reduction="sum")

    for start in range(0, h.shape[0], chunk_tokens):
        part = checkpoint(
            chunk_loss, h[start : start + chunk_tokens], y[start : start + chunk_tokens], use_reentrant=False
        )
        total = total + part
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / keep.numel() if keep.numel() else total / 0.0


# --------------------------------------------------------------------------- offloading


_SIDE_STREAMS: dict[tuple[int, str], Any] = {}
_STREAMS_LOCK = threading.Lock()


def _side_stream(device: torch.device, kind: str) -> Any:
    key = (device.index if device.index is not None else torch.cuda.current_device(), kind)
    with _STREAMS_LOCK:
        stream = _SIDE_STREAMS.get(key)
        if stream is None:
            stream = torch.cuda.Stream(device=key[0])
            _SIDE_STREAMS[key] = stream
    return stream


@dataclass
class _OnHost:
    host: torch.Tensor
    device: torch.device
    done: Any  # torch.cuda.Event, or None for a synchronous copy


@dataclass
class OffloadHooks:
    """``saved_tensors_hooks`` that keep tensors saved for backward in CPU memory.

    CUDA tensors of at least ``min_bytes`` (not parameters or views of parameters, which stay where
    they are anyway) are copied into pinned host memory on a side stream that waits for the compute
    stream, so the forward goes on while the copy runs; the caching allocator is told the device
    tensor is in use on that stream (``record_stream``), so its memory is reused only after the copy.
    In the backward each tensor is copied back on the current stream after the copy-out finished
    (non-blocking, from pinned memory). Tensors in CPU memory are kept as they are, so on a CPU model
    the hooks change nothing; ``force_copy=True`` makes them copy those too (through ordinary
    memory, synchronously), which exercises the pack/unpack path without a GPU.

    Attributes:
        min_bytes: smaller tensors stay where they are.
        force_copy: also copy tensors that are already in CPU memory.
        packed: tensors seen by the pack hook (statistics).
        offloaded: tensors moved (or copied) to host memory.
        offloaded_bytes: their bytes.
    """

    min_bytes: int = OFFLOAD_MIN_BYTES
    force_copy: bool = False
    packed: int = 0
    offloaded: int = 0
    offloaded_bytes: int = 0

    def _eligible(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return False
        if type(t) is not torch.Tensor or t.layout is not torch.strided or t.is_quantized:
            return False
        return t.numel() * t.element_size() >= self.min_bytes

    def pack(self, t: torch.Tensor) -> Any:
        """The pack hook: returns the tensor itself or a handle on its host copy."""
        self.packed += 1  # statistics only: not exact if several threads run forwards at once
        if not self._eligible(t):
            return t
        if t.device.type == "cuda":
            side = _side_stream(t.device, "d2h")
            side.wait_stream(torch.cuda.current_stream(t.device))
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            t.record_stream(side)
            packed: Any = _OnHost(host, t.device, done)
        elif t.device.type == "cpu" and self.force_copy:
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout)
            host.copy_(t)
            packed = _OnHost(host, t.device, None)
        else:
            return t
        self.offloaded += 1
        self.offloaded_bytes += t.numel() * t.element_size()
        return packed

    def unpack(self, packed: Any) -> torch.Tensor:
        """The unpack hook: the tensor back on its device."""
        if not isinstance(packed, _OnHost):
            return packed  # type: ignore[no-any-return]
        if packed.device.type != "cuda":
            return packed.host
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.done)
        return packed.host.to(packed.device, non_blocking=True)

    def context(self) -> contextlib.AbstractContextManager[None]:
        """The ``torch.autograd.graph.saved_tensors_hooks`` context using these hooks."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# --------------------------------------------------------------------------- installed state


@dataclass
class _MemoryState:
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
        state = vars(module).get(_STATE_ATTR)
        forward = self._orig()
        if not isinstance(state, _MemoryState):
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

    def _give_up(self, state: _MemoryState, why: str) -> None:
        state.head_fallback = why
        warnings.warn(
            f"kbitprep: the chunked output head does not work with this {type(self.module).__name__} ({why}); "
            "computing full logits instead from now on",
            KbitprepWarning,
            stacklevel=4,
        )

    def _chunked(
        self, state: _MemoryState, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        module = self.module
        head = _output_head(module)
        if head is None or not isinstance(vars(head).get("forward"), _PatchedHead):
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
        untouched = getattr(out, "logits", None) is box[1]  # the forward returned the head's output as is
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
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, **fields)


def apply_memory_modes(model: nn.Module, plan: Plan) -> str:
    """The transaction step that installs the plan's memory modes (see the module docstring).

    Called by the core inside prepare's transaction; returns the label recorded in the report, or
    ``""`` when the plan has no memory mode.
    """
    spec = plan.extras.get("memory")
    if not isinstance(spec, Mapping) or not (spec.get("chunked_head") or spec.get("offload")):
        return ""
    modules = dict(model.named_modules())
    target = modules[spec["module"]]
    chunk = int(spec["chunked_head"])
    state = _MemoryState(chunked_head=chunk, offload=bool(spec["offload"]), prepared_chunk=chunk)
    parts = []
    if state.chunked_head:
        head = modules[spec["head"]]
        head.__dict__["forward"] = _PatchedHead(head, head.__dict__.get("forward"))
        parts.append(f"chunked output head ({state.chunked_head}-token chunks)")
    if state.offload:
        parts.append("offloaded checkpointing (pinned CPU memory, side CUDA stream)")
    target.__dict__["forward"] = _PatchedForward(target, target.__dict__.get("forward"))
    target.__dict__[_STATE_ATTR] = state
    return "memory: " + " + ".join(parts)


def _state_of(model: nn.Module) -> _MemoryState | None:
    for mod in model.modules():
        state = vars(mod).get(_STATE_ATTR)
        if isinstance(state, _MemoryState):
            return state
    return None


def memory_modes(model: nn.Module) -> dict[str, Any]:
    """The memory modes active on a prepared model: ``{"chunked_head": tokens, "offload": bool, ...}``.

    ``offloaded`` / ``offloaded_bytes`` count the tensors the offload hooks moved so far, and
    ``chunked_head_fallback`` says why the chunked head was given up, if it was.
    """
    state = _state_of(model)
    if state is None:
        return {
            "chunked_head": 0,
            "offload": False,
            "packed": 0,
            "offloaded": 0,
            "offloaded_bytes": 0,
            "chunked_head_fallback": "",
        }
    return {
        "chunked_head": state.chunked_head,
        "offload": state.offload,
        "packed": state.offloader.packed,
        "offloaded": state.offloader.offloaded,
        "offloaded_bytes": state.offloader.offloaded_bytes,
        "chunked_head_fallback": state.head_fallback,
    }


def set_memory_modes(
    model: nn.Module, *, chunked_head: bool | int | None = None, offload: bool | None = None
) -> dict[str, Any]:
    """Switch the memory modes prepare installed off or on again at run time (``None`` leaves one as is).

    Only modes chosen at prepare can be switched (``chunked_head=True`` restores the prepared chunk
    size; an int sets a new one). Returns the modes as they were, for restoring.

    Raises:
        NotPreparedError: no memory mode was installed on this model.
        InvalidPolicyError: asking for a mode prepare did not install, or an invalid value.
    """
    state = _state_of(model)
    if state is None:
        raise NotPreparedError(
            "no memory mode is installed on this model; prepare it with kbitprep.prepare(model, memory=...)"
        )
    before = {"chunked_head": state.chunked_head, "offload": state.offload}
    if chunked_head is not None:
        if chunked_head is False:
            tokens = 0
        elif chunked_head is True:
            tokens = state.prepared_chunk
        elif isinstance(chunked_head, int) and chunked_head > 0:
            tokens = chunked_head
        else:
            raise InvalidPolicyError(f"chunked_head={chunked_head!r} is not valid; use True, False or a token count")
        if chunked_head is not False and not state.prepared_chunk:
            raise InvalidPolicyError(
                "the chunked output head was not installed at prepare; prepare with memory='chunked_head' first"
            )
        state.chunked_head = tokens
    if offload is not None:
        if not isinstance(offload, bool):
            raise InvalidPolicyError(f"offload={offload!r} is not valid; use True or False")
        state.offload = offload
    return before


@contextlib.contextmanager
def full_logits(model: nn.Module) -> Iterator[None]:
    """Within the block, a model with the chunked head computes and returns full logits."""
    before = set_memory_modes(model, chunked_head=False)
    try:
        yield
    finally:
        set_memory_modes(model, chunked_head=before["chunked_head"] or False)
