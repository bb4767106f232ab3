"""Where the memory modes go on a model, and the plan's ``memory`` entry and notes (nothing changes here)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import InvalidPolicyError
from ..plugin import CheckpointMode
from .chunked_loss import head_transform
from .options import MemoryModes

__all__ = ["backbone", "causal_lm", "memory_plan", "output_head"]


def _is_causal_lm_loss(fn: Any) -> bool:
    return getattr(fn, "__name__", "") == "ForCausalLMLoss" and "transformers" in getattr(fn, "__module__", "")


def output_head(module: nn.Module) -> nn.Module | None:
    getter = getattr(type(module), "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        head = getter(module)
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def causal_lm(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(name, module, why-not) of the transformers causal LM inside ``model`` (also under a PEFT wrapper)."""
    why = f"{type(model).__name__} has no transformers *ForCausalLM inside"
    for name, mod in model.named_modules():
        if not hasattr(type(mod), "get_output_embeddings") or "labels" not in _parameters_of(mod):
            continue
        if output_head(mod) is None:
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
    """The transformers model inside ``model`` (also under a PEFT wrapper), else the root."""
    for mod in model.modules():
        if hasattr(type(mod), "gradient_checkpointing_enable") or hasattr(type(mod), "activation_checkpointing_enable"):
            return mod
    return model


def backbone(module: nn.Module) -> nn.Module:
    """The module whose forward the offload context wraps: the transformers backbone of ``module``
    (``module.base_model``, what TRL's fused head calls directly), else ``module`` itself."""
    base = getattr(module, "base_model", None)
    if isinstance(base, nn.Module) and base is not module and any(m is base for m in module.children()):
        return base
    return module


def _trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


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
        lm_name, lm, why = causal_lm(model)
        if why:
            if modes.required:
                raise InvalidPolicyError(f"memory: the chunked output head does not apply: {why}")
            notes.append(f"memory: chunked output head skipped: {why}")
            chunk = 0
        else:
            head = output_head(lm)
            assert head is not None
            head_name = _module_name(model, head)
            transform = head_transform(lm.config).describe() if hasattr(lm, "config") else ""
            notes.append(
                f"memory: trained with labels, {type(lm).__name__} computes {head_name} and the loss in "
                f"{chunk}-token chunks and returns logits=None"
                + (f" (the head's output {transform}, as its forward does)" if transform else "")
            )
            if _trl_installed():
                notes.append(
                    "memory: TRL's trainers call the model with fused_lm_head=True: on CPU kbitprep's chunked head "
                    "serves those calls (per-token log-probs, entropy and TRL's other statistics, in "
                    f"{chunk}-token chunks); on CUDA TRL's own fused head does (its Triton kernel); "
                    "kbitprep.memory_modes(model)['head_calls'] counts which head ran"
                )
    target = lm if chunk else _forward_target(model)
    target_name = lm_name if chunk else _module_name(model, target)
    base = backbone(target)
    base_name = _module_name(model, base) if base is not target else ""
    if offload:
        if not head_name and base is target:
            out_head = output_head(target)
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
        where = f"in {base_name}'s forward (also under TRL's fused head, which calls it directly)" if base_name else ""
        first = (
            f"(from {head_name} on, and the tensor saved just before)"
            if head_name and not base_name
            else "(the last tensor saved)"
        )
        notes.append(
            "memory: offload copies each saved storage once"
            + (f" {where}" if where else "")
            + f"; what the backward needs first {first} stays on the device; it steps aside while another "
            "offload runs (TRL's activation_offloading, transformers' activation_checkpointing_enable(offload=True), "
            "an outer saved_tensors_hooks)"
        )
    if not (chunk or offload):
        return {"memory": {"preset": modes.preset, "chunked_head": 0, "offload": False}}, notes
    spec: dict[str, Any] = {
        "preset": modes.preset,
        "chunked_head": chunk,
        "offload": offload,
        "module": target_name,
        "head": head_name,
        "backbone": base_name if offload else "",
    }
    return {"memory": spec}, notes


def _data_parallel_name(model: nn.Module) -> str | None:
    """The name of a ``torch.nn.DataParallel`` module in ``model`` (``""``: the root), or ``None``."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.DataParallel):
            return str(name)
    return None
