"""Offloaded checkpointing: saved-tensor hooks that keep what autograd saves for backward in CPU memory."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .options import OFFLOAD_MIN_BYTES

__all__ = ["OffloadHooks", "current_session", "other_offload"]


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
            host, done = self.hooks.copy_to_host(
                _view(src.untyped_storage(), src.device, span.lo, (n,), (1,), torch.uint8)
            )
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
        buffer = self.hooks.copy_to_device(span)
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


def current_session() -> _OffloadSession | None:
    """The offload session of the forward running in this context (thread, task), if any."""
    return _SESSION.get()


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

    def copy_to_host(self, src: torch.Tensor) -> tuple[Any, Any]:
        """Copy ``src`` (bytes of a device storage) to host memory: ``(host copy, end-of-copy event or None)``.

        Every offload copy goes through here (see :func:`_copy_to_host`). A subclass may override it:
        the memory estimate simulates the copy without allocating, for its own hooks only.
        """
        return _copy_to_host(src)

    def copy_to_device(self, span: _Span) -> torch.Tensor:
        """The bytes of ``span`` back on its device, copied once while its saved tensors unpack
        (see :func:`_to_device`); a subclass may override it, as :meth:`copy_to_host`."""
        return _to_device(span)

    def other_offload(self, module: nn.Module) -> str:
        """Another offload running around ``module``'s forward (see :func:`other_offload`), for which these
        hooks step aside; a subclass may override it (the memory estimate's hooks run inside its own tracker)."""
        return other_offload(module)

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


def _describe_hook(pack: Any) -> str:
    owner = getattr(pack, "__self__", None)
    if owner is not None and type(owner).__name__ == "OffloadActivations":
        return "TRL's activation offloading (activation_offloading=True)"
    name = getattr(pack, "__qualname__", "") or type(pack).__name__
    module = getattr(pack, "__module__", "") or ""
    if name.startswith("save_on_cpu."):
        return "torch.autograd.graph.save_on_cpu"
    return f"saved_tensors_hooks of {module}.{name}".strip(".")


def _transformers_offload(module: nn.Module) -> bool:
    """Whether transformers' ``activation_checkpointing_enable(offload=True)`` wraps the layers' checkpoint."""
    for mod in module.modules():
        func = vars(mod).get("_gradient_checkpointing_func")
        inner = getattr(func, "func", func)
        if "_activation_checkpointing_enable.<locals>.checkpoint_func" in getattr(inner, "__qualname__", ""):
            return True
    return False


def other_offload(module: nn.Module) -> str:
    """Another mechanism that keeps saved tensors elsewhere while ``module`` runs, or ``""``.

    Looked up at each forward: saved-tensor hooks already active around the call (TRL's
    ``activation_offloading=True``, a user's ``save_on_cpu``) or transformers' offloading checkpoint
    function (``activation_checkpointing_enable(..., offload=True)``, also through ``Trainer``'s
    ``activation_checkpointing_kwargs={"offload": True}``). kbitprep's offload steps aside for it:
    two offloads at once would copy the same tensors twice or fight over what stays.
    """
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None:
        return _describe_hook(top[0])
    if _transformers_offload(module):
        return "transformers' activation_checkpointing_enable(offload=True)"
    return ""
