"""Property tests at scale: more than a thousand random stand-in trees per run (issue 18, item 4).

``test_properties.py`` checks the invariants on real quantized layers, which are slow to build, so
it runs few examples. Here the trees of :mod:`tests.reliability.random_trees` (stand-in layers
declared by test backends through the public plugin contract) make each example cost
milliseconds, and every run checks, on each of ``EXAMPLES`` seeded examples:

* ``plan`` changes nothing (a full state capture before and after is equal), a plan refused for
  its options changes nothing either, and planning twice gives the same plan;
* prepare applies exactly the plan: every parameter (each name of a tied one) has the dtype and
  ``requires_grad`` the plan says, the plan covers every parameter, an upcast is exact, every
  other stored byte (quantized storage above all) is unchanged, the same objects sit under the
  same names, and the only other changes are the ones the plan announces (checkpointing with its
  keyword arguments, the input-require-grads hook, ``use_cache``, the backends' fix-ups);
* prepare twice warns (:class:`~kbitprep.errors.AlreadyPreparedWarning`) and changes nothing;
* undo restores the full state capture bit for bit;
* a fault (an error, a KeyboardInterrupt or an out-of-memory) injected at a step of prepare (a
  freeze, a fix-up, an upcast, checkpointing, a hook, ``use_cache``; chosen at random, and the
  first and last step of every kind in one example out of eight) reaches the caller and leaves the
  model as it was, after which prepare works and gives the same result as the first time.

An untrainable backend's model is refused by prepare and left unchanged. The examples are the same
on every run (seeds ``FIRST_SEED`` to ``FIRST_SEED + EXAMPLES - 1``). A failing example is shrunk
to a small recipe, printed with the error as a line that reproduces it. The self-checks at the end
break each invariant on purpose and show the checks catch it.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NoReturn

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep import (
    AlreadyPreparedWarning,
    CheckpointMode,
    InvalidPolicyError,
    NoParametersError,
    NotPreparedError,
    NotTrainableError,
    ParamPlan,
    Plan,
    Registry,
)
from kbitprep.plugin import HALF_DTYPES

from . import figures
from .random_trees import (
    ERRORS,
    SEAMS,
    Container,
    Effects,
    Faults,
    Int8Linear,
    Leaf,
    Options,
    Packed4Linear,
    Recipe,
    Rules,
    build,
    fixup_effects,
    injecting,
    random_recipe,
    registry_for,
    shrink,
)
from .support import assert_restored, differences, full_state, recorded_warnings

#: examples per run (``KBITPREP_TREE_EXAMPLES`` runs more, for a longer search on a workstation)
EXAMPLES = int(os.environ.get("KBITPREP_TREE_EXAMPLES", "1200"))
#: the first seed (``KBITPREP_TREE_SEED`` explores other examples; CI always runs the same ones)
FIRST_SEED = int(os.environ.get("KBITPREP_TREE_SEED", "0"))
#: the examples run as this many tests, so one failure does not hide the others
CHUNKS = 4
#: the least number of examples a run must check (issue 18)
REQUIRED = 1000

#: what the examples of this run contained and how they ended (printed at the end of the session)
RAN: Counter[str] = Counter()
#: attributes checkpointing may set on a module that has a ``gradient_checkpointing`` flag (transformers'
#: per-layer flags), and on any module (the handle of the input-require-grads hook transformers registers)
CHECKPOINT_FLAGS = frozenset({"gradient_checkpointing", "_gradient_checkpointing_func"})
CHECKPOINT_HANDLES = frozenset({"_require_grads_hook", "_require_grads_hooks"})
#: the ways an example breaks an invariant on purpose (the self-checks): a quantized byte changed in place after
#: plan / prepare / the second prepare / undo / a fault, an undo before the second prepare, a plugin whose
#: declare() changes the model, a plugin whose fix-up writes into quantized storage in place
SABOTAGES = ("plan", "prepare", "twice", "no-warning", "undo", "fault", "plugin-meddles", "plugin-scribbles")


# --------------------------------------------------------------------------- one example


def check_example(recipe: Recipe, sabotage: str = "") -> str:
    """Build ``recipe`` and check every invariant on it; return how it ended.

    ``sabotage`` (one of :data:`SABOTAGES`) breaks one invariant on purpose: an assertion must fail.
    """
    registry = registry_for(recipe, meddle=sabotage == "plugin-meddles", scribble=sabotage == "plugin-scribbles")
    with recorded_warnings():  # transformers' and PEFT's deprecation warnings, the backends' warnings
        return _check(build(recipe), registry, recipe, sabotage)


def _check(model: nn.Module, registry: Registry, recipe: Recipe, sabotage: str) -> str:
    before = full_state(model)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    originals = {n: t.detach().clone() for n, t in tensors.items()}

    # plan changes nothing (nor does a refused plan), and is deterministic
    planned = _plan(model, registry, recipe.options.kwargs(), before)
    if planned is None:
        return "refused: no float parameters"
    plan, options = planned
    if sabotage == "plan":
        _tamper(model)
    assert_restored(model, before, "plan")
    assert kbitprep.plan(model, registry=registry, **options).to_dict() == plan.to_dict(), "planning twice differs"
    _check_plan_rules(plan)

    call: dict[str, Any] = {"plan": plan} if recipe.options.with_plan else {"registry": registry, **options}
    if not plan.trainable:
        with pytest.raises(NotTrainableError):
            kbitprep.prepare(model, **call)
        assert_restored(model, before, "a prepare refused as untrainable")
        return "refused: not trainable"

    # prepare applies exactly the plan (its steps counted at the fault seams)
    counted = Faults()
    with injecting(counted):
        kbitprep.prepare(model, **call)
    if sabotage == "prepare":
        _tamper(model)
    after = full_state(model)
    check_applied(model, plan, before, after, originals)
    steps = counted.steps
    _check_seams(steps, plan)

    # prepare twice warns and changes nothing
    if sabotage == "no-warning":
        kbitprep.undo(model)
    with recorded_warnings() as caught:
        kbitprep.prepare(model, **call)
    if sabotage == "twice":
        _tamper(model)
    assert any(issubclass(w.category, AlreadyPreparedWarning) for w in caught), "preparing twice did not warn"
    diff = differences(after, full_state(model))
    assert not diff, "preparing twice changed the model:\n" + "\n".join(diff[:20])

    # undo restores the full state bit for bit
    kbitprep.undo(model)
    if sabotage == "undo":
        _tamper(model)
    assert_restored(model, before, "undo")

    # a fault at a step of prepare leaves the model as it was
    for k in _fault_steps(recipe, steps):
        _inject(model, call, before, steps, k, ERRORS[recipe.error], tamper=sabotage == "fault")

    # and prepare then works, with the same result
    kbitprep.prepare(model, **call)
    effects = fixup_effects(model, [f.name for f in plan.fixups])
    diff = differences(_comparable(after, effects), _comparable(full_state(model), effects))
    assert not diff, "prepare after undo (and faults) differs from the first prepare:\n" + "\n".join(diff[:20])
    kbitprep.undo(model)
    assert_restored(model, before, "undo after a second prepare")
    return "prepared"


def _plan(
    model: nn.Module, registry: Registry, options: dict[str, Any], before: dict[str, Any]
) -> tuple[Plan, dict[str, Any]] | None:
    """The plan for ``options``; when a backend refuses the upcast or checkpointing asked, the
    model must be unchanged and the plan is made with that option at its default."""
    attempts = [
        options,
        {**options, "upcast": "none"},
        {**options, "checkpointing": True},
        {**options, "upcast": "none", "checkpointing": True},
    ]
    for attempt in attempts:
        try:
            return kbitprep.plan(model, registry=registry, **attempt), attempt
        except InvalidPolicyError as exc:
            assert_restored(model, before, f"a refused plan ({exc})")
            RAN["option refused by a backend"] += 1
        except NoParametersError:
            assert_restored(model, before, "a plan refused for want of parameters")
            return None
    raise AssertionError(f"every fallback of {options} was refused")


def _check_plan_rules(plan: Plan) -> None:
    """Rules any plan follows: only adapters stay trainable; only plain fp16/bf16 is cast, to fp32."""
    for pp in plan.params:
        assert pp.requires_grad_after == (pp.requires_grad_before and pp.adapter), pp.name
        if pp.upcast:
            assert pp.dtype_before in HALF_DTYPES and pp.dtype_after is torch.float32, pp.name
            assert not pp.quantized and not pp.adapter, pp.name
    if plan.upcast_policy == "none":
        assert not plan.to_upcast


def check_applied(
    model: nn.Module, plan: Plan, before: dict[str, Any], after: dict[str, Any], originals: dict[str, torch.Tensor]
) -> None:
    """Prepare did what ``plan`` says and nothing else (``before``/``after``: full state captures)."""
    assert after["prepared"], "prepare left no record on the model"
    report = kbitprep.report(model)
    assert report.plan.to_dict() == plan.to_dict(), "prepare applied another plan"
    effects = fixup_effects(model, [f.name for f in plan.fixups])
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    covered: set[str] = set()
    for pp in plan.params:
        for name in pp.aliases:
            covered.add(name)
            _check_tensor(name, pp, before, after, tensors[name], originals, effects)
    uncovered = set(before["params"]) - covered
    assert not uncovered, f"the plan does not say what happens to {sorted(uncovered)}"
    for name, state in before["buffers"].items():
        if name in effects.rewritten:
            assert torch.equal(tensors[name], originals[name].flip(-1)), f"{name} is not what the repack made of it"
        elif name not in covered | effects.buffers:
            assert after["buffers"][name] == state, f"buffer {name} changed, which the plan does not say"
    for key in ("param_ids", "module_ids", "devices"):
        diff = differences({key: before[key]}, {key: after[key]})
        assert not diff, "prepare replaced objects or moved tensors: " + "; ".join(diff[:5])
    replaced = {n for n, i in before["buffer_ids"].items() if after["buffer_ids"].get(n) != i}
    assert set(after["buffer_ids"]) == set(before["buffer_ids"]) and replaced <= effects.buffers, replaced
    flagged = {n for n, m in model.named_modules(remove_duplicate=False) if _has_checkpointing_flag(m)}
    _check_modules(plan, before, after, effects, flagged)
    assert len(report.hooks_added) == _expected_embedding_hooks(plan), report.hooks_added
    _check_checkpointing(model, plan)
    _check_configs(model, plan, before, after)


def _check_tensor(
    name: str,
    pp: ParamPlan,
    before: dict[str, Any],
    after: dict[str, Any],
    tensor: torch.Tensor,
    originals: dict[str, torch.Tensor],
    effects: Effects,
) -> None:
    if name in before["params"]:
        dtype0, cls0, data0, grad0, digest0 = before["params"][name]
        dtype1, cls1, data1, grad1, digest1 = after["params"][name]
        assert (dtype0, grad0) == (pp.dtype_before, pp.requires_grad_before), f"the plan misdescribes {name}"
        assert (dtype1, grad1) == (pp.dtype_after, pp.requires_grad_after), (
            f"{name} is {dtype1} requires_grad={grad1} after prepare; "
            f"the plan said {pp.dtype_after} requires_grad={pp.requires_grad_after}"
        )
        assert (cls1, data1) == (cls0, data0), f"{name} changed class"
    else:  # a buffer a backend declared quantized storage
        dtype0, _, digest0 = before["buffers"][name]
        dtype1, _, digest1 = after["buffers"][name]
        assert pp.quantized and not pp.upcast and dtype0 == dtype1 == pp.dtype_before, name
    if pp.upcast:
        back = tensor.detach().to(pp.dtype_before)
        exact = torch.equal(back.view(torch.int16), originals[name].view(torch.int16))
        assert exact, f"the fp32 upcast of {name} does not cast back to the same bits"
    elif name in effects.rewritten:  # the repack fix-up: exactly its new data
        assert torch.equal(tensor, originals[name].flip(-1)), f"{name} is not what the repack fix-up made of it"
    elif name not in effects.buffers:
        what = "quantized storage" if pp.quantized else "a tensor"
        assert digest1 == digest0, f"{name} ({what}) has other bytes after prepare, but the plan keeps it as it is"


def _expected_embedding_hooks(plan: Plan) -> int:
    """Input-require-grads hooks prepare adds (its own, or transformers' with checkpointing)."""
    return sum(1 for h in plan.hooks if "not added again" not in h)


def _has_checkpointing_flag(mod: nn.Module) -> bool:
    """Whether the module has its own or its class's ``gradient_checkpointing`` (not PEFT's forwarding)."""
    return "gradient_checkpointing" in vars(mod) or hasattr(type(mod), "gradient_checkpointing")


def _check_modules(
    plan: Plan, before: dict[str, Any], after: dict[str, Any], effects: Effects, flagged: set[str]
) -> None:
    """Module attributes and hooks changed only where checkpointing, the input hook and fix-ups may
    (``flagged``: the modules with a checkpointing flag)."""
    checkpointing = plan.checkpointing is not CheckpointMode.OFF
    for name, (cls0, names0, simple0, _) in before["modules"].items():
        cls1, names1, simple1, _ = after["modules"][name]
        assert cls0 == cls1, name
        s0, s1 = dict(simple0), dict(simple1)
        changed = (set(names0) ^ set(names1)) | {k for k in s0.keys() | s1.keys() if s0.get(k) != s1.get(k)}
        allowed = {attr for (mod, attr) in effects.attrs if mod == name}
        if checkpointing:
            allowed |= CHECKPOINT_HANDLES | (CHECKPOINT_FLAGS if name in flagged else set())
        if plan.use_cache_off:
            allowed |= {"save_pretrained"}  # saves write the loaded use_cache (kbitprep._saving)
        assert changed <= allowed, f"module {name or '<root>'}: {sorted(changed - allowed)} changed, not in the plan"
    added: list[str] = []
    for name, dicts in before["hook_objects"].items():
        for kind, hooks in dicts.items():
            now = after["hook_objects"][name][kind]
            assert now[: len(hooks)] == hooks, f"prepare removed or replaced {kind} of {name or '<root>'}"
            extra = len(now) - len(hooks)
            if kind == "_forward_pre_hooks" and name == "" and plan.master_weights:
                assert extra == 1, f"prepare added {extra} pre-hooks to the root; the plan announced master weights"
            elif kind != "_forward_hooks":
                assert not extra, f"prepare added {kind} to {name or '<root>'}"
            elif name in effects.hooks:
                assert extra == 1, f"the hook fix-up added {extra} hooks to {name}"
            else:
                added += [name] * extra
    expected = _expected_embedding_hooks(plan)
    assert len(added) == expected, f"prepare added forward hooks on {added}; the plan announced {expected}"
    for name in added:
        assert before["modules"][name][0] == "Embedding", f"an input hook on {name}, not on the embeddings"


def _check_checkpointing(model: nn.Module, plan: Plan) -> None:
    """With checkpointing planned, every flagged module checkpoints with the plan's keyword arguments."""
    if plan.checkpointing is CheckpointMode.OFF:
        return  # _check_modules showed no checkpointing flag changed
    reentrant = plan.checkpointing is CheckpointMode.REENTRANT
    assert bool(plan.checkpointing_kwargs.get("use_reentrant", True)) == reentrant, dict(plan.checkpointing_kwargs)
    flagged = [m for m in model.modules() if _has_checkpointing_flag(m)]
    assert flagged, f"{plan.checkpointing.value} checkpointing planned, but no module can checkpoint"
    for mod in flagged:
        assert vars(mod).get("gradient_checkpointing") is True, f"a {type(mod).__name__} does not checkpoint"
        func = vars(mod).get("_gradient_checkpointing_func")
        assert isinstance(func, functools.partial), type(func)
        assert func.keywords == dict(plan.checkpointing_kwargs), (func.keywords, dict(plan.checkpointing_kwargs))


def _check_configs(model: nn.Module, plan: Plan, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Only ``use_cache`` changes in a config, off, on the configs the plan names."""
    if before["config"] is not None:
        changed = {
            k
            for k in before["config"].keys() | after["config"].keys()
            if before["config"].get(k) != after["config"].get(k)
        }
        assert changed <= ({"use_cache"} if plan.use_cache_off else set()), changed
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and type(cfg).__name__ in plan.use_cache_off:
            assert cfg.use_cache is False, f"use_cache of {type(cfg).__name__} is still on"


def _check_seams(steps: list[str], plan: Plan) -> None:
    """The fault seams saw every freeze, upcast and fix-up of the plan (else faults would miss steps)."""
    assert steps.count("freeze") == len(plan.to_freeze), "the freeze seam (torch.Tensor.requires_grad_) missed steps"
    assert steps.count("upcast") == len(plan.to_upcast), "the upcast seam (torch.Tensor.to) missed steps"
    assert steps.count("fixup") >= len(plan.fixups), "a fix-up ran without passing its seam"


def _fault_steps(recipe: Recipe, steps: list[str]) -> list[int]:
    """The steps (1-based) to fail: one at random, and with ``sweep`` the first and last of each kind."""
    if not steps:
        return []
    chosen = {1 + int(recipe.fault_at * len(steps))}
    if recipe.sweep:
        for seam in set(steps):
            chosen |= {steps.index(seam) + 1, len(steps) - steps[::-1].index(seam)}
    return sorted(chosen)


def _inject(
    model: nn.Module,
    call: dict[str, Any],
    before: dict[str, Any],
    steps: list[str],
    k: int,
    error: type[BaseException],
    *,
    tamper: bool,
) -> None:
    """Fail step ``k`` of a prepare with ``error``: it must reach the caller, the model as it was."""
    faults = Faults(k, error)
    try:
        with injecting(faults):
            kbitprep.prepare(model, **call)
    except BaseException as exc:
        if exc is not faults.raised:
            raise
    else:
        raise AssertionError(f"the fault at step {k} never fired: prepare took {len(faults.steps)} steps, not {steps}")
    assert faults.steps == steps[:k], f"prepare took other steps than the first time: {faults.steps} / {steps}"
    if tamper:
        _tamper(model)
    seam = steps[k - 1]
    assert_restored(model, before, f"a fault ({error.__name__}) at step {k} of {len(steps)} ({seam})")
    with pytest.raises(NotPreparedError):
        kbitprep.report(model)
    RAN[f"fault during {seam}"] += 1
    RAN[f"fault raised {error.__name__}"] += 1
    figures.fault(
        f"random stand-in trees: a fault during the {seam} steps of prepare",
        f"{_SEAM_HOW[seam]} raising a RuntimeError, KeyboardInterrupt or OutOfMemoryError",
    )


_SEAM_HOW = {
    "freeze": "torch.Tensor.requires_grad_ (after the change)",
    "upcast": "torch.Tensor.to(torch.float32) (before the copy)",
    "hook": "nn.Module.register_forward_hook (after the registration)",
    "fixup": "a test backend's FixUp (after each layer it changed)",
    "checkpointing": "the model's checkpointing method (after each layer it flagged)",
    "use_cache": "the config's use_cache assignment (after it)",
}


def _comparable(state: dict[str, Any], effects: Effects) -> dict[str, Any]:
    """A full state without what a second prepare makes anew: hook objects, buffers a fix-up replaces."""
    ids = {n: i for n, i in state["buffer_ids"].items() if n not in effects.buffers}
    return {**state, "hook_objects": None, "buffer_ids": ids}


def _tamper(model: nn.Module) -> None:
    """Change one byte of the last stand-in's quantized storage in place (what nothing may do: the self-checks)."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear | Packed4Linear)]
    assert layers, "the sabotage needs a stand-in quantized layer"
    storage = next(t for t in (*layers[-1].parameters(), *layers[-1].buffers()) if not t.dtype.is_floating_point)
    with torch.no_grad():
        storage.view(-1)[0] += 1


# --------------------------------------------------------------------------- the examples


def _counts(*prefixes: str) -> str:
    """``name count, ...`` of the :data:`RAN` entries starting with one of ``prefixes``."""
    found = [(k, v) for k, v in sorted(RAN.items()) if k.startswith(prefixes)]
    return ", ".join(f"{k.removeprefix('with ').removeprefix('fault ')} {v}" for k, v in found)


@functools.cache
def _summary_plugin() -> object:
    """A pytest plugin printing this module's figures with the reliability figures (registered once)."""

    class Summary:
        cpu: list[float] = []

        def pytest_terminal_summary(self, terminalreporter: Any) -> None:
            n = RAN["examples"]
            if not n:
                return
            cpu = sum(self.cpu)
            tr = terminalreporter
            tr.section("kbitprep random stand-in trees")
            tr.write_line(f"examples: {n} in {cpu:.1f} s of CPU ({1000 * cpu / n:.1f} ms each)")
            tr.write_line(f"  ended: {_counts('prepared', 'refused')}")
            tr.write_line(f"  plans refused for an option a backend forbids: {RAN['option refused by a backend']}")
            tr.write_line(f"  faults injected: {_counts('fault ')}")  # during a kind of step, raising
            tr.write_line(f"  examples with: {_counts('with ')}")

    return Summary()


@pytest.fixture(scope="module", autouse=True)
def cpu_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Time this module's tests in CPU seconds, for the summary at the end of the session."""
    plugin = _summary_plugin()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "kbitprep-random-trees")
    start = time.process_time()
    yield
    plugin.cpu.append(time.process_time() - start)  # type: ignore[attr-defined]


def _seeds(chunk: int) -> range:
    size = math.ceil(EXAMPLES / CHUNKS)
    return range(FIRST_SEED + chunk * size, FIRST_SEED + min(EXAMPLES, (chunk + 1) * size))


def _fails_like(recipe: Recipe, error: type[BaseException]) -> bool:
    try:
        check_example(recipe)
    except error:
        return True
    except Exception:
        return False
    return False


def _fail_minimal(seed: int, recipe: Recipe, exc: Exception) -> NoReturn:
    """Shrink a failing example and fail with the smallest recipe found, as a line that reproduces it."""
    minimal = shrink(recipe, lambda r: _fails_like(r, type(exc)))
    try:
        check_example(minimal)
    except Exception as small:
        small.add_note(
            f"random stand-in tree of seed {seed} failed ({type(exc).__name__}: {str(exc)[:300]}); "
            f"shrunk to a recipe that fails the same way. Reproduce with:\n"
            f"    from tests.reliability.test_properties_scale import *\n    check_example({minimal!r})"
        )
        raise
    raise exc


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_invariants_on_random_trees(chunk: int) -> None:
    """Every invariant of the module docstring, on a quarter of this run's examples."""
    for seed in _seeds(chunk):
        recipe = random_recipe(random.Random(seed))
        try:
            outcome = check_example(recipe)
        except Exception as exc:
            _fail_minimal(seed, recipe, exc)
        RAN["examples"] += 1
        RAN[outcome] += 1
        for feature in recipe.features():
            RAN[f"with {feature}"] += 1
        figures.example("random stand-in trees")


def test_enough_examples_covering_every_feature() -> None:
    """At least 1,000 examples ran, and they had every feature, every fault seam and every ending."""
    if RAN["examples"] < EXAMPLES:
        pytest.skip("run together with every chunk of test_invariants_on_random_trees")
    assert RAN["examples"] >= REQUIRED
    features = (
        "root plain",
        "root checkpointable",
        "root llama",
        "leaf int8",
        "leaf packed4",
        "leaf odd",
        "tied parameters",
        "shared leaves",
        "shared subtrees",
        "user hooks",
        "existing checkpointing",
        "existing input-grads hook",
        "PEFT wrapper",
        "FSDP option",
        "custom upcast policy",
        "prepare given the plan",
        "fix-ups",
        "odd dtypes",
        "two quantized libraries",
        "nesting depth >= 3",
    )
    rare = [f for f in features if RAN[f"with {f}"] < 10]
    assert not rare, f"fewer than 10 examples with {rare}: {RAN}"
    missing = [s for s in SEAMS if RAN[f"fault during {s}"] < 10]
    assert not missing, f"fewer than 10 faults injected at {missing}"
    assert all(RAN[f"fault raised {e.__name__}"] for e in ERRORS.values())
    assert RAN["prepared"] >= 0.8 * RAN["examples"]
    assert RAN["refused: not trainable"] and RAN["option refused by a backend"]


# --------------------------------------------------------------------------- self-checks

#: a small example with every kind of step: freeze, fix-ups, upcast, checkpointing, hook, use_cache
SELF_CHECK = Recipe(
    seed=3,
    containers=(Container("block", 0), Container("layer", 0), Container("moduledict", 1)),
    leaves=(
        Leaf("linear", "bf16", 8, bias=True, frozen=False, where=1),
        Leaf("int8", "fp16", 8, bias=True, frozen=False, where=2, variant=2),
        Leaf("embedding", "fp16", 8, bias=False, frozen=False, where=0),
        Leaf("packed4", "bf16", 8, bias=True, frozen=False, where=2),
    ),
    ties=((0, 2),),
    root="checkpointable",
    embeddings=2,
    int8_rules=Rules(fixups=("mark", "swap", "hook", "repack")),
    options=Options(upcast="all", checkpointing="reentrant"),
    sweep=True,
)

_CAUGHT_BY = {
    "plan": "plan left the model changed",
    "prepare": "has other bytes after prepare",
    "twice": "preparing twice changed the model",
    "no-warning": "preparing twice did not warn",
    "undo": "undo left the model changed",
    "fault": r"a fault \(InjectedFault\) at step",
    "plugin-meddles": "plan left the model changed",
    "plugin-scribbles": r"\(quantized storage\) has other bytes after prepare",
}


def test_the_self_check_example_passes_and_steps_through_every_seam() -> None:
    """The control of the self-checks: the example is sound, and its prepare passes every seam."""
    assert check_example(SELF_CHECK) == "prepared"
    counted = Faults()
    with recorded_warnings(), injecting(counted):
        kbitprep.prepare(build(SELF_CHECK), registry=registry_for(SELF_CHECK), **SELF_CHECK.options.kwargs())
    assert set(counted.steps) == set(SEAMS)
    assert len(_fault_steps(SELF_CHECK, counted.steps)) >= 2 * len(SEAMS) - 1


@pytest.fixture
def deliberate_failures() -> Iterator[None]:
    """The self-checks' broken states are deliberate: keep them out of the run's partial-state figures."""
    partial, checks = len(figures.PARTIAL), figures.STATE_CHECKS[0]
    yield
    del figures.PARTIAL[partial:]
    figures.STATE_CHECKS[0] = checks


@pytest.mark.usefixtures("deliberate_failures")
@pytest.mark.parametrize("sabotage", SABOTAGES)
def test_the_checks_catch_a_broken_invariant(sabotage: str) -> None:
    """Each invariant, broken on purpose (a byte of quantized storage changed in place at that stage,
    a second prepare that does not warn, a plugin whose ``declare`` changes the model, a fix-up
    writing into quantized storage), is caught by the check for it."""
    # (the scribbling plugin without its legitimate repack, so the check is the plain storage comparison)
    recipe = replace(SELF_CHECK, int8_rules=Rules(fixups=("mark",))) if sabotage == "plugin-scribbles" else SELF_CHECK
    with pytest.raises(AssertionError, match=_CAUGHT_BY[sabotage]):
        check_example(recipe, sabotage=sabotage)


def test_a_fault_is_injected_where_asked() -> None:
    """Faults: the k-th step raises the chosen error once; a counting run raises nothing."""
    faults = Faults(2, KeyboardInterrupt)
    faults.tick("freeze")
    with pytest.raises(KeyboardInterrupt, match="step 2"):
        faults.tick("upcast")
    faults.tick("hook")  # fired once: the revert passes, uncounted
    assert faults.steps == ["freeze", "upcast"]
    assert isinstance(faults.raised, KeyboardInterrupt)
    counting = Faults()
    for seam in SEAMS:
        counting.tick(seam)
    assert counting.raised is None
    with injecting(Faults()):
        assert "to" in vars(torch.Tensor) and "requires_grad_" in vars(torch.Tensor)
    assert "to" not in vars(torch.Tensor) and "requires_grad_" not in vars(torch.Tensor)  # gone after use


def test_shrink_finds_a_small_failing_recipe() -> None:
    """The reproducer of a failure is small: here, a failure that needs only a packed 4-bit layer."""
    big = next(
        r
        for r in (random_recipe(random.Random(s)) for s in range(100))
        if sum(leaf.kind == "packed4" for leaf in r.leaves) == 1 and len(r.leaves) >= 6 and len(r.containers) >= 3
    )
    minimal = shrink(big, lambda r: any(leaf.kind == "packed4" for leaf in r.leaves))
    assert [leaf.kind for leaf in minimal.leaves] == ["packed4"]
    assert len(minimal.containers) == 1 and minimal.root == "plain" and not minimal.hooks
    assert eval(repr(minimal)) == minimal  # the printed recipe is the recipe
