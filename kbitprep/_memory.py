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
  forward (with reentrant or non-reentrant checkpointing alike: the inputs of each checkpointed
  layer, plus what the embedding saves) are kept in pinned CPU memory, each storage copied once;
  what the backward needs first (from the output head on, and the tensor saved just before it)
  stays on the device. The device-to-host copies run on a side CUDA stream so the forward does not
  wait for them; the backward copies each storage back on the compute stream once its copy-out
  ended (no prefetch; see :class:`OffloadHooks`). Where tensors already live in CPU memory (a CPU
  model) nothing is copied and training is unchanged.
* **presets** (``memory="lowest"``): no upcast + reentrant checkpointing + chunked head + offload.

The modes are chosen with ``kbitprep.plan(model, memory=...)`` / ``kbitprep.prepare(model,
memory=...)``, carried by the plan (``plan.extras["memory"]``) and installed by
:func:`apply_memory_modes`, a step of the core's atomic transaction (``kbitprep._mutation``): it
sets instance attributes (``forward`` and ``_replicate_for_data_parallel`` of the causal-LM module
and of its output head, and a state object), so a failing prepare and :func:`kbitprep.undo` remove
them exactly. Nothing in this module changes a model outside that step.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InvalidPolicyError, KbitprepWarning, NotPreparedError, UnsupportedModelError
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
    "full_logits",
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
    "offload": "tensors saved for backward kept in pinned CPU memory (each storage copied once, on a side "
    "CUDA stream; what the backward needs first stays on the device)",
    "lowest": "no upcast + reentrant checkpointing + chunked output head + offloaded checkpointing",
}
"""The named memory presets (``memory=`` of :func:`kbitprep.plan` / :func:`kbitprep.prepare`), each with
a one-line description of what it does; the keys are the valid preset names."""

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
        required: whether a mode that does not apply to the model is an error (a mode asked for by
            name) rather than a note (a combined preset skips what does not apply).
    """

    preset: str = "default"
    chunked_head: int = 0
    offload: bool = False
    upcast: str | None = None
    checkpointing: str | None = None
    required: bool = True

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
            required=False,
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
            modes = replace(modes, chunked_head=tokens, required=True)
        if "offload" in memory:
            value = memory["offload"]
            if not isinstance(value, bool):
                raise InvalidPolicyError(f"memory['offload']={value!r} is not valid; use True or False")
            modes = replace(modes, offload=value, required=True)
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
    offload = modes.offload
    replicated = _data_parallel_name(model)
    if replicated is not None and (chunk or offload):
        why = (
            f"the model is wrapped in torch.nn.DataParallel ({replicated or 'the root'}), whose replicas would run "
            "the original module's patched forward; use DistributedDataParallel (one process per GPU)"
        )
        if modes.required:
            raise InvalidPolicyError(f"memory: the memory modes do not apply: {why}")
        notes.append(f"memory: chunked output head and offload skipped: {why}")
        chunk, offload = 0, False
    lm_name, head_name = "", ""
    if chunk:
        lm_name, lm, why = _causal_lm(model)
        if why:
            if modes.required:
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
    target = lm if chunk else _forward_target(model)
    target_name = lm_name if chunk else _module_name(model, target)
    if offload:
        if not head_name:
            out_head = _output_head(target)
            head_name = _module_name(model, out_head) if out_head is not None else ""
        devices = {p.device.type for p in model.parameters()}
        if devices <= {"cpu"}:
            notes.append(
                "memory: the model is in CPU memory, so saved tensors already are: offload copies nothing here"
            )
        if checkpointing is CheckpointMode.OFF:
            notes.append("memory: offload without checkpointing moves every saved activation to CPU memory (slow)")
        # With reentrant and non-reentrant checkpointing alike the offload hooks see each checkpointed
        # layer's inputs (torch >= 2.4 saves the non-reentrant inputs through the active saved-tensor hooks):
        # offload moves the same tensors either way (test_offload_moves_the_same_tensors_with_either_checkpointing).
        notes.append(
            "memory: offload copies each saved storage once; what the backward needs first "
            + (f"(from {head_name} on, and the tensor saved just before)" if head_name else "(the last tensor saved)")
            + " stays on the device"
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


def _data_parallel_name(model: nn.Module) -> str | None:
    """The name of a ``torch.nn.DataParallel`` module in ``model`` (``""``: the root), or ``None``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.DataParallel):
            return str(name)
    return None


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
        logits = head(hc).float()
        # the head may compute on another device than the hidden states (accelerate's device_map hooks):
        # labels go where the logits are, as in transformers' loss
        return F.cross_entropy(logits, yc.to(logits.device), ignore_index=ignore_index, reduction="sum")

    for start in range(0, h.shape[0], chunk_tokens):
        part = checkpoint(
            chunk_loss, h[start : start + chunk_tokens], y[start : start + chunk_tokens], use_reentrant=False
        )
        total = part + total.to(part.device)  # the loss ends on the logits' device, as transformers'
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / keep.numel() if keep.numel() else total / 0.0


# --------------------------------------------------------------------------- offloading


_SIDE_STREAMS: dict[tuple[int, str], Any] = {}
_STREAMS_LOCK = threading.Lock()
_COUNT_LOCK = threading.Lock()

#: Test hook, not for users: called as ``_BEFORE_COPY(kind, stream)`` right before each copy is
#: enqueued (``kind`` is ``"d2h"`` or ``"h2d"``, ``stream`` the CUDA stream the copy runs on, ``None``
#: on CPU). The GPU test delays the copy stream through it, so a missing stream wait shows.
_BEFORE_COPY: Callable[[str, Any], None] | None = None


def _side_stream(device: torch.device, kind: str) -> Any:
    key = (device.index if device.index is not None else torch.cuda.current_device(), kind)
    with _STREAMS_LOCK:
        stream = _SIDE_STREAMS.get(key)
        if stream is None:
            stream = torch.cuda.Stream(device=key[0])
            _SIDE_STREAMS[key] = stream
    return stream


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` of ``t``'s storage that ``t`` reads (strides are never negative)."""
    size = t.element_size()
    first = int(t.storage_offset())
    last = first + sum((int(n) - 1) * int(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return first * size, (last + 1) * size


def _view(
    storage: torch.UntypedStorage,
    device: torch.device,
    byte_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """A tensor of ``dtype`` over ``storage`` at ``byte_offset`` (a multiple of the element size)."""
    out = torch.empty((0,), dtype=dtype, device=device)
    out.set_(storage, byte_offset // dtype.itemsize, size, stride)  # type: ignore[call-overload]
    return out


def _copy_to_host(src: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Copy ``src`` (bytes of a device storage) to host memory; every offload copy goes through here.

    CUDA: into pinned memory, asynchronously, on the side stream ``d2h`` after it waited for the
    compute stream (which wrote ``src``); ``src``'s block is recorded on the side stream, so the
    caching allocator hands it out again only after the copy. Returns the host tensor and the event
    that marks the end of the copy. Elsewhere (the ``force_copy`` path on CPU): a synchronous copy
    into ordinary memory and no event.
    """
    if src.device.type != "cuda":
        host = torch.empty(src.shape, dtype=src.dtype)
        if _BEFORE_COPY is not None:
            _BEFORE_COPY("d2h", None)
        host.copy_(src)
        return host, None
    side = _side_stream(src.device, "d2h")
    side.wait_stream(torch.cuda.current_stream(src.device))
    host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    with torch.cuda.stream(side):
        if _BEFORE_COPY is not None:
            _BEFORE_COPY("d2h", side)
        host.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    src.record_stream(side)
    return host, done


class _Span:
    """A region of a device storage saved for backward: copied to host memory at most once.

    Every saved tensor that lies inside the region (the same tensor saved by several ops, views of
    it) shares the one copy. Until it is copied (or for good, when the backward needs it first)
    ``source`` holds the device tensor.
    """

    __slots__ = (
        "__weakref__",
        "cached",
        "device",
        "done",
        "hi",
        "host",
        "lo",
        "ready",
        "source",
        "stale",
        "storage",
        "users",
        "version",
    )

    def __init__(self, t: torch.Tensor, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.device = t.device
        self.version = t._version
        self.storage = weakref.ref(t.untyped_storage())  # alive => the same memory (no address reuse)
        self.source: torch.Tensor | None = t
        self.host: torch.Tensor | None = None
        self.done: Any = None  # CUDA event: the copy to the host finished
        self.cached: torch.Tensor | None = None  # the copy back, while saved tensors still unpack it
        self.ready: Any = None  # CUDA event: the copy back finished
        self.users = 0  # saved tensors that unpack this span
        self.stale = False  # changed in place before it was copied: unpacking raises, as autograd does


class _Saved:
    """What the pack hook returns for an offloaded tensor: its span and how to view it."""

    __slots__ = ("dtype", "offset", "size", "span", "stride", "version")

    def __init__(self, span: _Span, t: torch.Tensor, offset: int) -> None:
        self.span = span
        self.offset = offset
        self.size = tuple(t.shape)
        self.stride = tuple(t.stride())
        self.dtype = t.dtype
        self.version = t._version


_INPLACE_MESSAGE = (
    "one of the variables needed for gradient computation has been modified by an inplace operation "
    "(kbitprep offload: a tensor saved for backward was changed in place after it was saved)"
)


class _OffloadSession:
    """The hooks of one forward: deduplication by storage, and the newest span held back."""

    def __init__(self, hooks: OffloadHooks) -> None:
        self.hooks = hooks
        self.spans: dict[tuple[int, str], list[_Span]] = {}
        self.pending: list[_Span] = []
        self.tail = False  # the output head started: the backward needs what follows first

    def _find(self, key: tuple[int, str], storage: Any, t: torch.Tensor, lo: int, hi: int) -> _Span | None:
        spans = self.spans.get(key)
        if not spans:
            return None
        spans[:] = [s for s in spans if s.storage() is not None]
        for span in spans:
            if (
                span.storage() is storage
                and span.lo <= lo
                and hi <= span.hi
                and (lo - span.lo) % t.element_size() == 0
                and span.version == t._version
                and not span.stale
            ):
                return span
        return None

    def start_tail(self) -> None:
        """The output head starts: what is still held back and everything saved from now on stays."""
        self.tail = True

    def pack(self, t: torch.Tensor) -> Any:
        hooks = self.hooks
        with _COUNT_LOCK:
            hooks.packed += 1  # statistics
        if not hooks._eligible(t):
            return t
        if t.device.type != "cuda" and not (t.device.type == "cpu" and hooks.force_copy):
            return t
        if self.tail:
            with _COUNT_LOCK:
                hooks.kept += 1
            return t
        lo, hi = _byte_span(t)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        span = self._find(key, storage, t, lo, hi)
        if span is None:
            span = _Span(t, lo, hi)
            self.spans.setdefault(key, []).append(span)
            self.flush()  # the spans before this one; this one waits: it may be what the backward needs first
            self.pending.append(span)
        else:
            with _COUNT_LOCK:
                hooks.deduped += 1
        span.users += 1
        return _Saved(span, t, lo)

    def flush(self) -> None:
        """Copy the held-back spans to host memory and let go of their device tensors."""
        pending, self.pending = self.pending, []
        for span in pending:
            src, span.source = span.source, None
            assert src is not None
            if src._version != span.version:
                span.stale = True
                continue
            n = span.hi - span.lo
            host, done = _copy_to_host(_view(src.untyped_storage(), src.device, span.lo, (n,), (1,), torch.uint8))
            span.host, span.done = host, done
            self.hooks._hold(span, n)

    def close(self) -> None:
        """End of the forward: what is still held back stays on the device."""
        kept = sum(span.users for span in self.pending)
        with _COUNT_LOCK:
            self.hooks.kept += kept
        self.pending = []
        self.spans = {}

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Saved):
            return packed  # type: ignore[no-any-return]
        span = packed.span
        source = span.source
        if span.stale or (source is not None and source._version != packed.version):
            raise RuntimeError(_INPLACE_MESSAGE)
        if source is not None:  # held on the device
            storage = source.untyped_storage()
            return _view(storage, source.device, packed.offset, packed.size, packed.stride, packed.dtype)
        buffer = _to_device(span)
        span.users -= 1
        if span.users <= 0:
            span.cached, span.ready = None, None  # the last saved tensor of the span: the view keeps the memory
        return _view(
            buffer.untyped_storage(), buffer.device, packed.offset - span.lo, packed.size, packed.stride, packed.dtype
        )


def _to_device(span: _Span) -> torch.Tensor:
    """The span's bytes back on its device (copied once while its saved tensors unpack)."""
    assert span.host is not None
    if span.device.type != "cuda":
        return span.host
    current = torch.cuda.current_stream(span.device)
    if span.cached is not None:
        current.wait_event(span.ready)
        span.cached.record_stream(current)
        return span.cached
    current.wait_event(span.done)  # the copy to the host finished
    with torch.cuda.stream(current):
        if _BEFORE_COPY is not None:
            _BEFORE_COPY("h2d", current)
        buffer = span.host.to(span.device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(current)
    span.cached, span.ready = buffer, ready
    return buffer


_SESSION: contextvars.ContextVar[_OffloadSession | None] = contextvars.ContextVar("kbitprep_offload", default=None)


@dataclass
class OffloadHooks:
    """``saved_tensors_hooks`` that keep tensors saved for backward in CPU memory.

    CUDA tensors of at least ``min_bytes`` (not parameters or views of parameters, which stay where
    they are anyway) are copied into pinned host memory, on a side CUDA stream that first waits for
    the compute stream, so the forward goes on while the copy runs; the device block is recorded on
    that stream (``record_stream``), so the caching allocator reuses it only after the copy.

    * **Each storage once.** Within one forward (one :meth:`context`), a tensor that lies inside a
      region already copied (the same tensor saved by several ops, a view of it) shares that copy,
      in the forward and in the backward (copied back once, viewed as each saved tensor).
    * **Not what the backward needs first.** The newest region is held back on the device until
      another one is saved; when the forward ends, or when the model's output head starts (the
      patched head tells the running context), what is held back and everything saved after it
      stays on the device: the head's and the loss's tensors, and the last layer's output the final
      norm saved, which the backward uses at once. Copying them would be pure traffic.
    * **Back in the backward**: on the current (compute) stream, after it waited for the copy-out's
      event, from pinned memory without blocking the host. There is no prefetch: the copy of a
      layer's inputs (``tokens x hidden`` bytes) is small next to the layer's recomputation.

    A tensor changed in place after it was saved raises at unpack, as autograd does. Tensors in CPU
    memory are kept as they are, so on a CPU model the hooks change nothing; ``force_copy=True``
    copies those too (through ordinary memory, synchronously), which runs the whole pack / unpack /
    deduplication path without a GPU.

    Attributes:
        min_bytes: smaller tensors stay where they are.
        force_copy: also copy tensors that are already in CPU memory.
        packed: tensors seen by the pack hook (statistics, not exact if several threads run forwards).
        offloaded: copies made to host memory (one per distinct storage region).
        offloaded_bytes: their bytes.
        deduped: saved tensors that shared an earlier copy instead of making one.
        kept: eligible saved tensors left on the device because the backward needs them first.
        host_bytes: host bytes the copies hold now (pinned memory on CUDA).
        peak_host_bytes: the most they held at once.
    """

    min_bytes: int = OFFLOAD_MIN_BYTES
    force_copy: bool = False
    packed: int = 0
    offloaded: int = 0
    offloaded_bytes: int = 0
    deduped: int = 0
    kept: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0

    #: Tensor types that hold plain values (tensor subclasses keep their own storage and are left alone);
    #: the memory estimate adds its fake tensors.
    plain_types: tuple[type, ...] = (torch.Tensor,)

    def _eligible(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return False
        if type(t) not in self.plain_types or t.layout is not torch.strided or t.is_quantized or t.numel() == 0:
            return False
        return t.numel() * t.element_size() >= self.min_bytes

    def _hold(self, span: _Span, n: int) -> None:
        with _COUNT_LOCK:
            self.offloaded += 1
            self.offloaded_bytes += n
            self.host_bytes += n
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        weakref.finalize(span, self._release, n)

    def _release(self, n: int) -> None:
        with _COUNT_LOCK:
            self.host_bytes -= n

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The ``torch.autograd.graph.saved_tensors_hooks`` context of one forward using these hooks."""
        session = _OffloadSession(self)
        token = _SESSION.set(session)
        try:
            with torch.autograd.graph.saved_tensors_hooks(session.pack, session.unpack):
                yield
        finally:
            _SESSION.reset(token)
            session.close()


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
        session = _SESSION.get()
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
    state = _MemoryState(chunked_head=chunk, offload=bool(spec["offload"]), prepared_chunk=chunk)
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
    target.__dict__[_STATE_ATTR] = state
    return "memory: " + " + ".join(parts)


def _state_of(model: nn.Module) -> _MemoryState | None:
    for mod in model.modules():
        state = vars(mod).get(_STATE_ATTR)
        if isinstance(state, _MemoryState):
            return state
    return None


_COUNTERS = ("packed", "offloaded", "offloaded_bytes", "deduped", "kept", "host_bytes", "peak_host_bytes")


def memory_modes(model: nn.Module) -> dict[str, Any]:
    """The memory modes active on a prepared model: ``{"chunked_head": tokens, "offload": bool, ...}``.

    The offload counters (see :class:`OffloadHooks`) add up over the forwards so far: ``packed``
    (saved tensors seen), ``offloaded`` / ``offloaded_bytes`` (copies to host memory, one per
    distinct storage region, and their bytes), ``deduped`` (saved tensors that shared a copy),
    ``kept`` (left on the device because the backward needs them first), ``host_bytes`` /
    ``peak_host_bytes`` (pinned host memory the copies hold now / at most). ``chunked_head_fallback``
    says why the chunked head was given up, if it was.
    """
    state = _state_of(model)
    out: dict[str, Any] = {
        "chunked_head": state.chunked_head if state else 0,
        "offload": state.offload if state else False,
    }
    for name in _COUNTERS:
        out[name] = int(getattr(state.offloader, name, 0)) if state else 0
    out["chunked_head_fallback"] = state.head_fallback if state else ""
    return out


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
    """Within the block, a model prepared with the chunked head computes and returns full logits.

    For code that reads ``outputs.logits`` while training (metrics, distillation); the chunk size
    prepared is restored on exit, also after an exception.

    Raises:
        NotPreparedError: no memory mode was installed on this model.
    """
    before = set_memory_modes(model, chunked_head=False)
    try:
        yield
    finally:
        set_memory_modes(model, chunked_head=before["chunked_head"] or False)
