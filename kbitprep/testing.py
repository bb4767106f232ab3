"""The backend contract as a reusable test suite, for plugin authors (run it with pytest).

Subclass :class:`BackendContract` in a test module whose class name starts with ``Test``, set
``backend`` and implement ``make_model()`` returning a *fresh* model your backend handles; pytest
then runs every ``test_*`` method against your backend::

    # tests/test_contract.py of your plugin's distribution
    from kbitprep.testing import BackendContract

    from my_plugin import MyBackend, load_tiny_quantized_model


    class TestMyBackend(BackendContract):
        backend = MyBackend

        def make_model(self):
            return load_tiny_quantized_model()

The checks are the ones kbitprep's own built-in backends pass (``tests/backends/test_contract_builtins.py``
in kbitprep's repository): the backend object satisfies the contract, its detector finds the
model on real evidence and ignores a plain one, detection and declarations change nothing, the
declarations are consistent and protect the quantized storage, the registry picks the backend for
its model, prepare + undo is exact in every checkpointing mode it declares, and gradients flow.

This module does not import pytest (a check that cannot apply calls ``pytest.skip`` when pytest
is running it, and raises :class:`unittest.SkipTest` otherwise), and ``import kbitprep`` never
imports it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import unittest
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ._api import plan, prepare, report, undo
from ._gradflow import verify_gradient_flow
from ._mutation import prepared_state
from ._registry import Registry, _contract_problems
from ._tensors import storage_digest
from .errors import AlreadyPreparedWarning, NotTrainableError
from .plugin import Backend, CheckpointMode, Declarations, Detection, FixUp, Scheme, missing_packages

__all__ = [
    "BackendContract",
    "ModuleWalks",
    "contract_problems",
    "count_module_walks",
    "model_state",
    "tiny_causal_lm",
    "tiny_llama_config",
]

_SIMPLE = (bool, int, float, str, type(None))
_INSTANCES: dict[type, Backend] = {}


def contract_problems(backend: object) -> list[str]:
    """The ways ``backend`` breaks the static part of the contract (empty when it satisfies it).

    The same checks the registry applies when it loads a plugin (a non-empty string ``name``, an
    int ``priority``, callable ``detect``/``declare``, ``requires`` a tuple of module names,
    ``install_hint`` a string), plus: ``description`` is a string and a backend that requires
    packages says how to install them.

    Example:
        >>> from kbitprep.plugin import Backend
        >>> class Nameless(Backend):
        ...     priority = "high"
        >>> contract_problems(Nameless())
        ["has no non-empty string 'name'", "'priority' is not an int"]
    """
    found = _contract_problems(backend)
    requires = getattr(backend, "requires", ())
    if not isinstance(requires, tuple):
        found.append("'requires' is not a tuple")
    if not isinstance(getattr(backend, "description", ""), str):
        found.append("'description' is not a string")
    hint = getattr(backend, "install_hint", "")
    if requires and isinstance(hint, str) and not hint.strip():
        found.append("'requires' is set but 'install_hint' is empty (say what to install)")
    return found


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything kbitprep could change on a model, as comparable data.

    Parameters and buffers (dtype, tensor class, ``requires_grad`` and a digest of the stored
    bytes, inner tensors included for tensor subclasses), the hooks of every module, every module's
    attribute names with the values of its plain (bool/int/float/str/None) attributes, and
    ``config.use_cache``. Two captures are equal exactly when nothing observable changed.

    Example:
        >>> import torch, kbitprep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> before = model_state(model)
        >>> _ = kbitprep.plan(model)
        >>> model_state(model) == before
        True
        >>> _ = kbitprep.prepare(model)
        >>> model_state(model) == before
        False
        >>> _ = kbitprep.undo(model)
        >>> model_state(model) == before
        True
    """
    params = {
        n: (p.dtype, type(p).__name__, type(p.data).__name__, p.requires_grad, storage_digest(p))
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    buffers = {
        n: (b.dtype, type(b).__name__, storage_digest(b)) for n, b in model.named_buffers(remove_duplicate=False)
    }
    modules: dict[str, Any] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        attrs = vars(m)
        modules[n] = (
            type(m).__name__,
            tuple(sorted(k for k in attrs if not k.startswith("_kbitprep"))),
            tuple(sorted((k, v) for k, v in attrs.items() if isinstance(v, _SIMPLE) and not k.startswith("_kbitprep"))),
            tuple(
                len(getattr(m, h, {}))
                for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            ),
        )
    cfg = getattr(model, "config", None)
    return {"params": params, "buffers": buffers, "modules": modules, "use_cache": getattr(cfg, "use_cache", None)}


#: Frames of these modules are torch's own walking machinery (``modules()``, ``named_parameters()`` ...):
#: a walk is attributed to the first frame outside them.
_WALK_MACHINERY = ("torch.nn.modules.", "contextlib")


@dataclass
class ModuleWalks:
    """The walks of one model's module tree that :func:`count_module_walks` counted, by caller.

    A walk is one call of the model's ``named_modules``, directly or through ``modules()``,
    ``named_parameters()``, ``parameters()``, ``named_buffers()``, ``buffers()`` ... (torch builds
    each of those on ``named_modules``).

    Attributes:
        callers: walks by caller: ``"module:function <- module:function <- module:function"``, the
            innermost three frames outside torch's module machinery, innermost first.
    """

    callers: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Every walk counted."""
        return sum(self.callers.values())

    def count(self, *modules: str) -> int:
        """The walks whose innermost caller is in one of ``modules`` (a module name or a package prefix,
        e.g. ``"kbitprep_plugins"`` for the built-in plugins, ``"kbitprep.plugin"`` for the contract's helpers)."""
        return sum(
            n
            for caller, n in self.callers.items()
            if any(caller.split(":", 1)[0] == m or caller.startswith(m + ".") for m in modules)
        )

    def __str__(self) -> str:
        lines = [f"{self.total} walks of the module tree"]
        lines += [f"{n:4d}  {caller}" for caller, n in self.callers.most_common()]
        return "\n".join(lines)


def _caller(depth: int = 3) -> str:
    frames: list[str] = []
    frame = sys._getframe(2)  # the caller of the counting wrapper
    while frame is not None and len(frames) < depth:
        module = str(frame.f_globals.get("__name__", "?"))
        nested = module == __name__ and frame.f_code.co_name == "counting"  # an enclosing count's wrapper
        if not module.startswith(_WALK_MACHINERY) and not nested:
            code = frame.f_code
            frames.append(f"{module}:{getattr(code, 'co_qualname', code.co_name)}")
        frame = frame.f_back  # type: ignore[assignment]
    return " <- ".join(frames)


@contextlib.contextmanager
def count_module_walks(model: nn.Module) -> Iterator[ModuleWalks]:
    """Count the walks of ``model``'s module tree made inside the block (see :class:`ModuleWalks`).

    Calls on ``model`` itself are counted, from any thread, not those on its submodules (a walk of
    the root recurses into them). For the block, ``named_modules`` is shadowed by a counting wrapper
    on the instance (``vars(model)`` shows it); it is removed when the block ends.

    Example:
        >>> import torch, kbitprep
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> with count_module_walks(model) as walks:
        ...     _ = list(model.parameters())
        >>> walks.total
        1
    """
    walks = ModuleWalks()
    had = "named_modules" in vars(model)
    previous = vars(model).get("named_modules")
    # an enclosing count's wrapper, else the class's method
    walk: Any = previous if had else functools.partial(type(model).named_modules, model)

    def counting(*args: Any, **kwargs: Any) -> Any:
        walks.callers[_caller()] += 1
        return walk(*args, **kwargs)

    object.__setattr__(model, "named_modules", counting)
    try:
        yield walks
    finally:
        if had:
            object.__setattr__(model, "named_modules", previous)
        else:
            object.__delattr__(model, "named_modules")


def tiny_causal_lm(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A freshly initialised, unquantized 2-layer transformers Llama (about 0.1 M parameters).

    The default "other model" of :class:`BackendContract`: a model a quantization backend must not
    claim.

    Example:
        >>> model = tiny_causal_lm()
        >>> type(model).__name__, next(model.parameters()).dtype
        ('LlamaForCausalLM', torch.bfloat16)
    """
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = LlamaForCausalLM(tiny_llama_config())
    return nn.Module.to(model, dtype)


def tiny_llama_config(**overrides: Any) -> Any:
    """The ``LlamaConfig`` of :func:`tiny_causal_lm` (2 layers, hidden 64, vocabulary 256), with ``overrides``.

    Example:
        >>> tiny_llama_config(num_hidden_layers=1).num_hidden_layers
        1
    """
    from transformers import LlamaConfig

    settings: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


def _skip(reason: str) -> None:
    """Skip the running check: ``pytest.skip`` under pytest, else :class:`unittest.SkipTest`."""
    pytest = sys.modules.get("pytest")
    if pytest is not None:
        pytest.skip(reason)
    raise unittest.SkipTest(reason)


@functools.cache
def _imports_on_module_import(module: str) -> tuple[str, ...]:
    """Top-level packages newly imported by ``import <module>`` after ``import kbitprep.plugin``."""
    code = (
        "import sys, kbitprep.plugin\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        f"import {module}\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - before)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0:
        raise AssertionError(f"`import {module}` failed in a fresh interpreter:\n{out.stderr[-2000:]}")
    return tuple(out.stdout.split())


def _storage(state: Mapping[str, Any], names: frozenset[str]) -> dict[str, tuple[Any, ...]]:
    """From a :func:`model_state` capture: dtype, classes and digest of the named tensors (not requires_grad)."""
    out = {n: (s[0], s[1], s[2], s[4]) for n, s in state["params"].items() if n in names}
    out.update({n: tuple(s) for n, s in state["buffers"].items() if n in names})
    return out


def _checkpoint_flags(model: nn.Module) -> tuple[bool, set[bool]]:
    """(any module has gradient_checkpointing on, the use_reentrant values its checkpoint functions carry)."""
    on = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    reentrant: set[bool] = set()
    for m in model.modules():
        fn = vars(m).get("_gradient_checkpointing_func")
        keywords = getattr(fn, "keywords", None)
        if isinstance(keywords, Mapping) and "use_reentrant" in keywords:
            reentrant.add(bool(keywords["use_reentrant"]))
    return on, reentrant


class BackendContract:
    """The contract a kbitprep backend must satisfy, as pytest tests. Subclass it as ``Test...``.

    Set :attr:`backend` (a :class:`~kbitprep.plugin.Backend` subclass or instance) and implement
    :meth:`make_model`. Optionally override :meth:`make_other_model` (a model the backend must
    not claim), :meth:`make_inputs` (the gradient-flow probe's inputs), and the two flags below.
    Checks that cannot apply (the backend's packages are missing, it declares the model not
    trainable, no other model is given) are skipped with the reason.
    """

    backend: ClassVar[Backend | type[Backend] | None] = None
    """The backend under test: a class (instantiated once) or an instance."""
    claims_modules: ClassVar[bool] = True
    """Whether the detector claims specific modules (``Detection.modules`` not empty); ``False``
    for generic backends that claim a model as a whole."""
    holds_quantized_storage: ClassVar[bool] = True
    """Whether the model holds quantized storage the backend must declare in
    ``Declarations.quantized``; ``False`` only for backends of unquantized models."""

    # ------------------------------------------------------------------ what a subclass provides
    def make_model(self) -> nn.Module:
        """Return a *fresh* model the backend handles (called once per check that needs one)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_model()")

    def make_other_model(self) -> nn.Module | None:
        """Return a model the backend must *not* claim, or ``None`` to skip that check.

        By default a plain, unquantized tiny transformers Llama (:func:`tiny_causal_lm`).
        """
        return tiny_causal_lm()

    def make_inputs(self, model: nn.Module) -> Mapping[str, Any] | None:
        """Keyword arguments for one forward of ``model`` in the gradient-flow check, or ``None``
        for kbitprep's default (8 random token ids with labels, for a transformers model)."""
        return None

    # ------------------------------------------------------------------ helpers
    def get_backend(self) -> Backend:
        """The backend under test as an instance (a class is instantiated once per test class)."""
        cls = type(self)
        if cls not in _INSTANCES:
            given = cls.backend
            if given is None:
                raise NotImplementedError(f"{cls.__name__} must set `backend` to a kbitprep backend class or instance")
            _INSTANCES[cls] = given() if isinstance(given, type) else given
        return _INSTANCES[cls]

    def require_available(self) -> Backend:
        """The backend, after skipping the check if its required packages are not importable."""
        backend = self.get_backend()
        missing = missing_packages(getattr(backend, "requires", ()))
        if missing:
            _skip(f"{backend.name!r} needs {', '.join(missing)} (install with: {backend.install_hint or missing})")
        return backend

    def registry(self) -> Registry:
        """A fresh registry holding only the backend under test (no entry points read)."""
        reg = Registry(discover=False)
        reg.register(self.require_available(), distribution="<contract test>")
        return reg

    def detect(self, model: nn.Module) -> Detection:
        """Run the detector on a model it must recognise and return the :class:`~kbitprep.plugin.Detection`."""
        backend = self.require_available()
        found = backend.detect(model)
        assert found is not None, f"{backend.name!r} did not recognise the model make_model() returned"
        assert isinstance(found, Detection), f"detect() returned {type(found).__name__}, not a Detection"
        return found

    def declare(self, model: nn.Module) -> tuple[Detection, Declarations]:
        """Detect, then declare; return both (the declarations are checked to be a Declarations)."""
        found = self.detect(model)
        decl = self.get_backend().declare(model, found)
        assert isinstance(decl, Declarations), f"declare() returned {type(decl).__name__}, not Declarations"
        return found, decl

    # ------------------------------------------------------------------ the checks
    def test_contract_attributes(self) -> None:
        """The object has the contract's attributes with the right types, and registers cleanly."""
        backend = self.get_backend()
        assert not contract_problems(backend), f"{backend!r}: " + "; ".join(contract_problems(backend))
        Registry(discover=False).register(backend)  # raises PluginContractError if the registry refuses it

    def test_module_import_does_not_import_its_libraries(self) -> None:
        """Importing the backend's module is cheap: its quantization libraries are imported lazily."""
        backend = self.get_backend()
        module = type(backend).__module__
        if module in ("__main__", "builtins") or module.split(".")[0] in ("test", "tests", "conftest"):
            _skip(f"the backend is defined in {module!r}, not in an importable plugin module")
        libraries = {r.split(".")[0] for r in backend.requires} - {"torch", "transformers", "kbitprep"}
        if not libraries:
            _skip(f"{backend.name!r} requires no library besides torch/transformers")
        eager = sorted(libraries & set(_imports_on_module_import(module)))
        assert not eager, f"`import {module}` imports {', '.join(eager)}; import it inside detect()/declare()"

    def test_detects_its_model_with_evidence(self) -> None:
        """``detect`` recognises the model, says why, and names modules that exist in it."""
        model = self.make_model()
        found = self.detect(model)
        assert found.evidence, "a Detection needs at least one line of evidence"
        assert all(isinstance(e, str) and e.strip() for e in found.evidence), found.evidence
        names = {n for n, _ in model.named_modules()}
        unknown = [m for m in found.modules if m not in names]
        assert not unknown, f"detect() claims modules the model does not have: {unknown[:5]}"
        assert len(set(found.modules)) == len(found.modules), "detect() lists a module twice"
        if self.claims_modules:
            assert found.modules, "a specific backend must claim the modules holding its quantized storage"

    def test_ignores_a_model_it_does_not_handle(self) -> None:
        """``detect`` returns ``None`` for a model it must not claim (by default a plain tiny Llama)."""
        backend = self.require_available()
        other = self.make_other_model()
        if other is None:
            _skip(f"{type(self).__name__}.make_other_model() gives no model {backend.name!r} must ignore")
            return
        before = model_state(other)
        assert backend.detect(other) is None, f"{backend.name!r} claimed a model it must not handle"
        assert model_state(other) == before, "detect() changed the model"

    def test_detect_and_declare_leave_the_model_unchanged(self) -> None:
        """Detection and declaration only look: no dtype, value, flag, hook or attribute changes."""
        model = self.make_model()
        model.eval()
        before = model_state(model)
        self.declare(model)
        assert model_state(model) == before, "detect() or declare() changed the model; declare a FixUp instead"

    def test_declarations_are_consistent(self) -> None:
        """The declarations do not contradict themselves and name tensors that exist."""
        model = self.make_model()
        _, decl = self.declare(model)
        assert not decl.problems(), "; ".join(decl.problems())
        tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        tensors |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
        unknown = sorted(decl.quantized - tensors)
        assert not unknown, f"declared quantized tensors that do not exist: {unknown[:5]}"
        if self.holds_quantized_storage:
            assert decl.quantized, "a quantization backend must declare its quantized storage"
        for fix in decl.fixups:
            assert isinstance(fix, FixUp) and fix.name.strip() and fix.description.strip(), fix
            assert callable(fix.apply), f"fix-up {fix.name!r} has no callable apply"
        assert all(isinstance(n, str) and n.strip() for n in decl.notes), decl.notes
        assert all(isinstance(n, str) and n.strip() for n in decl.warnings), decl.warnings
        modules = {n for n, _ in model.named_modules()}
        if decl.lora_targets is not None:
            missing = sorted(set(decl.lora_targets) - modules)
            assert not missing, f"lora_targets names modules that do not exist: {missing[:5]}"
        if decl.lora_layers is not None and importlib.util.find_spec("peft") is not None:
            mapping = decl.lora_layers()
            assert mapping and all(isinstance(k, type) and isinstance(v, type) for k, v in mapping.items()), (
                "lora_layers() must return {layer class: LoRA layer class}"
            )
        storage = decl.sharded_storage
        if storage is not None:
            unknown_storage = sorted(storage.tensors - tensors)
            assert not unknown_storage, f"sharded_storage names tensors that do not exist: {unknown_storage[:5]}"
            assert isinstance(storage.reload_hint(torch.bfloat16), str) and storage.setting.strip()

    def test_schemes_are_well_formed(self) -> None:
        """Each declared :class:`~kbitprep.plugin.Scheme` has a name, a class and a storage formula that
        gives whole, non-negative bytes (growing with the weight), and a way to load or quantize."""
        backend = self.get_backend()
        schemes = tuple(backend.schemes())
        names = [s.name for s in schemes]
        assert len(names) == len(set(names)), f"scheme names repeat: {names}"
        for s in schemes:
            assert isinstance(s, Scheme), f"{s!r} is not a kbitprep.plugin.Scheme"
            assert s.name.strip() and s.module_class.strip() and s.summary.strip(), s
            small, big = s.bytes_for(64, 64, torch.bfloat16), s.bytes_for(128, 256, torch.bfloat16)
            for data, extra in (small, big):
                assert isinstance(data, int) and isinstance(extra, int) and data > 0 and extra >= 0, (s.name, data)
            assert sum(big) > sum(small), f"{s.name}: storage does not grow with the weight"
            if s.quantizes:
                assert s.quantization_config is not None or s.quantize is not None, (
                    f"{s.name}: a quantizing scheme needs quantization_config= or quantize="
                )

    def test_plan_protects_quantized_storage(self) -> None:
        """``kbitprep.plan`` never upcasts or unfreezes declared quantized tensors, under any policy."""
        model = self.make_model()
        _, decl = self.declare(model)
        before = model_state(model)
        policy = "all" if decl.allow_upcast else "none"
        the_plan = plan(model, registry=self.registry(), upcast=policy)
        assert model_state(model) == before, "plan() changed the model"
        assert the_plan.backend == self.get_backend().name
        wrong = [p.name for p in the_plan.params if p.quantized and (p.upcast or p.requires_grad_after)]
        assert not wrong, f"quantized parameters the plan would upcast or train: {wrong[:5]}"
        declared_params = {n for n in decl.quantized if n in dict(model.named_parameters(remove_duplicate=False))}
        planned = {a for p in the_plan.quantized for a in p.aliases}
        assert declared_params <= planned, f"declared but not protected: {sorted(declared_params - planned)[:5]}"
        assert not [p.name for p in the_plan.params if p.requires_grad_after and not p.adapter]

    def test_registry_selects_it(self) -> None:
        """The registry picks this backend for its model, alone and among every installed backend."""
        backend = self.require_available()
        model = self.make_model()
        assert self.registry().select(model).primary.name == backend.name
        everything = Registry()
        if backend.name not in everything:
            everything.register(backend, distribution="<contract test>")
        chosen = everything.select(model).primary
        assert chosen.name == backend.name, (
            f"among the installed backends, {chosen.name!r} (priority {chosen.backend.priority}) is chosen "
            f"over {backend.name!r} (priority {backend.priority})"
        )

    def test_prepare_and_undo_are_exact(self) -> None:
        """In each declared checkpointing mode (and with it off): prepare freezes everything, keeps
        quantized storage bit-identical, sets checkpointing as planned; a second prepare changes
        nothing; undo restores the model exactly."""
        model = self.make_model()
        _, decl = self.declare(model)
        reg = self.registry()
        before = model_state(model)
        if not decl.trainable:
            try:
                prepare(model, registry=reg)
            except NotTrainableError:
                assert model_state(model) == before, "a refused prepare changed the model"
                return
            raise AssertionError("the backend declares the model not trainable but prepare() accepted it")
        stored = _storage(before, decl.quantized)
        modes: list[CheckpointMode] = [*sorted(decl.checkpointing, key=lambda m: m.value), CheckpointMode.OFF]
        for mode in modes:
            prepare(model, registry=reg, checkpointing=mode.value)
            after = model_state(model)
            assert report(model).plan.backend == self.get_backend().name
            assert not [n for n, p in model.named_parameters() if p.requires_grad], f"{mode}: not all frozen"
            changed = sorted(n for n, s in _storage(after, decl.quantized).items() if stored[n] != s)
            assert not changed, f"{mode}: quantized tensors changed: {changed[:5]}"
            on, reentrant = _checkpoint_flags(model)
            planned = report(model).plan.checkpointing
            if planned is CheckpointMode.OFF:
                assert not on, f"{mode}: checkpointing is on although the plan says off"
            else:
                assert on, f"{mode}: the plan enables checkpointing but no module has it on"
                assert reentrant <= {planned is CheckpointMode.REENTRANT}, f"{mode}: use_reentrant is {reentrant}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepare(model, registry=reg)
            assert any(issubclass(w.category, AlreadyPreparedWarning) for w in caught)
            assert model_state(model) == after, f"{mode}: a second prepare changed the model"
            undo(model)
            assert prepared_state(model) is None
            assert model_state(model) == before, f"{mode}: undo did not restore the model exactly"

    def test_gradients_flow_after_prepare(self) -> None:
        """After prepare (the backend's defaults), a forward/backward reaches inside the frozen model."""
        model = self.make_model()
        _, decl = self.declare(model)
        if not decl.trainable:
            _skip(f"the backend declares the model not trainable: {decl.not_trainable_reason}")
        prepare(model, registry=self.registry())
        try:
            result = verify_gradient_flow(model, self.make_inputs(model))
            assert result.ok, result
        finally:
            undo(model)
