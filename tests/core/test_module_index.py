"""One walk of the module tree per plan: ``kbitprep.plugin.ModuleIndex`` / ``module_index``.

The registry opens a scope around detection and around declaration in which every detector and
declaration shares one index of the model, so the built-in plugins (and the contract helpers
``find_modules`` / ``detect_layers`` / ``quantized_tensor_names``) no longer walk the model each.
Measured with ``kbitprep.testing.count_module_walks`` (``benchmarks/module_walks.py`` prints it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep import Registry
from kbitprep._registry import module_index_scope
from kbitprep.plugin import (
    Backend,
    Declarations,
    Detection,
    ModuleIndex,
    _class_matches,
    detect_layers,
    find_modules,
    module_index,
    quantized_tensor_names,
)
from kbitprep.testing import count_module_walks

from ..tiny import nf4_config, saved_tiny_llama, tiny_llama

#: Callers on the plugin side of a plan: the backends, the contract helpers, the registry.
PLUGIN_SIDE = ("kbitprep_plugins", "kbitprep.plugin", "kbitprep._registry")
#: The plugin side walks twice (one index for the detectors, one for the declarations; once when the
#: planner wraps both in one scope); before the index, 16 times for the bnb-4bit Llama, 15 unquantized.
MAX_PLUGIN_SIDE_WALKS = 2
#: The core's own walks (parameters, buffers, the anatomy, FSDP detection: 6 or 7 at the time of
#: writing) do not depend on the backends; before the index, a plan walked 22 times in all.
MAX_WALKS_PER_PLAN = MAX_PLUGIN_SIDE_WALKS + 8


@pytest.fixture(scope="module")
def bnb_llama() -> nn.Module:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            saved_tiny_llama(), quantization_config=nf4_config(), dtype=torch.bfloat16
        )


def _walks_of_one_plan(model: nn.Module, **kw: object) -> tuple[kbitprep.Plan, int, int, str]:
    kbitprep.default_registry().names()  # discovery is not part of a plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with count_module_walks(model) as walks:
            the_plan = kbitprep.plan(model, **kw)  # type: ignore[arg-type]
    return the_plan, walks.total, walks.count(*PLUGIN_SIDE), str(walks)


# --------------------------------------------------------------------------- walks per plan


def test_a_plan_of_a_bnb_4bit_llama_walks_the_module_tree_a_few_times(bnb_llama: nn.Module) -> None:
    the_plan, total, plugin_side, detail = _walks_of_one_plan(bnb_llama)
    assert the_plan.backend == "bnb-4bit"
    assert plugin_side <= MAX_PLUGIN_SIDE_WALKS, detail  # 16 before the index
    assert total <= MAX_WALKS_PER_PLAN, detail  # 22 before the index


def test_a_plan_of_an_unquantized_llama_walks_the_module_tree_a_few_times() -> None:
    the_plan, total, plugin_side, detail = _walks_of_one_plan(tiny_llama())
    assert the_plan.backend == "unquantized"
    assert plugin_side <= MAX_PLUGIN_SIDE_WALKS, detail  # 15 before the index
    assert total <= MAX_WALKS_PER_PLAN, detail  # 21 before the index


def test_the_walks_per_plan_do_not_grow_with_the_number_of_backends(bnb_llama: nn.Module) -> None:
    alone = Registry(discover=False)
    alone.register(kbitprep.default_registry().get("bnb-4bit").backend, distribution="kbitprep")
    _, with_one, _, _ = _walks_of_one_plan(bnb_llama, registry=alone)
    _, with_all, _, detail = _walks_of_one_plan(bnb_llama)
    assert len(kbitprep.default_registry().names()) > 10
    assert with_all == with_one, detail  # before the index: 22 against 11


def test_one_scope_around_selection_and_declaration_walks_once_for_every_backend(bnb_llama: nn.Module) -> None:
    """What the planner gets by wrapping select and declare in one ``module_index_scope``."""
    reg = kbitprep.default_registry()
    with count_module_walks(bnb_llama) as walks, module_index_scope(bnb_llama):
        sel = reg.select(bnb_llama)
        decls = [reg.declare(info, bnb_llama, det) for info, det in sel.detections]
    assert sel.primary.name == "bnb-4bit" and decls[0].quantized
    assert walks.count(*PLUGIN_SIDE) == walks.total == 1, str(walks)


def test_the_plan_is_the_same_as_with_every_detector_walking_for_itself(
    bnb_llama: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        indexed = kbitprep.plan(bnb_llama)
        monkeypatch.setattr("kbitprep._registry._module_index_scope", lambda model: contextlib.nullcontext())
        with count_module_walks(bnb_llama) as walks:
            unindexed = kbitprep.plan(bnb_llama)  # no scope: every module_index() call walks afresh
    assert walks.count(*PLUGIN_SIDE) > MAX_PLUGIN_SIDE_WALKS
    assert indexed.params == unindexed.params
    assert indexed.evidence == unindexed.evidence
    assert [_comparable(d) for d in indexed.declarations] == [_comparable(d) for d in unindexed.declarations]


def _comparable(decl: Declarations) -> tuple[object, ...]:
    """The declarations without their functions (fix-ups, reload hints: new closures each time)."""
    storage = decl.sharded_storage
    return (
        dataclasses.replace(decl, fixups=(), sharded_storage=None),
        tuple(f.name for f in decl.fixups),
        None if storage is None else (storage.tensors, storage.dtype, storage.compute_dtype),
    )


# --------------------------------------------------------------------------- the index


class _Shared(nn.Module):
    """A module reachable under two names, and itself as a grandchild's child (walked once)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Sequential(nn.ReLU(), self.a)
        self.norm = nn.LayerNorm(2)


@pytest.mark.parametrize("make", [tiny_llama, _Shared, lambda: nn.Linear(2, 2)], ids=["llama", "shared", "leaf"])
def test_the_index_equals_a_fresh_walk(make: type[nn.Module]) -> None:
    model = make()
    index = ModuleIndex(model)
    walk = list(model.named_modules())
    assert list(index.items()) == walk  # same names, same modules, same order
    assert index == dict(walk) and len(index) == len(walk) and index.root is model
    assert "" in index and index[""] is model and "nope" not in index
    by_class: dict[type, list[str]] = {}
    for name, mod in walk:
        by_class.setdefault(type(mod), []).append(name)
    assert {c: list(n) for c, n in index.classes.items()} == by_class
    for wanted in (("Linear",), (nn.Linear, "LayerNorm"), ("torch.nn.ReLU",), ("nn.modules.linear.Linear",), ("X",)):
        assert index.find(*wanted) == [n for n, m in walk if _class_matches(type(m), wanted)], wanted


def test_the_index_is_read_only() -> None:
    index = ModuleIndex(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError):
        index["x"] = nn.ReLU()  # type: ignore[index]
    with pytest.raises(TypeError):
        index.classes[nn.ReLU] = ("x",)  # type: ignore[index]
    assert "ModuleIndex of Sequential: 2 modules" in repr(index)


def test_outside_a_plan_every_call_walks_afresh() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with count_module_walks(model) as walks:
        first, second = module_index(model), module_index(model)
        find_modules(model, nn.Linear)
    assert first is not second and first == second
    assert walks.total == 3


def test_inside_a_scope_the_helpers_share_one_index_built_on_first_use() -> None:
    model = nn.Sequential(nn.Linear(2, 2, dtype=torch.bfloat16), nn.Linear(2, 2))
    other = nn.Sequential(nn.ReLU())
    with count_module_walks(model) as walks, module_index_scope(model):
        assert walks.total == 0  # lazily: a scope no detector asks in costs nothing
        index = module_index(model)
        assert find_modules(model, nn.Linear) == ["0", "1"]
        det = detect_layers(model, nn.Linear)
        assert det is not None and det.modules == ("0", "1")
        assert quantized_tensor_names(model, ["0"], include=lambda n, t: True) == {"0.weight", "0.bias"}
        with module_index_scope(model):  # nested, same model: the same index
            assert module_index(model) is index
        with module_index_scope(other):  # another model shadows it for the block
            assert module_index(other) is module_index(other)
            assert module_index(model) is not index
        assert module_index(model) is index
        assert module_index(model[0]) is not module_index(model[0])  # a submodule is not the scope's model
    assert walks.total == 2, str(walks)  # the index, and the shadowed block's fresh one


def test_no_index_outlives_its_plan_a_changed_model_gets_a_fresh_one() -> None:
    seen: list[ModuleIndex] = []

    class Recording(Backend):
        name = "recording"
        priority = 100

        def detect(self, model: nn.Module) -> Detection | None:
            index = module_index(model)
            seen.append(index)
            return Detection(evidence=("recorded",), modules=tuple(index.find("Embedding")))

        def declare(self, model: nn.Module, detection: Detection) -> Declarations:
            seen.append(module_index(model))
            return Declarations()

    reg = Registry(discover=False)
    reg.register(Recording)
    model = tiny_llama()
    kbitprep.plan(model, registry=reg)
    model.model.extra_embedding = nn.Embedding(4, 4, dtype=torch.bfloat16)  # changed between two plans
    second = kbitprep.plan(model, registry=reg)
    first_plan, second_plan = seen[:2], seen[2:]
    assert len(seen) == 4 and not {id(i) for i in first_plan} & {id(i) for i in second_plan}
    assert "model.extra_embedding" in second_plan[0] and "model.extra_embedding" not in first_plan[0]
    assert "model.extra_embedding.weight" in {p.name for p in second.params}


def test_threads_planning_one_model_at_once_never_share_an_index() -> None:
    """Both threads are inside their plan's scope at the same time (a barrier in the detector)."""
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, list[ModuleIndex]] = {}
    lock = threading.Lock()

    def record(what: str, model: nn.Module) -> None:
        with lock:
            seen.setdefault(threading.current_thread().name, []).append(module_index(model))

    class First(Backend):
        name = "first"
        priority = 100

        def detect(self, model: nn.Module) -> Detection | None:
            record("first", model)
            barrier.wait()
            return Detection(evidence=("first",), modules=tuple(find_modules(model, nn.Embedding)))

        def declare(self, model: nn.Module, detection: Detection) -> Declarations:
            return Declarations()

    class Second(First):
        name = "second"
        priority = 10

        def detect(self, model: nn.Module) -> Detection | None:
            record("second", model)
            return None

    reg = Registry(discover=False)
    reg.register(First)
    reg.register(Second)
    model = tiny_llama()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reg.select(model)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, name=f"planner-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(seen) == ["planner-0", "planner-1"]
    for indexes in seen.values():
        assert len(indexes) == 2 and indexes[0] is indexes[1]  # one index for the detectors of one selection
    assert seen["planner-0"][0] is not seen["planner-1"][0]
    assert module_index(model) is not seen["planner-0"][0]  # and none leaks out of them


def test_a_detector_that_raises_does_not_leave_its_scope_behind() -> None:
    class Raising(Backend):
        name = "raising"
        priority = 100

        def detect(self, model: nn.Module) -> Detection | None:
            module_index(model)
            raise RuntimeError("detector exploded")

        def declare(self, model: nn.Module, detection: Detection) -> Declarations:
            return Declarations()

    reg = Registry(discover=False, strict=False)
    reg.register(Raising)
    model = tiny_llama()
    with pytest.warns(kbitprep.PluginWarning), pytest.raises(kbitprep.BackendMismatchError):
        reg.select(model)
    assert module_index(model) is not module_index(model)


# --------------------------------------------------------------------------- plugins that walk for themselves


class SelfWalkingBackend(Backend):
    """A third-party plugin written before the index: it walks the model itself, every time."""

    name = "self-walking"
    priority = 100

    def detect(self, model: nn.Module) -> Detection | None:
        norms = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
        if not norms:
            return None
        return Detection(evidence=(f"{len(norms)} x LlamaRMSNorm",), modules=tuple(norms))

    def declare(self, model: nn.Module, detection: Detection) -> Declarations:
        mods = dict(model.named_modules())
        assert all(n in mods for n in detection.modules)
        return Declarations(notes=(f"walked {len(mods)} modules itself",))


def test_a_third_party_plugin_walking_for_itself_keeps_working() -> None:
    model = tiny_llama()
    reg = Registry(discover=False)
    reg.register(SelfWalkingBackend)
    with count_module_walks(model) as walks:
        the_plan = kbitprep.plan(model, registry=reg)
    assert the_plan.backend == "self-walking"
    assert the_plan.evidence == ("5 x LlamaRMSNorm",)
    assert f"walked {len(dict(model.named_modules()))} modules itself" in the_plan.notes
    assert walks.count(__name__) == 2  # its own walks, made as before


def test_a_self_walking_plugin_next_to_the_builtins(bnb_llama: nn.Module) -> None:
    reg = Registry()
    reg.register(SelfWalkingBackend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        the_plan = kbitprep.plan(bnb_llama, registry=reg)
    assert the_plan.backends == ("bnb-4bit", "self-walking")  # it joins: it claims other modules


# --------------------------------------------------------------------------- the counter


def test_count_module_walks_counts_every_walk_of_the_root_and_restores_the_model() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    assert "named_modules" not in vars(model)
    with count_module_walks(model) as outer:
        list(model.parameters())
        list(model.named_buffers())
        list(model[1].modules())  # a submodule's walk is not the root's
        with count_module_walks(model) as inner:
            list(model.modules())
        dict(model.named_modules())
    assert "named_modules" not in vars(model)
    assert inner.total == 1
    assert outer.total == 4 and outer.count(__name__) == 4 and outer.count("kbitprep") == 0, str(outer)
    assert str(outer).startswith("4 walks of the module tree")
