"""The chunked output head's loss: transformers' causal-LM loss computed a chunk of tokens at a time,
with the transform a family applies between its head and the loss (soft-capping, scaling), and the
per-token statistics TRL's fused head returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._anatomy import text_config
from ..errors import InvalidPolicyError
from .options import DEFAULT_CHUNK_TOKENS

__all__ = ["TOKEN_STATS", "HeadTransform", "chunked_causal_lm_loss", "chunked_token_stats", "head_transform"]


@dataclass(frozen=True)
class HeadTransform:
    """What a causal LM's forward does to its head's output before the loss, in the order it does it:
    multiply by ``multiplier`` (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``), divide
    by ``divisor`` (Granite's ``logits_scaling``), then soft-cap (Gemma 2/3's
    ``final_logit_softcapping``: ``cap * tanh(x / cap)``). The identity for most families.
    """

    multiplier: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        """Whether the head's output is the logits as they are."""
        return self.multiplier == 1.0 and self.divisor == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the transform with the same operations, in the same order and dtype, as transformers."""
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def describe(self) -> str:
        """``"logits x 0.0625"``, ``"soft-capped at 30.0"``...; empty for the identity."""
        parts = []
        if self.multiplier != 1.0:
            parts.append(f"logits x {self.multiplier:g}")
        if self.divisor != 1.0:
            parts.append(f"logits / {self.divisor:g}")
        if self.softcap is not None:
            parts.append(f"soft-capped at {self.softcap:g}")
        return ", ".join(parts)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def head_transform(config: Any) -> HeadTransform:
    """The :class:`HeadTransform` a causal LM with this config applies between its head and its loss.

    Reads the keys transformers' forwards (and TRL's fused head) read: ``final_logit_softcapping``,
    ``logit_scale`` / ``output_multiplier`` and ``lm_head_multiplier`` (multiplied), ``logits_scaling``
    (divided; multiplied for HyperCLOVA X). Nested text configs (``get_text_config()``) count.
    """
    text = text_config(config)
    values: Mapping[str, Any] = {} if text is None else vars(text)
    softcap = _number(values.get("final_logit_softcapping"))
    multiplier = 1.0
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        found = _number(values.get(key))
        if found is not None:
            multiplier = found
            break
    divisor = 1.0
    scaling = _number(values.get("logits_scaling"))
    if scaling is not None and multiplier == 1.0:
        if values.get("model_type") == "hyperclovax":
            multiplier = scaling
        else:
            divisor = scaling
    return HeadTransform(multiplier=multiplier, divisor=divisor, softcap=softcap)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    transform: HeadTransform | None = None,
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
        transform: what the model does to the head's output before the loss (soft-capping, scaling).

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
        out = head(hc)
        logits = (transform(out) if transform is not None else out).float()
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


#: The per-token statistics :func:`chunked_token_stats` can compute (TRL's ``FusedCausalLMOutput`` fields).
TOKEN_STATS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def chunked_token_stats(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    transform: HeadTransform | None = None,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    fp32_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of ``head(hidden)`` against ``targets``, ``chunk_tokens`` tokens at a time.

    What TRL's fused head (``model(..., fused_lm_head=True)``) computes, with at most one chunk's
    logits alive at a time, in the forward and (recomputed chunk by chunk by :class:`_ChunkStats`'s own
    backward) in the backward: ``log_probs`` (of each target under the temperature-scaled distribution) and
    ``entropy`` carry gradients; ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (the target is
    the first most likely token) do not.

    Args:
        hidden: ``(n, hidden)`` states of the counted positions.
        targets: ``(n,)`` token ids.
        head: the output projection.
        transform: what the model does to the head's output first (soft-capping, scaling).
        temperature: the logits are divided by it.
        outputs: which of :data:`TOKEN_STATS` to return (``log_probs`` always).
        chunk_tokens: tokens per chunk.
        fp32_head: run the projection in fp32 outside autocast (TRL's ``cast_lm_head_to_fp32``).

    Returns:
        ``{name: (n,) tensor}`` for ``log_probs`` and each requested statistic.
    """
    if chunk_tokens <= 0:
        raise InvalidPolicyError(f"chunk_tokens must be positive, got {chunk_tokens}")
    wanted = ("log_probs", *(k for k in TOKEN_STATS[1:] if k in outputs))
    setup = _ChunkSetup(head, transform, temperature, fp32_head, wanted)
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        hc, yc = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        parts.append(_ChunkStats.apply(hc, yc, setup))
    if not parts:  # nothing counted: empty results, still part of the graph
        empty = hidden[:0].sum(-1).float()
        return {k: (empty.bool() if k == "is_top1" else empty) for k in wanted}
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(wanted)}


@dataclass(frozen=True)
class _ChunkSetup:
    head: Callable[[torch.Tensor], torch.Tensor]
    transform: HeadTransform | None
    temperature: float
    fp32_head: bool
    wanted: tuple[str, ...]

    def logits(self, hc: torch.Tensor) -> torch.Tensor:
        """The chunk's fp32 logits, transformed and divided by the temperature."""
        if self.fp32_head:
            with torch.autocast(hc.device.type, enabled=False):
                out = self.head(hc.float())
        else:
            out = self.head(hc)
        return (self.transform(out) if self.transform is not None else out).float() / self.temperature


class _ChunkStats(torch.autograd.Function):
    """One chunk's per-token statistics with a hand-written backward, so that only one chunk's logits
    (and their softmax) exist at a time: the forward keeps the per-token log-normalisers, the backward
    recomputes the chunk's logits through the head, forms their gradient from the softmax in place
    (``d log p_y / dz = onehot(y) - p``; ``d H / dz = -p (log p + H)``) and sends it back through the
    head (its trainable parameters get their gradients there, as with reentrant checkpointing)."""

    @staticmethod
    def forward(ctx: Any, hc: torch.Tensor, yc: torch.Tensor, setup: _ChunkSetup) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        device = hc.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        z = setup.logits(hc)
        y = yc.to(z.device)
        lse = torch.logsumexp(z, dim=-1)
        found = [z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse]
        entropy = None
        if "entropy" in setup.wanted:
            p = (z - lse.unsqueeze(-1)).exp_()
            entropy = lse - (p.mul_(z)).sum(-1)
            del p
            found.append(entropy)
        if "log_sum_sq_probs" in setup.wanted:
            found.append(torch.logsumexp(2 * z, dim=-1) - 2 * lse)
        if "mean_logits" in setup.wanted:
            found.append(z.mean(-1))
        if "is_top1" in setup.wanted:
            found.append(z.argmax(-1) == y)
        ctx.setup = setup
        ctx.save_for_backward(hc, y, lse, lse if entropy is None else entropy)
        ctx.mark_non_differentiable(*found[2 if entropy is not None else 1 :])
        return tuple(found)

    @staticmethod
    def backward(ctx: Any, grad_lp: torch.Tensor | None, *grads: torch.Tensor | None) -> Any:  # type: ignore[override]
        hc, y, lse, entropy = ctx.saved_tensors
        setup: _ChunkSetup = ctx.setup
        grad_ent = grads[0] if "entropy" in setup.wanted and grads else None
        if grad_lp is None and grad_ent is None:
            return None, None, None
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(hc.device.type, dtype=dtype, enabled=enabled):
            h = hc.detach().requires_grad_(hc.requires_grad)
            z = setup.logits(h)
        with torch.no_grad():
            log_p = z.detach() - lse.unsqueeze(-1)
            p = log_p.exp()
            term = log_p.add_(entropy.unsqueeze(-1)).mul_(p) if grad_ent is not None else None  # p (log p + H)
            g = p.mul_(-grad_lp.unsqueeze(-1)) if grad_lp is not None else p.zero_()
            if grad_lp is not None:
                g.scatter_add_(-1, y.unsqueeze(-1), grad_lp.unsqueeze(-1).to(g.dtype))
            if term is not None and grad_ent is not None:
                g.sub_(term.mul_(grad_ent.unsqueeze(-1)))
            del term, log_p
        if z.requires_grad:
            torch.autograd.backward(z, g)
        return (h.grad if hc.requires_grad else None), None, None
