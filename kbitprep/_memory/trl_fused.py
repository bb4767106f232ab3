"""TRL's fused-head calls (``model(..., labels=..., fused_lm_head=True)``) on a model with the chunked head.

TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer`` and ``KTOTrainer`` patch the causal LM with
``trl.trainer.utils.add_fused_lm_head`` (after kbitprep's prepare, so kbitprep's patched forward becomes
TRL's ``original_forward``) and call it with ``fused_lm_head=True``: TRL's forward then runs the
backbone and its own chunked log-prob head directly, past kbitprep's chunked head.

Which head serves those calls was decided by measurement (``benchmarks/bench.py --trl``; the table
is in docs/benchmarks.md): on the CPU, kbitprep's chunked head used less memory and time than TRL's
head (which tiles 4,096 tokens x 32,768 vocabulary entries in fp32 temporaries), so a forward pre-hook
on the causal LM turns such a call into a plain call that kbitprep's patched forward answers with
TRL's own output type (:class:`trl.trainer.utils.FusedCausalLMOutput`: the loss, per-token
``log_probs``, ``entropy`` and TRL's other statistics, so TRL's metrics keep working). On CUDA, TRL's
head runs its Triton kernel, which folds each tile in place; it serves there (no GPU measured this
choice yet). The offload context sits on the backbone, so it runs under either head.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._anatomy import text_config as _text_config

__all__ = [
    "FUSED_HEAD_BY_DEVICE",
    "SFT_OUTPUTS",
    "FusedRequest",
    "FusedRouter",
    "clear_request",
    "decide_as_on",
    "fused_output",
    "serving_head",
    "take_request",
    "text_config",
    "trl_settings",
]

#: Which head serves TRL's ``fused_lm_head=True`` calls, by the device type of the output head.
FUSED_HEAD_BY_DEVICE: Mapping[str, str] = {"cpu": "kbitprep", "cuda": "trl"}

#: The outputs SFTTrainer asks TRL's fused head for (``add_fused_lm_head(model, outputs=...)``): its loss
#: needs the log-probabilities, its logged metrics the entropy and the top-1 accuracy.
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")

_TRL_FREEVARS = ("temperature", "outputs", "cast_lm_head_to_fp32", "original_forward")


@dataclass(frozen=True)
class FusedRequest:
    """A ``fused_lm_head=True`` call kbitprep answers: TRL's settings for it, read off TRL's forward."""

    temperature: float
    outputs: tuple[str, ...]
    fp32_head: bool


_REQUEST: contextvars.ContextVar[FusedRequest | None] = contextvars.ContextVar("kbitprep_fused", default=None)
_DEVICE_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("kbitprep_fused_device", default=None)


@contextlib.contextmanager
def decide_as_on(device_type: str) -> Iterator[None]:
    """Within the block, and in this context only (thread, task), decide which head serves fused calls as
    on ``device_type``: the memory estimate simulates a GPU step on fake CPU tensors."""
    token = _DEVICE_AS.set(device_type)
    try:
        yield
    finally:
        _DEVICE_AS.reset(token)


def serving_head(device_type: str) -> str:
    """``"kbitprep"`` or ``"trl"``: which head serves TRL's fused calls on this device type."""
    return FUSED_HEAD_BY_DEVICE.get(_DEVICE_AS.get() or device_type, "trl")


def trl_settings(forward: Any, expected_original: type) -> FusedRequest | None:
    """TRL's settings if ``forward`` is TRL 1.x's ``add_fused_lm_head`` forward wrapping one of kbitprep's
    patched forwards (an instance of ``expected_original``), else ``None`` (TRL's head then serves)."""
    func = getattr(forward, "__func__", None) if isinstance(forward, types.MethodType) else None
    code = getattr(func, "__code__", None)
    # functools.wraps gave it the model's forward's name and module: its code object says what it is
    if code is None or code.co_name != "_fused_forward" or "trl" not in code.co_filename.replace("\\", "/").split("/"):
        return None
    cells = dict(zip(code.co_freevars, getattr(func, "__closure__", None) or (), strict=False))
    if any(name not in cells for name in _TRL_FREEVARS):
        return None
    try:
        values = {name: cells[name].cell_contents for name in _TRL_FREEVARS}
    except ValueError:  # an empty cell
        return None
    if not isinstance(values["original_forward"], expected_original):
        return None
    return FusedRequest(float(values["temperature"]), tuple(values["outputs"]), bool(values["cast_lm_head_to_fp32"]))


def text_config(module: nn.Module) -> Any:
    """The text config of a transformers model (``config.get_text_config()``), or ``None``."""
    return _text_config(getattr(module, "config", None))


def take_request() -> FusedRequest | None:
    """The fused call the pre-hook turned into a plain one, once (the next forward gets ``None``)."""
    request = _REQUEST.get()
    if request is not None:
        _REQUEST.set(None)
    return request


class FusedRouter:
    """Forward pre-hook (with kwargs) on the causal LM: where kbitprep's head serves TRL's fused calls,
    record TRL's settings and pass ``fused_lm_head=False`` on, so TRL's forward calls kbitprep's."""

    def __init__(self, expected_original: type, state_attr: str) -> None:
        self.expected_original = expected_original
        self.state_attr = state_attr

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not kwargs.get("fused_lm_head"):
            return None
        state = vars(module).get(self.state_attr)
        getter: Any = getattr(module, "get_output_embeddings", None)
        weight = getattr(getter() if callable(getter) else None, "weight", None)
        device = weight.device.type if isinstance(weight, torch.Tensor) else "cpu"
        request = trl_settings(vars(module).get("forward"), self.expected_original)
        served = (
            state is not None
            and state.chunked_head
            and not state.head_fallback
            and request is not None
            and serving_head(device) == "kbitprep"
        )
        if not served:
            if state is not None:
                state.count("fused_trl")
            return None
        _REQUEST.set(request)
        return args, {**kwargs, "fused_lm_head": False}


def clear_request(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    """Forward hook (always called, with kwargs): no request outlives its call, also after an exception."""
    _REQUEST.set(None)


def fused_output(
    module: nn.Module,
    out: Any,
    hidden: torch.Tensor,
    kwargs: Mapping[str, Any],
    request: FusedRequest,
    stats: Any,
) -> Any:
    """TRL's ``FusedCausalLMOutput`` for one call, from the captured head input ``hidden`` and the model's
    output ``out`` (its ``aux_loss`` for MoE models); ``stats(hidden, targets)`` computes the per-token
    statistics (kbitprep's chunked head). Positions are shifted and masked as TRL does."""
    from trl.trainer.utils import FusedCausalLMOutput

    shift = kwargs.get("shift_labels")
    if shift is None:
        h, labels = hidden[:, :-1], kwargs["labels"][:, 1:]
    else:
        h, labels = hidden, shift
    labels = labels.to(h.device)
    mask = labels != -100
    found = stats(h[mask], labels[mask])
    per_token = {name: value.new_zeros(mask.shape).masked_scatter(mask, value) for name, value in found.items()}
    log_probs = per_token["log_probs"]
    n_items = kwargs.get("num_items_in_batch")
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if n_items is None else n_items)
    aux_loss = getattr(out, "aux_loss", None)
    if isinstance(aux_loss, torch.Tensor):
        coef = getattr(text_config(module), "router_aux_loss_coef", 0.0)
        loss = loss + coef * aux_loss.to(loss.device)
    else:
        aux_loss = None
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=per_token.get("entropy"),
        log_sum_sq_probs=per_token.get("log_sum_sq_probs"),
        mean_logits=per_token.get("mean_logits"),
        is_top1=per_token.get("is_top1"),
        label_mask=mask,
        aux_loss=aux_loss,
    )
