"""Property-based tests: invariants of plan / prepare / undo on random models (hypothesis).

Invariants, for every random model and upcast policy:

* plan never mutates the model, and planning twice gives the same plan;
* quantized storage (every tensor that is not a plain float tensor) stays bit-identical;
* tied parameters stay tied and shared submodules stay shared (the same objects, under the same names);
* nothing is left trainable (no adapters here), and every parameter has the dtype the plan said;
* the plan's byte totals equal the change measured on the real tensors' storage;
* prepare twice equals prepare once; undo restores exactly; prepare after undo equals the first prepare.

Plain ``nn.Module`` trees have no checkpointing API, so their plans keep checkpointing off; the tiny
Llama property covers checkpointing, hooks and ``use_cache``. Example counts are kept modest so the
suite stays fast on 2 CPU cores; the number that ran is printed with the reliability figures.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kbitprep
from kbitprep import AlreadyPreparedWarning, InvalidPolicyError, Registry
from kbitprep._tensors import storage_digest

from ..tiny import tiny_llama
from . import figures
from .random_models import QUANT_KINDS, Recipe, build, recipes
from .support import assert_restored, differences, full_state, recorded_warnings

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the working tree
    derandomize=True,  # the same examples on every run (CI is reproducible; failures print the recipe)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _is_quantized_storage(t: torch.Tensor) -> bool:
    """Parameter subclasses (bnb), tensor subclasses (torchao, quanto) and non-float tensors (int8, uint8 ...)."""
    subclassed_parameter = isinstance(t, nn.Parameter) and type(t) is not nn.Parameter
    return subclassed_parameter or type(t.data) is not torch.Tensor or not t.dtype.is_floating_point


def _pointers(t: torch.Tensor) -> tuple[int, ...]:
    """Where a tensor's bytes live (the inner tensors of a subclass): equal pointers mean nothing was copied."""
    data = t.data
    if type(data) is torch.Tensor:
        return (data.data_ptr(),)
    names, _ = data.__tensor_flatten__()
    return tuple(ptr for n in names for ptr in _pointers(getattr(data, n)))


def _quantized_storage(model: nn.Module) -> dict[str, tuple[str, str, str, tuple[int, ...]]]:
    """Every tensor that is not a plain float tensor: its classes, a digest of its bytes, where they live."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return {
        n: (type(t).__name__, type(t.data).__name__, storage_digest(t), _pointers(t))
        for n, t in tensors.items()
        if _is_quantized_storage(t)
    }


def _side_state(model: nn.Module) -> dict[str, int]:
    """Objects next to the quantized storage (bnb quant_state, hqq meta): they must stay the same objects."""
    out = {}
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            out[f"{name}.weight.quant_state"] = id(weight.quant_state)
        if isinstance(getattr(mod, "meta", None), dict):
            out[f"{name}.meta"] = id(mod.meta)
            out.update({f"{name}.meta.{k}": id(v) for k, v in mod.meta.items() if isinstance(v, torch.Tensor)})
    return out


def _unique_params(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    out: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), (name, p))
    return out


def _storage_bytes(model: nn.Module) -> dict[int, int]:
    """Measured bytes of each distinct parameter's storage (tensor subclasses: measured as unchanged below)."""
    return {
        pid: (p.data.untyped_storage().nbytes() if type(p.data) is torch.Tensor else 0)
        for pid, (_, p) in _unique_params(model).items()
    }


def check_prepare_invariants(
    model: nn.Module,
    *,
    policy: str,
    registry: Registry,
    tie_groups: list[list[str]],
    shared_groups: list[list[str]],
    **options: Any,
) -> str:
    """Run plan / prepare / prepare again / undo / prepare again on ``model`` and check every invariant.

    Returns ``"prepared"``, or ``"refused"`` when the backends forbid the policy (the model is then
    checked unchanged).
    """
    before = full_state(model)
    quantized_before = _quantized_storage(model)
    side_before = _side_state(model)
    bytes_before = _storage_bytes(model)
    dtypes_before = {pid: p.dtype for pid, (_, p) in _unique_params(model).items()}

    # plan never mutates, and is deterministic
    try:
        plan = kbitprep.plan(model, upcast=policy, registry=registry, **options)
    except InvalidPolicyError as exc:
        assert policy != "none", exc  # only an upcast a backend forbids may be refused
        assert "upcast" in str(exc)
        assert_restored(model, before, "a refused plan")
        return "refused"
    assert_restored(model, before, "plan")
    assert kbitprep.plan(model, upcast=policy, registry=registry, **options).to_dict() == plan.to_dict()

    kbitprep.prepare(model, upcast=policy, registry=registry, **options)
    after = full_state(model)

    # quantized storage bit-identical, and the objects next to it untouched
    assert _quantized_storage(model) == quantized_before
    assert _side_state(model) == side_before
    # the same Parameter / module objects under every name: tied stay tied, shared stay shared
    assert after["param_ids"] == before["param_ids"] and after["module_ids"] == before["module_ids"]
    for names in tie_groups:
        assert len({id(model.get_parameter(n)) for n in names}) == 1, names
    for names in shared_groups:
        assert len({id(model.get_submodule(n)) for n in names}) == 1, names
    # nothing trainable (there are no adapters here)
    assert not any(p.requires_grad for p in model.parameters())
    # every dtype as planned; casts are exact; nothing cast with policy "none"
    planned = {pp.name: pp for pp in plan.params}
    unique = _unique_params(model)
    for pid, (name, p) in unique.items():
        pp = planned[name]
        assert p.dtype == pp.dtype_after, name
        if pp.upcast:
            assert p.dtype == torch.float32 and dtypes_before[pid] in (torch.float16, torch.bfloat16)
            assert not pp.quantized
            assert storage_digest(p.data.to(dtypes_before[pid])) == before["params"][name][4]
        else:
            assert p.dtype == dtypes_before[pid]
    if policy == "none":
        assert not plan.to_upcast
    # the plan's byte totals equal the measured change
    bytes_after = _storage_bytes(model)
    measured = sum(bytes_after[pid] - bytes_before[pid] for pid in unique)
    assert plan.byte_delta == measured
    assert plan.bytes_after - plan.bytes_before == measured
    for pid, (name, p) in unique.items():
        if type(p.data) is torch.Tensor:
            assert planned[name].bytes_after == bytes_after[pid], name

    # prepare twice equals prepare once
    with recorded_warnings() as caught:
        kbitprep.prepare(model, upcast=policy, registry=registry, **options)
    assert any(issubclass(w.category, AlreadyPreparedWarning) for w in caught)
    assert not differences(after, full_state(model))

    # undo restores exactly
    kbitprep.undo(model)
    assert_restored(model, before, "undo")
    assert _quantized_storage(model) == quantized_before

    # prepare after undo equals the first prepare (hooks are new objects, so compared by count); undo again
    kbitprep.prepare(model, upcast=policy, registry=registry, **options)
    again = full_state(model)
    assert not differences({**after, "hook_objects": None}, {**again, "hook_objects": None})
    kbitprep.undo(model)
    assert_restored(model, before, "second undo")
    return "prepared"


OUTCOMES = figures.COVERAGE


@SETTINGS
@given(recipe=recipes(quantized=True))
def test_random_module_trees(recipe: Recipe, registry: Registry) -> None:
    built = build(recipe)
    with recorded_warnings():
        outcome = check_prepare_invariants(
            built.model,
            policy=recipe.policy,
            registry=registry,
            tie_groups=built.tie_groups,
            shared_groups=built.shared_groups,
        )
        if outcome == "refused":  # a backend forbids this upcast: the default policy must still work
            OUTCOMES["policy refused by a backend"] += 1
            outcome = check_prepare_invariants(
                built.model,
                policy="none",
                registry=registry,
                tie_groups=built.tie_groups,
                shared_groups=built.shared_groups,
            )
    OUTCOMES[outcome] += 1
    for kind in recipe.quantized_kinds:
        OUTCOMES[kind] += 1
    OUTCOMES["ties"] += bool(built.tie_groups)
    OUTCOMES["shared"] += bool(built.shared_groups)
    figures.example("random module trees")


def test_the_random_trees_covered_every_feature() -> None:
    """The examples above did include ties, shared modules, every quantized kind, and real prepares."""
    if not OUTCOMES:
        pytest.skip("run together with test_random_module_trees")
    assert OUTCOMES.get("prepared", 0) > 0
    assert OUTCOMES.get("ties", 0) > 0 and OUTCOMES.get("shared", 0) > 0
    missing = [k for k in QUANT_KINDS if not OUTCOMES.get(k)]
    assert not missing, f"no example had {missing}: raise max_examples"


@settings(SETTINGS, max_examples=20)
@given(
    dtype=st.sampled_from((torch.float16, torch.bfloat16, torch.float32)),
    tied=st.booleans(),
    frozen=st.lists(st.integers(0, 40), max_size=6),
    policy=st.sampled_from(("none", "norms", "all")),
    checkpointing=st.sampled_from((True, False, "reentrant", "non_reentrant")),
    use_cache=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_tiny_llamas(
    dtype: torch.dtype,
    tied: bool,
    frozen: list[int],
    policy: str,
    checkpointing: bool | str,
    use_cache: bool,
    seed: int,
    registry: Registry,
) -> None:
    """The same invariants on transformers models, with checkpointing, hooks and ``use_cache``."""
    model = tiny_llama(dtype, seed=seed, tie_word_embeddings=tied, use_cache=use_cache)
    params = list(model.parameters())
    for i in frozen:
        params[i % len(params)].requires_grad_(False)
    tie_groups = [["model.embed_tokens.weight", "lm_head.weight"]] if tied else []
    with recorded_warnings():
        check_prepare_invariants(
            model,
            policy=policy,
            registry=registry,
            tie_groups=tie_groups,
            shared_groups=[],
            checkpointing=checkpointing,
        )
    figures.example("random tiny Llamas")
