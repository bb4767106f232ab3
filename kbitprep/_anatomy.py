"""Facts about a model's anatomy that planning and mutation both read: its config objects and the
checkpointing a user may already have enabled on it."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ExistingCheckpointing", "existing_checkpointing", "model_configs"]


def _is_config(obj: Any) -> bool:
    return (
        obj is not None
        and not isinstance(obj, nn.Module)
        and hasattr(obj, "__dict__")
        and hasattr(obj, "to_dict")
        and hasattr(obj, "model_type")
    )


def model_configs(model: nn.Module) -> Iterator[Any]:
    """Every distinct transformers config object reachable from ``model``: each module's ``config``
    and, recursively, the sub-configs they hold (``text_config``, ``vision_config``, ``decoder`` ...)."""
    seen: set[int] = set()
    stack: list[Any] = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if _is_config(cfg):
            stack.append(cfg)
    while stack:
        cfg = stack.pop(0)
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        yield cfg
        for value in list(vars(cfg).values()):
            if _is_config(value) and id(value) not in seen:
                stack.append(value)


@dataclass(frozen=True)
class ExistingCheckpointing:
    """Checkpointing the model already has enabled (by the user, a trainer or an earlier tool).

    Attributes:
        kwargs: the keyword arguments its checkpoint function passes to
            ``torch.utils.checkpoint.checkpoint`` (``use_reentrant`` included when it was given).
        wrapped: the function is not plain ``checkpoint`` (e.g. transformers' offload wrapper).
    """

    kwargs: Mapping[str, Any]
    wrapped: bool

    @property
    def use_reentrant(self) -> bool:
        """Whether it runs reentrant (torch's default when ``use_reentrant`` is not given)."""
        return bool(self.kwargs.get("use_reentrant", True))

    def describe(self) -> str:
        """``use_reentrant=False, preserve_rng_state=False``: the settings, for plans and warnings."""
        items = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return items or "no keyword arguments"


def existing_checkpointing(model: nn.Module) -> ExistingCheckpointing | None:
    """The checkpointing enabled on ``model`` now (transformers' per-layer flags), or ``None``."""
    for mod in model.modules():
        if getattr(mod, "gradient_checkpointing", False) is True:
            func = vars(mod).get("_gradient_checkpointing_func")
            if func is None:
                continue
            if isinstance(func, functools.partial):
                inner = func.func
                kwargs = dict(func.keywords)
            else:
                inner, kwargs = func, {}
            from torch.utils.checkpoint import checkpoint

            return ExistingCheckpointing(kwargs, wrapped=inner is not checkpoint)
    return None
