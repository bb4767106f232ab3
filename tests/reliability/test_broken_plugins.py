"""Broken plugins, as real pip-installed distributions: isolated, reported once, fatal only in strict mode.

Each distribution under ``tests/dists/broken-*`` carries one fault. A fresh :class:`kbitprep.Registry`
is created while the distribution is on ``sys.path``, so the process-wide registry other tests use
never sees them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kbitprep
from kbitprep import PluginContractError, PluginLoadError, PluginWarning, Registry

from ..distributions import on_path
from ..tiny import tiny_llama
from . import figures
from .support import assert_restored, full_state, recorded_warnings


@dataclass(frozen=True)
class Fault:
    """One broken distribution and what kbitprep must say about it."""

    dist: str
    kind: str
    stage: str
    reason: tuple[str, ...]
    strict_error: type[Exception]


FAULTS = (
    Fault(
        "broken-import",
        "entry point that cannot be imported",
        "load",
        ("ModuleNotFoundError", "kbitprep_no_such_quant_library"),
        PluginLoadError,
    ),
    Fault(
        "broken-import-raises",
        "import raising RuntimeError (not ImportError)",
        "load",
        ("RuntimeError", "no CUDA driver found"),
        PluginLoadError,
    ),
    Fault(
        "broken-contract",
        "object not satisfying the backend contract",
        "contract",
        (
            "kbitprep_broken_contract.backend:NotABackend",
            "has no non-empty string 'name'",
            "'priority' is not an int",
            "has no callable declare()",
            "'requires' is not a tuple",
        ),
        PluginContractError,
    ),
    Fault(
        "broken-name-clash",
        "plugin taking a built-in backend's name",
        "conflict",
        ("'unquantized'", "cannot replace it silently"),
        PluginContractError,
    ),
    Fault(
        "broken-detect-raises",
        "detector raising",
        "detect",
        ("detect() raised KeyError", "kbitprep_broken_quant_bits"),
        PluginContractError,
    ),
    Fault(
        "broken-detect-answer",
        "detector returning a non-Detection",
        "detect",
        ("detect() returned dict, not a Detection or None",),
        PluginContractError,
    ),
    Fault(
        "broken-declarations",
        "contradictory declarations (Declarations.problems())",
        "declare",
        (
            "allow_upcast is False but default_upcast is 'all'",
            "no checkpointing mode is supported but default_checkpointing is not OFF",
            "trainable is False but not_trainable_reason is empty",
        ),
        PluginContractError,
    ),
)
DECLARATIONS_METHOD = "kbitprep-broken-declarations"
CONTRADICTION = "allow_upcast is False but default_upcast is 'all'"


@pytest.fixture(scope="module")
def baseline() -> tuple[list[str], list[str]]:
    """Backend names and failures of a registry without any broken distribution."""
    with recorded_warnings():
        reg = Registry(strict=False)
        return reg.names(), [str(f) for f in reg.failures()]


def _marked_for_declarations(model: torch.nn.Module) -> torch.nn.Module:
    """Make the broken-declarations backend recognise ``model`` (as a transformers quantizer would)."""
    model.config.quantization_config = {"quant_method": DECLARATIONS_METHOD}
    return model


def _unquantized_still_works(reg: Registry) -> None:
    """The built-in unquantized backend prepares a tiny Llama with this registry, and undo restores it."""
    model = tiny_llama(seed=3)
    before = full_state(model)
    plan = kbitprep.plan(model, registry=reg, upcast="norms")
    assert plan.backend == "unquantized"
    assert plan.distributions == ("kbitprep",)
    kbitprep.prepare(model, registry=reg, upcast="norms")
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.is_activation_checkpointing
    kbitprep.undo(model)
    assert_restored(model, before, "undo with broken plugins installed")


def _mine(reg: Registry, dist: str) -> list[kbitprep.PluginFailure]:
    return [f for f in reg.failures() if f.distribution == dist]


def _warnings_about(caught: list[warnings.WarningMessage], dist: str) -> list[str]:
    """The PluginWarning messages about ``dist``."""
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    return [m for m in messages if f"(from {dist})" in m]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.dist)
def test_broken_plugin_is_set_aside_and_reported_once(
    fault: Fault, broken_sites: dict[str, Path], baseline: tuple[list[str], list[str]]
) -> None:
    with on_path(broken_sites[fault.dist]), recorded_warnings() as caught:
        reg = Registry(strict=False)
        # used several times, in several ways: still one failure, one warning
        for _ in range(2):
            _unquantized_still_works(reg)
        if fault.stage == "declare":
            marked = _marked_for_declarations(tiny_llama(seed=4))
            before = full_state(marked)
            for call in (kbitprep.plan, kbitprep.prepare):
                with pytest.raises(PluginContractError, match=CONTRADICTION) as err:
                    call(marked, registry=reg)
                assert f"backend 'broken-declarations' (from {fault.dist})" in str(err.value)
                assert_restored(marked, before, f"{call.__name__} refused by broken declarations")
        names, failures = reg.names(), reg.failures()

    # every other backend keeps working: the same names and built-in failures as without the plugin
    # (a plugin that loaded stays registered; it is set aside only for the models it fails on)
    loaded = [fault.dist] if fault.stage in ("detect", "declare") else []
    assert sorted(names) == sorted(baseline[0] + loaded)
    assert [str(f) for f in failures if f.distribution != fault.dist] == baseline[1]
    assert reg.get("unquantized").distribution == "kbitprep"
    assert type(reg.get("unquantized").backend).__name__ == "UnquantizedBackend"

    mine = _mine(reg, fault.dist)
    assert len(mine) == 1, mine
    failure = mine[0]
    assert failure.stage == fault.stage
    assert failure.name == fault.dist or failure.name == "unquantized"  # the clash is named after the name it took
    for part in fault.reason:
        assert part in failure.reason, (part, failure.reason)

    messages = _warnings_about(caught, fault.dist)
    assert len(messages) == 1, messages
    assert fault.dist in messages[0] and all(part in messages[0] for part in fault.reason)
    assert "KBITPREP_STRICT=1" in messages[0]
    figures.fault(fault.kind, f"installed distribution {fault.dist}, stage {fault.stage}")


def test_all_broken_plugins_at_once(broken_sites: dict[str, Path], baseline: tuple[list[str], list[str]]) -> None:
    """Every broken distribution installed together: each reported once, the rest unaffected."""
    with on_path(*broken_sites.values()), recorded_warnings() as caught:
        reg = Registry(strict=False)
        _unquantized_still_works(reg)
        with pytest.raises(PluginContractError):
            kbitprep.plan(_marked_for_declarations(tiny_llama()), registry=reg)
        _unquantized_still_works(reg)
        names = reg.names()
    assert set(names) == set(baseline[0]) | {
        "broken-fixup",
        "broken-detect-raises",
        "broken-detect-answer",
        "broken-declarations",
    }
    for fault in FAULTS:
        assert len(_mine(reg, fault.dist)) == 1, fault.dist
        assert len(_warnings_about(caught, fault.dist)) == 1, fault.dist
    assert not _mine(reg, "broken-fixup")  # a well-formed backend: it fails only when its fix-up runs
    assert len(reg.failures()) == len(baseline[1]) + len(FAULTS)


# --------------------------------------------------------------------------- strict mode


def _skip_if_builtins_fail(baseline: tuple[list[str], list[str]]) -> None:
    if baseline[1]:
        pytest.skip(
            "built-in plugins fail to load here, and strict mode stops at them before reaching the broken "
            f"distribution: {baseline[1][0]} (and {len(baseline[1]) - 1} more)"
        )


LOAD_FAULTS = [f for f in FAULTS if f.stage in ("load", "contract", "conflict")]
USE_FAULTS = [f for f in FAULTS if f.stage in ("detect", "declare")]


@pytest.mark.parametrize("how", ["argument", "environment", "prepare"])
@pytest.mark.parametrize("fault", LOAD_FAULTS, ids=lambda f: f.dist)
def test_strict_mode_raises_at_discovery(
    fault: Fault,
    how: str,
    broken_sites: dict[str, Path],
    baseline: tuple[list[str], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _skip_if_builtins_fail(baseline)
    model = tiny_llama()
    before = full_state(model)
    with on_path(broken_sites[fault.dist]), recorded_warnings() as caught:
        if how == "environment":
            monkeypatch.setenv("KBITPREP_STRICT", "1")
        reg = Registry(strict=True) if how == "argument" else Registry()
        for _ in range(2):  # raises the same error every time (no half-filled registry left behind)
            with pytest.raises(fault.strict_error) as err:
                if how == "prepare":
                    kbitprep.prepare(model, registry=reg, strict=True)
                else:
                    reg.names()
            assert "(strict mode)" in str(err.value)
            assert f"(from {fault.dist})" in str(err.value)
            assert all(part in str(err.value) for part in fault.reason)
            assert "already taken by the built-in backend from kbitprep" not in str(err.value) or (
                fault.stage == "conflict"
            )
    assert not _warnings_about(caught, fault.dist)  # raised, not warned
    assert_restored(model, before, "strict-mode refusal")


@pytest.mark.parametrize("fault", USE_FAULTS, ids=lambda f: f.dist)
def test_strict_mode_raises_when_used(
    fault: Fault, broken_sites: dict[str, Path], baseline: tuple[list[str], list[str]]
) -> None:
    _skip_if_builtins_fail(baseline)
    model = tiny_llama()
    if fault.stage == "declare":
        _marked_for_declarations(model)
    before = full_state(model)
    with on_path(broken_sites[fault.dist]), recorded_warnings() as caught:
        reg = Registry(strict=False)
        with pytest.raises(fault.strict_error) as err:
            kbitprep.prepare(model, registry=reg, strict=True)
        assert "(strict mode)" in str(err.value)
        assert f"(from {fault.dist})" in str(err.value)
        assert all(part in str(err.value) for part in fault.reason)
        assert_restored(model, before, "strict-mode refusal while detecting")
        assert not _warnings_about(caught, fault.dist)
        if fault.stage == "detect":  # the same registry, not strict: set aside with one warning
            kbitprep.plan(model, registry=reg)
            assert len(_warnings_about(caught, fault.dist)) == 1
            assert len(_mine(reg, fault.dist)) == 1


def test_forcing_a_broken_backend_by_name(broken_sites: dict[str, Path]) -> None:
    """Naming a backend whose detector raises gives a mismatch error; naming broken declarations, a contract error."""
    with on_path(broken_sites["broken-detect-raises"], broken_sites["broken-declarations"]), recorded_warnings():
        reg = Registry(strict=False)
        model = tiny_llama()
        before = full_state(model)
        with pytest.raises(kbitprep.BackendMismatchError, match="'broken-detect-raises' does not recognise"):
            kbitprep.plan(model, registry=reg, backend="broken-detect-raises")
        with pytest.raises(PluginContractError, match="declared contradictory rules"):
            kbitprep.prepare(model, registry=reg, backend="broken-declarations", allow_mismatch=True)
        assert_restored(model, before, "forcing broken backends")
        failed = {(f.distribution, f.stage) for f in reg.failures()}
        assert {("broken-detect-raises", "detect"), ("broken-declarations", "declare")} <= failed
