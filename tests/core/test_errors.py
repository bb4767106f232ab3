"""Every user error raises a specific kbitprep exception, with an actionable message, model untouched."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kbitprep
from kbitprep import Declarations, Registry

from ..state import model_state
from ..test_docs import _resolve
from ..tiny import tiny_llama
from .backends_for_tests import MarkerBackend


@pytest.mark.parametrize("bad", [None, 42, "model", {"weight": torch.zeros(2)}])
@pytest.mark.parametrize("func", [kbitprep.plan, kbitprep.prepare, kbitprep.undo, kbitprep.report])
def test_not_a_module(func: object, bad: object) -> None:
    with pytest.raises(kbitprep.NotAModuleError, match="expects a torch.nn.Module"):
        func(bad)  # type: ignore[operator]
    with pytest.raises(TypeError):  # also a TypeError for existing handlers
        func(bad)  # type: ignore[operator]


def test_model_without_parameters() -> None:
    with pytest.raises(kbitprep.NoParametersError, match="has no parameters"):
        kbitprep.prepare(torch.nn.ReLU())


def test_model_without_float_parameters() -> None:
    m = torch.nn.Embedding(4, 4)
    m.weight = torch.nn.Parameter(m.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(kbitprep.NoParametersError, match="no floating-point parameters"):
        kbitprep.prepare(m)


def test_unknown_backend_lists_the_names() -> None:
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(kbitprep.UnknownBackendError, match="no kbitprep backend is called 'nope'.*unquantized"):
        kbitprep.prepare(model, backend="nope")
    assert model_state(model) == before


def test_backend_with_missing_packages_carries_the_install_hint() -> None:
    reg = Registry()
    reg.register(MarkerBackend("needs-pkg", requires=("kbitprep_no_such_pkg",), install_hint="pip install no-such-pkg"))
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(kbitprep.BackendUnavailableError, match="install it with: pip install no-such-pkg"):
        kbitprep.prepare(model, backend="needs-pkg", registry=reg)
    assert model_state(model) == before


def test_untrainable_backend_refuses_before_changing_anything() -> None:
    reg = Registry()
    reg.register(
        MarkerBackend(
            "frozen-only",
            priority=90,
            decl=Declarations(trainable=False, not_trainable_reason="kernels have no backward"),
        )
    )
    model = tiny_llama()
    model.kbitprep_test_marker = True
    before = model_state(model)
    plan = kbitprep.plan(model, registry=reg)
    assert not plan.trainable and "NO - kernels have no backward" in str(plan)
    with pytest.raises(kbitprep.NotTrainableError, match="cannot be trained: kernels have no backward"):
        kbitprep.prepare(model, registry=reg)
    assert model_state(model) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upcast": "everything"}, "valid choices: 'none', 'norms', 'all'"),
        ({"upcast": 3}, "valid choices"),
        ({"checkpointing": "sometimes"}, "valid choices: True, False, 'on', 'reentrant', 'non_reentrant', 'off'"),
        ({"upcsat": "none"}, "unknown keyword argument\\(s\\) upcsat; valid keywords: backend, upcast"),
    ],
)
def test_invalid_options_list_valid_choices(kwargs: dict[str, object], match: str) -> None:
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(kbitprep.InvalidPolicyError, match=match):
        kbitprep.prepare(model, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kbitprep.plan(model, **kwargs)  # type: ignore[arg-type]
    assert model_state(model) == before


def test_forced_backend_that_does_not_match() -> None:
    reg = Registry()
    reg.register(MarkerBackend("marker"))
    model = tiny_llama()
    with pytest.raises(kbitprep.BackendMismatchError, match="does not recognise.*allow_mismatch=True"):
        kbitprep.plan(model, backend="marker", registry=reg)
    plan = kbitprep.plan(model, backend="marker", registry=reg, allow_mismatch=True)
    assert plan.forced and "forced" in plan.evidence[0]


def test_contradictory_declarations_are_a_contract_error() -> None:
    reg = Registry()
    reg.register(MarkerBackend("liar", priority=90, decl=Declarations(allow_upcast=False, default_upcast="all")))
    model = tiny_llama()
    model.kbitprep_test_marker = True
    with pytest.raises(kbitprep.PluginContractError, match="allow_upcast is False but default_upcast is 'all'"):
        kbitprep.plan(model, registry=reg)


def test_meta_model_plans_but_does_not_prepare() -> None:
    with torch.device("meta"):
        model = tiny_llama()
    plan = kbitprep.plan(model)
    assert plan.bytes_before > 0
    with pytest.raises(kbitprep.UnsupportedModelError, match="meta device"):
        kbitprep.prepare(model)


def test_every_error_derives_from_the_base_class() -> None:
    for name in kbitprep.errors.__all__:
        cls = getattr(kbitprep.errors, name)
        if name.endswith("Error"):
            assert issubclass(cls, kbitprep.KbitprepError), name
        else:
            assert issubclass(cls, kbitprep.KbitprepWarning), name
        assert cls.__doc__


# --------------------------------------------------------------------------- the promise, held in the source

PACKAGE = Path(kbitprep.__file__).resolve().parent
#: The built-in exceptions troubleshooting.md promises every kbitprep error also derives from.
BUILTINS = (TypeError, ValueError, LookupError, ImportError, RuntimeError)


def _raises(path: Path) -> Iterator[tuple[int, str]]:
    """(line, name) of every ``raise Name(...)`` / ``raise Name`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                yield node.lineno, exc.id
            elif isinstance(exc, ast.Attribute):
                yield node.lineno, exc.attr


def test_every_error_also_derives_from_a_builtin_exception() -> None:
    for name in kbitprep.errors.__all__:
        cls = getattr(kbitprep.errors, name)
        if issubclass(cls, kbitprep.KbitprepError) and cls is not kbitprep.KbitprepError:
            assert issubclass(cls, BUILTINS), f"{name} derives from none of {[b.__name__ for b in BUILTINS]}"


def test_no_raise_of_the_bare_base_class() -> None:
    """``except ValueError`` (or the closest built-in) must catch whatever kbitprep raises on purpose: the
    base class alone derives from none, so ``kbitprep/`` never raises it (a subclass says what is wrong)."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in _raises(path)
        if name == "KbitprepError"
    ]
    assert len(list(PACKAGE.rglob("*.py"))) > 30  # the walk sees the package, app/ included
    assert not found, f"raise KbitprepError(...) (use the documented subclass): {found}"


def test_names_in_messages_and_docstrings_exist() -> None:
    """Every ``kbitprep.<name>`` a string of the package names (an error message's "pass a kbitprep.X")
    can be imported."""
    named: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in re.finditer(r"(?<![\w.])kbitprep(?:\.[A-Za-z_]\w*)+", node.value):
                    named.setdefault(m.group(0), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert len(named) > 20
    missing = []
    for name, where in sorted(named.items()):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(f"{name} ({where})")
    assert not missing, f"strings name objects that do not exist: {missing}"


def test_unknown_quantization_is_an_invalid_option() -> None:
    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.testing import tiny_llama_config

    for call in (
        lambda: kbitprep.estimate(tiny_llama_config(), quantization="nf4"),
        lambda: plan_from_config(tiny_llama_config(), "nf4"),
    ):
        with pytest.raises(kbitprep.InvalidPolicyError, match="unknown quantization 'nf4'; choices: bnb-4bit"):
            call()
        with pytest.raises(ValueError):
            call()


def test_unknown_estimate_variant_names_the_exported_class() -> None:
    from kbitprep.testing import tiny_llama_config

    with pytest.raises(kbitprep.InvalidPolicyError, match="or pass a kbitprep.EstimateVariant") as info:
        kbitprep.estimate(tiny_llama_config(), variants=["fastest"])
    named = re.findall(r"kbitprep\.(\w+)", str(info.value))
    assert named and all(hasattr(kbitprep, n) for n in named), named


@pytest.mark.parametrize("dtype", ["int8", torch.int8, "bogus"])
def test_a_bad_dtype_option_is_an_invalid_option(dtype: object) -> None:
    from kbitprep.app.metaplan import config_dtype
    from kbitprep.testing import tiny_llama_config

    with pytest.raises(kbitprep.InvalidPolicyError, match="not a floating-point torch dtype"):
        config_dtype(tiny_llama_config(), dtype)  # type: ignore[arg-type]
