"""LoRA targeting for any backend: which modules take adapters, and PEFT's config for them.

PEFT's ``target_modules="all-linear"`` finds ``nn.Linear`` and ``Conv1D`` layers and the quantized
classes PEFT knows by type, so it misses layers such as ``HQQLinear`` that do not derive from
``nn.Linear``, and PEFT refuses a layer class it has no LoRA layer for. Here each backend declares
its own adapter targets (by default, the layers it claimed) and, where PEFT has no LoRA layer for
its class, a custom-module mapping; the core adds the model's plain linear layers, leaving out the
output head, as PEFT's ``all-linear`` does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

from torch import nn

from ._anatomy import output_head
from ._registry import Registry, default_registry
from .errors import BackendUnavailableError

__all__ = ["lora_config", "lora_targets"]

#: Class names of the plain linear layers LoRA targets (torch's and transformers' GPT-2 Conv1D).
_PLAIN_LINEAR = ("Linear", "Conv1D")
#: Attributes of PEFT's LoRA layers whose submodules are adapters, never targets.
_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _selected(model: nn.Module, registry: Registry | None, backend: str | None) -> list[tuple[Any, Any]]:
    reg = registry or default_registry()
    sel = reg.select(model, backend)
    return [(det, reg.declare(info, model, det)) for info, det in sel.detections]


def _targets(model: nn.Module, decided: list[tuple[Any, Any]], include_head: bool) -> list[str]:
    claimed: list[str] = []
    for det, decl in decided:
        claimed.extend(decl.lora_targets if decl.lora_targets is not None else det.modules)
    # a backend claiming the root claims the model, not a layer; on a PEFT-wrapped model the backend
    # claims the wrapped ``base_layer``, and the target is the LoRA layer around it
    claimed = [n.removesuffix(".base_layer") for n in claimed if n]
    inside = tuple(f"{n}." for n in claimed)
    head = None if include_head else output_head(model)
    plain: list[str] = []
    for name, mod in model.named_modules():
        if not name or name.startswith(inside) or mod is head or name.endswith(".base_layer"):
            continue
        if any(f".{c}." in f".{name}." for c in _ADAPTER_CONTAINERS):
            continue
        if type(mod).__name__ in _PLAIN_LINEAR:
            plain.append(name)
    names = set(claimed) | set(plain)
    return [n for n, _ in model.named_modules() if n in names]


def lora_targets(
    model: nn.Module, *, include_head: bool = False, registry: Registry | None = None, backend: str | None = None
) -> list[str]:
    """The qualified names of the modules that take LoRA adapters, in model order.

    Every layer the model's backend(s) declare (by default the quantized layers they claimed) and
    every plain ``nn.Linear`` / ``Conv1D`` layer, except the output head (``lm_head``) unless
    ``include_head``. Works on a PEFT-wrapped model too (adapter layers are not targets).

    Raises:
        KbitprepError: no backend recognises the model (see :func:`kbitprep.plan`).
    """
    return _targets(model, _selected(model, registry, backend), include_head)


def _compact(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Leaf names (``q_proj``) where every module of that leaf name is a target, full names otherwise."""
    wanted = set(names)
    by_leaf: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        if name:
            by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    out: list[str] = []
    for leaf, all_named in by_leaf.items():
        hit = [n for n in all_named if n in wanted]
        if not hit:
            continue
        out.extend([leaf] if len(hit) == len(all_named) else hit)
    return sorted(set(out))


def lora_config(
    model: nn.Module,
    r: int = 8,
    *,
    lora_alpha: int | None = None,
    include_head: bool = False,
    registry: Registry | None = None,
    backend: str | None = None,
    **lora_kwargs: Any,
) -> Any:
    """A ``peft.LoraConfig`` that attaches LoRA to every quantized and plain linear layer of ``model``.

    Use it as ``get_peft_model(model, kbitprep.lora_config(model, r=16))``. It works on every
    backend: the targets come from :func:`lora_targets` (so ``HQQLinear`` layers, which PEFT's
    ``"all-linear"`` misses, are included), and a backend whose layer class PEFT has no LoRA layer
    for registers its own through PEFT's custom-module mapping. ``target_modules`` lists leaf
    names (``"q_proj"``) where every module of that name is a target, full names otherwise.

    Args:
        model: the (prepared or not) model.
        r: the LoRA rank.
        lora_alpha: PEFT's ``lora_alpha`` (default ``2 * r``).
        include_head: also target the output head.
        registry: the backend registry, as for :func:`kbitprep.plan`.
        backend: the backend by name, as for :func:`kbitprep.plan`.
        **lora_kwargs: passed to ``peft.LoraConfig`` (``lora_dropout``, ``task_type``, ...).

    Raises:
        BackendUnavailableError: PEFT is not installed.
        InvalidPolicyError: ``target_modules`` was passed (this function chooses them).
    """
    from .errors import InvalidPolicyError

    if "target_modules" in lora_kwargs:
        raise InvalidPolicyError(
            "lora_config() chooses target_modules itself; build peft.LoraConfig directly to choose them, or "
            "use kbitprep.lora_targets(model) as a starting point"
        )
    if importlib.util.find_spec("peft") is None:
        raise BackendUnavailableError("kbitprep.lora_config needs PEFT: pip install peft")
    from peft import LoraConfig

    decided = _selected(model, registry, backend)
    targets = _targets(model, decided, include_head)
    config = LoraConfig(
        r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, target_modules=_compact(model, targets),
        **lora_kwargs,
    )  # fmt: skip
    for _, decl in decided:
        if decl.lora_layers is not None:
            config._register_custom_module(dict(decl.lora_layers()))
    return config
