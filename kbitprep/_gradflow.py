"""The gradient-flow check: a tiny forward/backward that proves trainable parameters get gradients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GradientFlowError, InvalidModelError

__all__ = ["GradientFlowResult", "verify_gradient_flow"]


@dataclass(frozen=True)
class GradientFlowResult:
    """Outcome of :func:`verify_gradient_flow`.

    Attributes:
        checked: trainable parameters checked (when the model has none yet, one frozen parameter
            inside a layer is made trainable for the probe, standing in for an adapter).
        with_grad: how many received a gradient.
        zero_grad: names of those whose gradient is all zeros (expected for LoRA A at step 0,
            since LoRA B starts at zero).
        output_requires_grad: whether the model's output required grad (gradients can flow into
            the frozen network, where adapters will sit).
        loss: the probe loss.
    """

    checked: int
    with_grad: int
    zero_grad: tuple[str, ...]
    output_requires_grad: bool
    loss: float

    @property
    def ok(self) -> bool:
        """Whether the check passed."""
        return self.checked == self.with_grad and self.output_requires_grad


def _default_inputs(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) if cfg is not None else None
    emb = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(vocab, int) or vocab <= 0:
        raise InvalidModelError(
            f"cannot build probe inputs for {type(model).__name__} (no config.vocab_size); "
            "pass inputs={...} to verify_gradient_flow"
        )
    device = next(
        (p.device for p in (emb.parameters() if isinstance(emb, nn.Module) else model.parameters())),
        torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 8), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    mapped = out.get("loss") if isinstance(out, Mapping) else None
    if isinstance(mapped, torch.Tensor):
        return mapped
    tensor = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if tensor is None and isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        tensor = out[0]
    if not isinstance(tensor, torch.Tensor):
        raise InvalidModelError(f"cannot derive a loss from the model output ({type(out).__name__})")
    return tensor.float().pow(2).mean()


def verify_gradient_flow(model: nn.Module, inputs: Mapping[str, Any] | None = None) -> GradientFlowResult:
    """Run one forward/backward in training mode and check that gradients flow.

    Every parameter with ``requires_grad`` must receive a gradient. If no parameter is trainable yet
    (adapters not attached), the output must still require grad, which proves gradients will reach
    adapters placed inside the frozen network (this is what the input-require-grads hook is for with
    reentrant checkpointing). Gradients, training mode and the RNG state are restored afterwards.

    Args:
        model: a prepared model (with or without adapters).
        inputs: keyword arguments for ``model(**inputs)``; by default 8 random token ids (with
            ``labels``) for a transformers model.

    Returns:
        The :class:`GradientFlowResult`.

    Raises:
        GradientFlowError: a trainable parameter got no gradient, or nothing can receive one.
        InvalidModelError: no probe inputs could be built; pass ``inputs``.
    """
    feed = dict(inputs) if inputs is not None else _default_inputs(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    probe = None if trainable else _probe_parameter(model)
    if probe is not None:
        probe[1].requires_grad_(True)
        trainable = [probe]
    saved_grads = [p.grad for _, p in trainable]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for _, p in trainable:
                p.grad = None
            out = model(**feed)
            loss = _loss_of(out)
            requires = bool(loss.requires_grad)
            if requires:
                loss.backward()
        missing = [n for n, p in trainable if p.grad is None]
        zero = tuple(n for n, p in trainable if p.grad is not None and not bool(p.grad.ne(0).any()))
        result = GradientFlowResult(len(trainable), len(trainable) - len(missing), zero, requires, float(loss))
    finally:
        for (_, p), g in zip(trainable, saved_grads):
            p.grad = g
        if probe is not None:
            probe[1].requires_grad_(False)
        for m, was in modes:
            m.training = was
    if probe is not None and missing:
        raise GradientFlowError(
            f"a probe parameter inside the model ({probe[0]}) got no gradient, so adapters placed there "
            "would not train: reentrant checkpointing needs the input-require-grads hook"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise GradientFlowError(
            f"{len(missing)} of {len(trainable)} trainable parameters got no gradient ({shown}); "
            "check that checkpointing has the input-require-grads hook (reentrant) or use "
            "checkpointing='non_reentrant'"
        )
    if not requires:
        raise GradientFlowError("the output does not require grad: no parameter of the model can be trained")
    return result


def _probe_parameter(model: nn.Module) -> tuple[str, nn.Parameter] | None:
    """A frozen floating-point parameter inside a checkpointed layer (else anywhere but the input
    embeddings) that stands in for an adapter while no adapter is attached."""
    emb = None
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
    skip = {id(p) for p in emb.parameters()} if isinstance(emb, nn.Module) else set()
    skip |= _quantized_parameter_ids(model)  # quantized storage (e.g. AQLM codebooks) never gets a gradient
    fallback = None
    for _mname, mod in model.named_modules():
        inside_layer = hasattr(mod, "gradient_checkpointing") and not hasattr(type(mod), "get_input_embeddings")
        for pname, p in mod.named_parameters():
            if id(p) in skip or type(p.data) is not torch.Tensor or not p.dtype.is_floating_point:
                continue
            full = f"{_mname}.{pname}" if _mname else pname
            if inside_layer:
                return full, p
            if fallback is None:
                fallback = (full, p)
    return fallback


def _quantized_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters the applied plan marks as quantized storage (empty when kbitprep did not prepare the model)."""
    from ._mutation import prepared_state

    state = prepared_state(model)
    if state is None:
        return set()
    names = {a for p in state.report.plan.quantized for a in p.aliases}
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
