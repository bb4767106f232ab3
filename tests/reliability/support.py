"""Helpers of the reliability tests: the full state of a model, and checks that it came back."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from kbitprep._mutation import prepared_state

from ..state import model_state
from . import figures

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def full_state(model: nn.Module) -> dict[str, Any]:
    """Everything prepare may change, compared by value *and* by identity.

    :func:`tests.state.model_state` (dtypes, digests of values, requires_grad, hook counts,
    checkpointing flags, ``use_cache``) plus: which Parameter / buffer / module object sits under
    each name (so tied parameters and shared submodules stay the same objects), each tensor's
    device, every module's attribute names, the hook objects themselves, and the config's attributes.
    """
    state = model_state(model)
    state["param_ids"] = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    state["buffer_ids"] = {n: id(b) for n, b in model.named_buffers(remove_duplicate=False)}
    state["module_ids"] = {n: id(m) for n, m in model.named_modules(remove_duplicate=False)}
    state["devices"] = {n: str(p.device) for n, p in model.named_parameters(remove_duplicate=False)} | {
        n: str(b.device) for n, b in model.named_buffers(remove_duplicate=False)
    }
    state["module_attrs"] = {n: sorted(k for k in vars(m) if k != "_kbitprep_state") for n, m in model.named_modules()}
    state["hook_objects"] = {
        n: {d: tuple((k, id(h)) for k, h in getattr(m, d, {}).items()) for d in _HOOK_DICTS}
        for n, m in model.named_modules()
    }
    cfg = getattr(model, "config", None)
    state["config"] = {k: repr(v) for k, v in sorted(vars(cfg).items())} if cfg is not None else None
    state["prepared"] = prepared_state(model) is not None
    return state


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Readable differences between two :func:`full_state` results (empty when equal)."""
    out = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() | b.keys(), key=str):
                if a.get(k) != b.get(k):
                    out.append(f"{key}[{k}]: {a.get(k)!r} -> {b.get(k)!r}")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def assert_restored(model: nn.Module, before: dict[str, Any], what: str) -> None:
    """Assert the model is exactly as in ``before`` (a :func:`full_state`), and count the check."""
    diff = differences(before, full_state(model))
    figures.state_checked(not diff, f"{what}: " + "; ".join(diff[:5]))
    assert not diff, f"{what} left the model changed:\n" + "\n".join(diff[:20])


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (none deduplicated by Python's once-per-location filter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
