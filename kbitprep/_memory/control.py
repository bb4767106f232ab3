"""Reading and switching the installed memory modes at run time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..errors import InvalidPolicyError, NotPreparedError
from .forward import HEAD_CALLS, state_of

__all__ = ["full_logits", "memory_modes", "set_memory_modes"]

_COUNTERS = ("packed", "offloaded", "offloaded_bytes", "deduped", "kept", "host_bytes", "peak_host_bytes")


def memory_modes(model: nn.Module) -> dict[str, Any]:
    """The memory modes active on a prepared model: ``{"chunked_head": tokens, "offload": bool, ...}``.

    The offload counters (see :class:`OffloadHooks`) add up over the forwards so far: ``packed``
    (saved tensors seen), ``offloaded`` / ``offloaded_bytes`` (copies to host memory, one per
    distinct storage region, and their bytes), ``deduped`` (saved tensors that shared a copy),
    ``kept`` (left on the device because the backward needs them first), ``host_bytes`` /
    ``peak_host_bytes`` (pinned host memory the copies hold now / at most). ``chunked_head_fallback``
    says why the chunked head was given up, if it was.

    Which code ran: ``head_calls`` counts training calls by the head that served them (``chunked``:
    kbitprep's chunked loss; ``fused_kbitprep`` / ``fused_trl``: TRL's ``fused_lm_head=True`` calls
    served by kbitprep's chunked head or by TRL's own); ``offload_by`` is ``"kbitprep"`` when kbitprep's
    offload ran in the last forward, or the other mechanism it stepped aside for (TRL's
    ``activation_offloading``, transformers' ``offload=True`` checkpointing), ``""`` before any forward;
    ``head_transform`` what the chunked head applies between the head and the loss (soft-capping, scaling).
    """
    state = state_of(model)
    out: dict[str, Any] = {
        "chunked_head": state.chunked_head if state else 0,
        "offload": state.offload if state else False,
    }
    for name in _COUNTERS:
        out[name] = int(getattr(state.offloader, name, 0)) if state else 0
    out["chunked_head_fallback"] = state.head_fallback if state else ""
    out["head_calls"] = dict(state.head_calls) if state else dict.fromkeys(HEAD_CALLS, 0)
    out["offload_by"] = state.offload_by if state else ""
    out["head_transform"] = state.transform.describe() if state else ""
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
    state = state_of(model)
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
