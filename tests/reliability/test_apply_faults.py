"""Faults halfway through prepare: whatever fails, and wherever, the model is left exactly as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep import Registry, _mutation

from ..distributions import on_path
from ..tiny import batch, tiny_llama
from . import figures
from .support import assert_restored, differences, full_state, recorded_warnings


@pytest.fixture
def fixup_site(broken_sites: dict[str, Path]) -> Iterator[Registry]:
    """The broken-fixup distribution on the path, and a fresh registry that sees it."""
    with on_path(broken_sites["broken-fixup"]), recorded_warnings():
        yield Registry(strict=False)


def _fixup_llama(fault: str) -> nn.Module:
    """A tiny Llama whose first MLP down-projection is the broken backend's int8 layer."""
    from kbitprep_broken_fixup.layers import FaultyQuantLinear  # on the path through ``fixup_site``

    model = tiny_llama(seed=5)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = FaultyQuantLinear.from_linear(mlp.down_proj, fault)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch()["input_ids"]).logits


@pytest.mark.parametrize(
    ("fault", "error"),
    [("raise", RuntimeError), ("interrupt", KeyboardInterrupt)],
    ids=["raises", "interrupted"],
)
def test_fixup_failing_halfway_leaves_the_model_as_before(
    fault: str, error: type[BaseException], fixup_site: Registry
) -> None:
    model = _fixup_llama(fault)
    model.eval()
    logits = _logits(model)
    before = full_state(model)
    plan = kbitprep.plan(model, registry=fixup_site, upcast="all", checkpointing="reentrant")
    assert plan.backend == "broken-fixup" and [f.name for f in plan.fixups] == ["repack"]
    assert plan.to_upcast  # so the fault interrupts a prepare that had more to do

    with pytest.raises(error, match="injected fault") as err:
        kbitprep.prepare(model, registry=fixup_site, upcast="all", checkpointing="reentrant")
    if fault == "raise":
        assert type(err.value).__name__ == "RepackFailed"
        notes = " ".join(getattr(err.value, "__notes__", []))
        assert "fix-up 'repack' of backend 'broken-fixup' (from broken-fixup)" in notes
        assert "restored" in notes

    assert_restored(model, before, f"fix-up {fault} halfway")
    assert not hasattr(model, "kbitprep_broken_fixup_ran")
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)
    with pytest.raises(kbitprep.NotPreparedError):
        kbitprep.report(model)
    assert torch.equal(_logits(model), logits)  # and it still computes the same thing
    figures.fault(
        f"fix-up {'raising' if fault == 'raise' else 'interrupted (KeyboardInterrupt)'} halfway through prepare",
        "installed distribution broken-fixup: changes storage, buffers, hooks, submodules, flags, "
        "checkpointing and the config, then fails",
    )


def test_fixup_that_completes_is_kept_and_undone(fixup_site: Registry) -> None:
    """The control: the same fix-up without the fault changes all of that (so the checks above can fail)."""
    model = _fixup_llama("none")
    before = full_state(model)
    kbitprep.prepare(model, registry=fixup_site, upcast="all", checkpointing="reentrant")
    layer = model.model.layers[0].mlp.down_proj
    assert layer.packed and layer.weight.shape == (128, 64) and layer.scale.dtype == torch.float32
    assert "fix-up repack" in kbitprep.report(model).steps
    changed = {d.split("[")[0].split(":")[0] for d in differences(before, full_state(model))}
    assert {"params", "buffers", "modules", "use_cache", "config", "module_ids", "module_attrs"} <= changed
    kbitprep.undo(model)
    assert_restored(model, before, "undo of a completed fix-up")


def _prepared_enough(model: nn.Module) -> None:
    """Assert that every built-in step already ran (the fault below comes after all of them)."""
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["raises", "interrupted"])
def test_failure_after_every_builtin_step(error: type[BaseException], registry: Registry) -> None:
    """A failing extension step (the last one) reverts freeze, upcast, checkpointing and hooks."""
    model = tiny_llama(seed=6)
    before = full_state(model)
    seen: list[bool] = []

    def late_step(m: nn.Module, plan: Any) -> None:
        _prepared_enough(m)
        seen.append(True)
        raise error("failed after every built-in step (injected fault)")

    real = _mutation.apply_memory_modes

    def memory_then_fault(model: torch.nn.Module, plan: object) -> str:
        real(model, plan)  # type: ignore[arg-type]
        late_step(model, plan)
        return ""

    _mutation.apply_memory_modes = memory_then_fault  # type: ignore[assignment]
    try:
        with pytest.raises(error, match="injected fault"):
            kbitprep.prepare(model, registry=registry, upcast="all", checkpointing="reentrant")
    finally:
        _mutation.apply_memory_modes = real
    assert seen == [True]
    assert_restored(model, before, f"late step {error.__name__}")
    figures.fault(
        f"failure after every built-in step ({error.__name__})",
        "the last step of prepare's transaction (after the memory modes)",
    )


def test_out_of_memory_halfway_through_the_upcast(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third fp32 cast runs out of memory: the two already cast come back bit-identical."""
    model = tiny_llama(seed=7)
    before = full_state(model)
    plan = kbitprep.plan(model, registry=registry, upcast="all")
    assert len(plan.to_upcast) > 3
    real_to = torch.Tensor.to
    casts: list[int] = []

    def flaky_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and args[0] is torch.float32:
            casts.append(self.numel())
            if len(casts) == 3:
                raise torch.OutOfMemoryError("CPU out of memory allocating the fp32 copy (injected fault)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", flaky_to)
    with pytest.raises(torch.OutOfMemoryError, match="injected fault"):
        kbitprep.prepare(model, registry=registry, upcast="all")
    monkeypatch.undo()
    assert len(casts) == 3
    assert_restored(model, before, "out of memory halfway through the upcast")
    kbitprep.prepare(model, registry=registry, upcast="all")  # and a retry works
    assert all(p.dtype == torch.float32 for p in model.parameters())
    kbitprep.undo(model)
    assert_restored(model, before, "undo after the retry")
    figures.fault("out of memory halfway through the fp32 upcast", "torch.Tensor.to failing on the 3rd cast")
