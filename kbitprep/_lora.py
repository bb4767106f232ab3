"""LoRA targeting for any backend: which modules take adapters, and PEFT's config for them.

PEFT's ``target_modules="all-linear"`` finds ``nn.Linear`` and ``Conv1D`` layers and the quantized
classes PEFT knows by type, so it misses layers such as ``HQQLinear`` that do not derive from
``nn.Linear``, and PEFT refuses a layer class it has no LoRA layer for. Here each backend declares
its own adapter targets (by default, the layers it claimed) and, where PEFT has no LoRA layer for
its class, a custom-module mapping; the core adds the model's plain linear layers, leaving out the
output head, as PEFT's ``all-linear`` does, and the routers of mixture-of-experts layers.

Fused expert weights (the 3-D parameters most MoE families keep their experts in, see
:mod:`kbitprep._experts`) are not modules: ``experts=True`` targets them through PEFT's
``target_parameters``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._anatomy import output_head
from ._experts import expert_parameters, inside, router_modules
from ._registry import Registry, default_registry
from .errors import BackendUnavailableError, InvalidPolicyError

__all__ = ["expert_target_parameters", "lora_config", "lora_targets"]

#: Class names of the plain linear layers LoRA targets (torch's and transformers' GPT-2 Conv1D).
_PLAIN_LINEAR = ("Linear", "Conv1D")
#: Attributes of PEFT's LoRA layers whose submodules are adapters, never targets.
_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _selected(model: nn.Module, registry: Registry | None, backend: str | None) -> list[tuple[Any, Any]]:
    reg = registry or default_registry()
    sel = reg.select(model, backend)
    return [(det, reg.declare(info, model, det)) for info, det in sel.detections]


def _unwrapped(name: str) -> str:
    """``name`` without PEFT's ``base_layer`` steps (the name the module had before LoRA was attached)."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def _targets(model: nn.Module, decided: list[tuple[Any, Any]], include_head: bool, router: bool = False) -> list[str]:
    claimed: list[str] = []
    for det, decl in decided:
        claimed.extend(decl.lora_targets if decl.lora_targets is not None else det.modules)
    # a backend claiming the root claims the model, not a layer; on a PEFT-wrapped model the backend
    # claims the wrapped ``base_layer``, and the target is the LoRA layer around it
    claimed = [n.removesuffix(".base_layer") for n in claimed if n]
    below = tuple(f"{n}." for n in claimed)
    head = None if include_head else output_head(model)
    routers = router_modules(model)
    plain: list[str] = []
    claimed_set = set(claimed)
    for name, mod in model.named_modules():
        if not name or name in claimed_set or name.startswith(below) or mod is head or name.endswith(".base_layer"):
            continue  # the backend's layers are targets already: no probe of their forward
        if any(f".{c}." in f".{name}." for c in _ADAPTER_CONTAINERS):
            continue
        if inside(name, routers):
            if router and isinstance(mod, nn.Linear):  # a router's linear layer, or the router itself (Llama 4)
                plain.append(name)
        elif type(mod).__name__ in _PLAIN_LINEAR or acts_as_linear(mod):
            plain.append(name)
    names = claimed_set | set(plain)
    return [n for n, _ in model.named_modules() if n in names]


def acts_as_linear(mod: nn.Module) -> bool:
    """Whether an ``nn.Linear`` subclass with its own forward (Falcon's ``FalconLinear``) still maps
    ``(..., in_features)`` to ``(..., out_features)`` as ``x @ W.T + b``, so a LoRA layer can wrap it;
    DeepSeek-V4's grouped projection and routers that return a tuple do not. Probed with one forward
    on the meta device (no memory, no data); ``nn.Linear`` itself is not probed."""
    if not isinstance(mod, nn.Linear) or type(mod).forward is nn.Linear.forward:
        return isinstance(mod, nn.Linear)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        return False
    try:
        meta = {
            name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            for name, t in (*mod.named_parameters(), *mod.named_buffers())
        }
        x = torch.empty((2, 3, mod.in_features), dtype=weight.dtype, device="meta")
        with torch.no_grad():
            out = torch.func.functional_call(mod, meta, (x,))
    except Exception:  # a forward that needs something else than a plain input is not a linear map
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 3, mod.out_features)


def lora_targets(
    model: nn.Module,
    *,
    include_head: bool = False,
    router: bool = False,
    registry: Registry | None = None,
    backend: str | None = None,
) -> list[str]:
    """The qualified names of the modules that take LoRA adapters, in model order.

    Every layer the model's backend(s) declare (by default the quantized layers they claimed) and
    every plain ``nn.Linear`` / ``Conv1D`` layer, except the output head (``lm_head``) unless
    ``include_head``, and except the linear layers of mixture-of-experts routers (modules whose
    class name ends in ``Router``, such as ``Llama4Router``) unless ``router``. Works on a
    PEFT-wrapped model too (adapter layers are not targets). Fused expert weights are parameters,
    not modules: see :func:`expert_target_parameters`.

    Raises:
        KbitprepError: no backend recognises the model (see :func:`kbitprep.plan`).
    """
    return _targets(model, _selected(model, registry, backend), include_head, router)


def expert_target_parameters(model: nn.Module, *, router: bool = False) -> list[str]:
    """The qualified names of the parameters LoRA reaches through PEFT's ``target_parameters``, in model order.

    The fused expert weights (3-D parameters, see :func:`kbitprep._experts.expert_parameters`) and,
    with ``router``, the weights of routers that are not ``nn.Linear`` layers (those are modules,
    targeted by :func:`lora_targets` with ``router=True``). Names are those of the model without
    LoRA (PEFT's ``base_layer`` steps removed); none of them is quantized storage.
    """
    names = [_unwrapped(n) for n, _ in expert_parameters(model)]
    if router:
        linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        for root in router_modules(model):
            mod = model.get_submodule(root)
            for local, p in mod.named_parameters():
                owner = f"{root}.{local}".rpartition(".")[0]
                if p.dim() == 2 and p.dtype.is_floating_point and owner not in linear and "lora_" not in local:
                    names.append(_unwrapped(f"{root}.{local}"))
    order = {_unwrapped(n): i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


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


def _compact_parameters(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``experts.gate_up_proj`` (owner's leaf name and parameter name, which PEFT matches as a suffix)
    where every parameter ending so is wanted, full names otherwise."""
    wanted = set(names)
    by_suffix: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        plain = _unwrapped(name)
        parts = plain.split(".")
        if len(parts) >= 2:
            by_suffix.setdefault(".".join(parts[-2:]), []).append(plain)
    out: list[str] = []
    for suffix, all_named in by_suffix.items():
        hit = [n for n in all_named if n in wanted]
        if hit:
            out.extend([suffix] if len(hit) == len(all_named) else hit)
    out.extend(n for n in wanted if len(n.split(".")) < 2)
    return sorted(set(out))


def target_parameters(model: nn.Module, *, experts: bool, router: bool) -> list[str]:
    """PEFT's ``target_parameters`` for :func:`lora_config`'s ``experts`` and ``router`` (compacted; empty
    when neither is asked for or the model has no such parameter)."""
    if not (experts or router):
        return []
    names = expert_target_parameters(model, router=router)
    if not experts:  # router=True alone: only the routers' own weights
        fused = {_unwrapped(n) for n, _ in expert_parameters(model)}
        names = [n for n in names if n not in fused]
    return _compact_parameters(model, names) if names else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidPolicyError(
            f"{name}={value!r} is not a LoRA rank: pass a positive integer (8, 16 and 64 are usual); "
            "nothing was changed"
        )


def _check_alpha(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise InvalidPolicyError(
            f"{name}={value!r} is not a LoRA alpha: pass a positive number (2 * r is usual; the adapters' "
            "output is scaled by alpha / r, so 0 or a negative value trains nothing or backwards); nothing was changed"
        )


def _check_options(r: Any, lora_alpha: Any, flags: Mapping[str, Any], lora_kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidPolicyError` for a value PEFT would refuse later (or accept and train nothing with)."""
    _check_rank("r", r)
    if lora_alpha is not None:
        _check_alpha("lora_alpha", lora_alpha)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidPolicyError(f"{name}={value!r} must be True or False; nothing was changed")
    for name in ("target_modules", "target_parameters"):
        if name in lora_kwargs:
            raise InvalidPolicyError(
                f"lora_config() chooses {name} itself (experts=True adds the fused expert weights as "
                "target_parameters); build peft.LoraConfig directly to choose them, or use "
                "kbitprep.lora_targets(model) as a starting point"
            )
    dropout = lora_kwargs.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise InvalidPolicyError(
            f"lora_dropout={dropout!r} must be a number from 0 (no dropout) up to, not including, 1 "
            "(0.05 and 0.1 are usual); nothing was changed"
        )
    if flags.get("experts") and dropout:
        raise InvalidPolicyError(
            f"lora_dropout={dropout!r} cannot be used with experts=True: PEFT's adapters on parameters "
            "(target_parameters) take no dropout; pass lora_dropout=0, or experts=False"
        )
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        pattern = lora_kwargs.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, Mapping):
            raise InvalidPolicyError(f"{key} must map module names to values, not {type(pattern).__name__}")
        for target, value in pattern.items():
            check(f"{key}[{target!r}]", value)


def lora_config(
    model: nn.Module,
    r: int = 8,
    *,
    lora_alpha: int | None = None,
    include_head: bool = False,
    experts: bool = False,
    router: bool = False,
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

    Mixture-of-experts models: the routers are left out unless ``router=True``; ``experts=True``
    also adapts the fused expert weights (3-D parameters, which stay in full precision under
    bitsandbytes and which no ``target_modules`` entry reaches) through PEFT's
    ``target_parameters`` (``"experts.gate_up_proj"``, ``"experts.down_proj"`` ...). PEFT then
    adds ``W + scale * B @ A`` to each expert stack at each forward; it takes no ``lora_dropout``.

    Args:
        model: the (prepared or not) model.
        r: the LoRA rank (a positive integer).
        lora_alpha: PEFT's ``lora_alpha``, a positive number (default ``2 * r``).
        include_head: also target the output head.
        experts: also target the fused expert weights (``target_parameters``).
        router: also target the routers (their linear layers as modules, other router weights as parameters).
        registry: the backend registry, as for :func:`kbitprep.plan`.
        backend: the backend by name, as for :func:`kbitprep.plan`.
        **lora_kwargs: passed to ``peft.LoraConfig`` (``lora_dropout``, ``task_type``, ...).

    Raises:
        BackendUnavailableError: PEFT is not installed.
        InvalidPolicyError: ``target_modules`` or ``target_parameters`` was passed (this function
            chooses them), or a value PEFT would refuse (or accept and then train nothing with): a
            rank below 1 or not an integer, an alpha that is not a positive number, a dropout outside
            [0, 1), dropout with ``experts=True``, a flag that is not a bool. Nothing is changed.
    """
    _check_options(r, lora_alpha, {"include_head": include_head, "experts": experts, "router": router}, lora_kwargs)
    if importlib.util.find_spec("peft") is None:
        raise BackendUnavailableError("kbitprep.lora_config needs PEFT: pip install peft")
    from peft import LoraConfig

    decided = _selected(model, registry, backend)
    targets = _targets(model, decided, include_head, router)
    parameters = target_parameters(model, experts=experts, router=router)
    extra: dict[str, Any] = {"target_parameters": parameters} if parameters else {}
    config = LoraConfig(
        r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, target_modules=_compact(model, targets),
        **extra, **lora_kwargs,
    )  # fmt: skip
    for _, decl in decided:
        if decl.lora_layers is not None:
            config._register_custom_module(dict(decl.lora_layers()))
    return config
