"""The chunked output head's loss: transformers' causal-LM loss computed a chunk of tokens at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidPolicyError
from .options import DEFAULT_CHUNK_TOKENS

__all__ = ["chunked_causal_lm_loss"]


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
