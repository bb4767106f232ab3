"""``kbitprep.patch_peft``: calls of PEFT's ``prepare_model_for_kbit_training`` routed through kbitprep, reversibly.

The trainer tests run TRL's experimental ORPO and CPO trainers, which bind PEFT's function with
``from peft import prepare_model_for_kbit_training`` when they are imported and call it on a model
loaded in 4-bit, on a tiny bnb-4bit Llama and a few preference pairs. The other tests check the
switch itself on tiny real models: names bound before and during the switch, the argument mapping,
each policy, nesting, restoring in any order, threads and bad input.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kbitprep
from kbitprep import CheckpointMode, checkpointing_status
from kbitprep import _patch_peft as _patch_module
from kbitprep._patch_peft import PeftPatch, patch_peft
from kbitprep.errors import (
    BackendMismatchError,
    BackendUnavailableError,
    InvalidPolicyError,
    NotPreparedError,
    UnknownBackendError,
)
from kbitprep.testing import model_state

from ..core.backends_for_tests import MarkerBackend
from ..threads import run_in_threads
from ..tiny import saved_tiny_llama, tiny_llama
from .common import adapter_state, load_bnb_4bit, lora_config, tiny_tokenizer, training_kwargs

peft_other = pytest.importorskip("peft.utils.other")
NAME = "prepare_model_for_kbit_training"
#: PEFT's own function, read before any switch (in a tuple: the switch patches module-level names only).
_PEFT = (vars(peft_other)[NAME],)


def _peft_function() -> Callable[..., Any]:
    """PEFT's own function."""
    return _PEFT[0]


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    return vars(sys.modules[module])[attr]


@pytest.fixture(autouse=True)
def no_switch_left_on() -> Iterator[None]:
    """A failing test must not leave a switch on for the next ones."""
    yield
    for switch in list(_patch_module._ACTIVE):
        switch.restore()
    assert vars(peft_other)[NAME] is _peft_function()


@pytest.fixture
def fake_module() -> Iterator[types.ModuleType]:
    """A module in ``sys.modules`` that did ``from peft import prepare_model_for_kbit_training`` (and an alias)."""
    mod = types.ModuleType("kbitprep_fake_stack")
    source = "from peft import prepare_model_for_kbit_training\nfrom peft.utils import other as o\n"
    exec(source + "pmkt = o.prepare_model_for_kbit_training", vars(mod))
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def _all_original(names: list[str], originals: dict[str, Any]) -> list[str]:
    """The names that are not bound to the function they had before the switch."""
    return [n for n in names if _resolve(n) is not originals[n]]


# --------------------------------------------------------------------------- real TRL trainers


def _preference_pairs() -> Any:
    from datasets import Dataset

    prompts = [" ".join(f"t{10 + i + j}" for j in range(4)) for i in range(8)]
    return Dataset.from_dict(
        {"prompt": prompts, "chosen": [" t50 t60 t70 t80"] * 8, "rejected": [" t90 t91 t92 t93"] * 8}
    )


def _train_with_switch(trainer_module: str, tmp_path: Path, policy: Any = None, **arg_overrides: Any) -> Any:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" warning
        mod = importlib.import_module(trainer_module)
    prefix = "ORPO" if "orpo" in trainer_module else "CPO"
    trainer_cls, config_cls = getattr(mod, f"{prefix}Trainer"), getattr(mod, f"{prefix}Config")
    assert vars(mod)[NAME] is _peft_function()  # the trainer bound PEFT's function when it was imported

    model = load_bnb_4bit(saved_tiny_llama(torch.bfloat16))
    assert model.is_loaded_in_4bit
    args = config_cls(**training_kwargs(tmp_path, max_steps=2, max_length=32, **arg_overrides))
    with pytest.raises(NotPreparedError):
        kbitprep.report(model)

    before_switch = {n: _resolve(n) for n in _names_bound_now()}
    with patch_peft(policy) as switch:
        print(f"\npatch_peft() patched ({trainer_module}): {switch.patched}")
        assert f"{trainer_module}.{NAME}" in switch.patched and f"peft.{NAME}" in switch.patched
        torch.manual_seed(0)
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=_preference_pairs(),
            processing_class=tiny_tokenizer(),
            peft_config=lora_config(),
        )
        assert switch.calls == 1
    assert not switch.active
    assert not _all_original(switch.patched, before_switch), "names not restored"
    assert vars(mod)[NAME] is _peft_function()

    rep = kbitprep.report(model)  # prepared by kbitprep, not by PEFT's function
    before = adapter_state(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    after = adapter_state(trainer.model)
    assert before and [n for n in before if torch.equal(before[n], after[n])] == []
    return rep, trainer


def _names_bound_now() -> list[str]:
    with patch_peft() as probe:
        return probe.patched


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_orpo_trainer_is_prepared_by_kbitprep(tmp_path: Path) -> None:
    rep, trainer = _train_with_switch("trl.experimental.orpo.orpo_trainer", tmp_path)
    assert rep.plan.backend == "bnb-4bit"
    assert rep.plan.to_upcast == ()  # PEFT's function would upcast every norm, embedding and head to fp32
    base_dtypes = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n and p.is_floating_point()}
    assert base_dtypes == {torch.bfloat16}
    # ORPOConfig asks for checkpointing (no kwargs): kbitprep enabled the backend's mode; Trainer.train()
    # then re-enables it non-reentrant with a second hook (see docs/training.md), which still trains.
    assert rep.plan.checkpointing is CheckpointMode.REENTRANT
    assert checkpointing_status(trainer.model).enabled


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_cpo_trainer_with_checkpointing_left_to_kbitprep(tmp_path: Path) -> None:
    """The documented combination: the trainer's checkpointing off, the policy's on: one owner, one hook."""
    rep, trainer = _train_with_switch(
        "trl.experimental.cpo.cpo_trainer", tmp_path, policy={"checkpointing": True}, gradient_checkpointing=False
    )
    assert rep.plan.to_upcast == () and rep.plan.checkpointing is CheckpointMode.REENTRANT
    status = checkpointing_status(trainer.model)
    assert status.enabled and status.consistent and status.use_reentrant is True
    assert status.input_grads_hooks == 1


# --------------------------------------------------------------------------- the switch itself


def test_public_name() -> None:
    assert kbitprep.patch_peft is patch_peft  # type: ignore[attr-defined]


def test_names_bound_before_and_during_the_switch_are_restored(fake_module: types.ModuleType) -> None:
    import peft

    original = _peft_function()
    assert fake_module.prepare_model_for_kbit_training is original and fake_module.pmkt is original
    switch = patch_peft()
    try:
        assert {"kbitprep_fake_stack.prepare_model_for_kbit_training", "kbitprep_fake_stack.pmkt"} <= set(
            switch.patched
        )
        assert {f"peft.{NAME}", f"peft.utils.{NAME}", f"peft.utils.other.{NAME}"} <= set(switch.patched)
        router = peft.prepare_model_for_kbit_training
        assert router is not original and fake_module.pmkt is router
        assert "gradient_checkpointing_kwargs" in inspect.signature(router).parameters  # TRL checks for it
        late = types.ModuleType("kbitprep_fake_late")
        exec("from peft import prepare_model_for_kbit_training as late_bound", vars(late))
        sys.modules[late.__name__] = late
        assert late.late_bound is router
    finally:
        restored = switch.restore()
    del sys.modules[late.__name__]
    assert "kbitprep_fake_late.late_bound" in restored and set(switch.patched) <= set(restored)
    assert (
        late.late_bound is original
        and fake_module.pmkt is original
        and peft.prepare_model_for_kbit_training is original
    )
    assert switch.restore() == []  # a second restore does nothing


def test_kbitprep_route_maps_peft_arguments() -> None:
    with patch_peft() as switch:
        from peft import prepare_model_for_kbit_training as call

        default = call(tiny_llama())
        off = call(tiny_llama(), use_gradient_checkpointing=False)
        non_reentrant = call(tiny_llama(), gradient_checkpointing_kwargs={"use_reentrant": False})
        extra = call(tiny_llama(), True, {"use_reentrant": True, "preserve_rng_state": False})
        assert switch.calls == 4
    plans = [kbitprep.report(m).plan for m in (default, off, non_reentrant, extra)]
    assert [p.checkpointing for p in plans] == [
        CheckpointMode.REENTRANT,  # the unquantized backend's default, like PEFT's empty kwargs
        CheckpointMode.OFF,
        CheckpointMode.NON_REENTRANT,
        CheckpointMode.REENTRANT,
    ]
    assert plans[3].checkpointing_kwargs["preserve_rng_state"] is False
    assert all(p.to_upcast == () for p in plans)
    assert {p.dtype for p in default.parameters()} == {torch.bfloat16}


def test_peft_policy_gives_peft_results_and_a_mapping_policy_is_passed_to_prepare() -> None:
    with patch_peft(policy="peft"):
        from peft import prepare_model_for_kbit_training as call

        peft_like = call(tiny_llama())
    with patch_peft(policy={"upcast": "norms", "checkpointing": "non_reentrant"}):
        chosen = call.__kbitprep_original__  # the original is reachable from the router, for callers that need it
        norms = call(tiny_llama(), use_gradient_checkpointing=False)  # the same router, the new policy
    assert chosen is _peft_function()
    assert {p.dtype for p in peft_like.parameters()} == {torch.float32}  # PEFT's function upcasts everything
    assert kbitprep.report(peft_like).plan.upcast_policy == "peft"
    upcast = {n for n, p in norms.named_parameters() if p.dtype == torch.float32}
    assert upcast and all("norm" in n for n in upcast)
    assert kbitprep.report(norms).plan.checkpointing is CheckpointMode.NON_REENTRANT  # the policy wins


def test_switches_nest_and_leave_in_any_order() -> None:
    original = _peft_function()
    outer = patch_peft()
    inner = patch_peft(policy="peft")
    assert inner.patched == outer.patched and outer.active and inner.active
    import peft

    m = peft.prepare_model_for_kbit_training(tiny_llama())
    assert (outer.calls, inner.calls) == (0, 1)  # the newest switch's policy applies
    assert kbitprep.report(m).plan.upcast_policy == "peft"
    assert outer.restore() == []  # inner is still on: the names stay routed
    assert peft.prepare_model_for_kbit_training is not original
    m2 = peft.prepare_model_for_kbit_training(tiny_llama())
    assert kbitprep.report(m2).plan.upcast_policy == "peft" and inner.calls == 2
    assert set(inner.restore()) >= set(inner.patched)
    assert peft.prepare_model_for_kbit_training is original
    with outer:  # a handle can be turned on again
        assert outer.active and peft.prepare_model_for_kbit_training is not original
    assert peft.prepare_model_for_kbit_training is original and "active=False" in repr(outer)


def test_already_prepared_model_is_returned_unchanged_without_a_warning() -> None:
    model = kbitprep.prepare(tiny_llama(), checkpointing=False)
    state = model_state(model)
    with patch_peft(), warnings.catch_warnings():
        warnings.simplefilter("error")
        import peft

        assert peft.prepare_model_for_kbit_training(model) is model
    assert model_state(model) == state and kbitprep.report(model).plan.checkpointing is CheckpointMode.OFF


def test_kept_reference_behaves_as_the_original_after_the_switch() -> None:
    with patch_peft():
        import peft

        kept = peft.prepare_model_for_kbit_training
    model = kept(tiny_llama(), use_gradient_checkpointing=False)
    with pytest.raises(NotPreparedError):
        kbitprep.report(model)  # PEFT's own function ran
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_something_else_rebinding_a_name_is_left_alone(fake_module: types.ModuleType) -> None:
    def theirs(model: Any, *a: Any, **k: Any) -> Any:
        return model

    with patch_peft() as switch:
        fake_module.pmkt = theirs
    assert "kbitprep_fake_stack.pmkt" in switch.patched
    assert fake_module.pmkt is theirs and fake_module.prepare_model_for_kbit_training is _peft_function()


def test_trl_copy_is_routed_when_imported() -> None:
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        utils = importlib.import_module("trl.experimental.utils")
    trl_copy = vars(utils)[NAME]
    assert trl_copy is not _peft_function()
    with patch_peft() as switch:
        model = utils.prepare_model_for_kbit_training(tiny_llama())
    assert f"trl.experimental.utils.{NAME}" in switch.patched and switch.calls == 1
    assert kbitprep.report(model).plan.backend == "unquantized"
    assert vars(utils)[NAME] is trl_copy


def test_bad_policy_patches_nothing() -> None:
    import peft

    for bad, match in (("fast", "unknown policy"), ({"upcast": "none", "bogus": 1}, "bogus"), (3, "int")):
        with pytest.raises(InvalidPolicyError, match=match):
            patch_peft(policy=bad)
        assert peft.prepare_model_for_kbit_training is _peft_function()
    with pytest.raises(InvalidPolicyError, match="plan"):
        patch_peft(policy={"plan": None})


@pytest.mark.parametrize(
    ("policy", "error", "match"),
    [
        ({"memory": "lowset"}, InvalidPolicyError, "memory='lowset' is not a memory preset"),
        ({"upcast": "everything"}, InvalidPolicyError, "upcast='everything' is not a valid policy"),
        ({"checkpointing": "sometimes"}, InvalidPolicyError, "checkpointing='sometimes' is not valid"),
        ({"checkpointing_kwargs": {"bogus": 1}}, InvalidPolicyError, "does not take: bogus"),
        ({"memory": {"preset": "lowest", "chunked_head": -1}}, InvalidPolicyError, "chunked_head"),
        ({"fsdp": 3}, InvalidPolicyError, "fsdp=3 is not valid"),
        ({"verify": "yes"}, InvalidPolicyError, "verify='yes' must be True or False"),
        ({"registry": "default"}, InvalidPolicyError, "registry= takes a kbitprep.Registry"),
        ({"backend": "bnb-4bitt"}, UnknownBackendError, "no kbitprep backend is called 'bnb-4bitt'"),
        ({"backend": "needs-pkg", "registry": "needs-pkg"}, BackendUnavailableError, "pip install no-such-pkg"),
    ],
)
def test_a_bad_policy_value_is_refused_when_the_switch_is_made(
    policy: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Not later, inside a trainer's constructor, when the stack first calls PEFT's function."""
    import peft

    if policy.get("registry") == "needs-pkg":
        reg = kbitprep.Registry()
        reg.register(
            MarkerBackend("needs-pkg", requires=("kbitprep_no_such_pkg",), install_hint="pip install no-such-pkg")
        )
        policy = {**policy, "registry": reg}
    with pytest.raises(error, match=match) as info:
        patch_peft(policy=policy)
    assert str(info.value).startswith("patch_peft(policy=...): ") and "nothing was patched" in str(info.value)
    assert peft.prepare_model_for_kbit_training is _peft_function() and not _patch_module._ACTIVE


def test_a_valid_policy_is_accepted_whole() -> None:
    policy = {
        "upcast": "norms",
        "checkpointing": "non_reentrant",
        "checkpointing_kwargs": {"preserve_rng_state": False},
        "memory": {"preset": "chunked_head", "chunked_head": 512},
        "fsdp": False,
        "verify": True,
        "allow_mismatch": False,
        "strict": None,
        "backend": "unquantized",
    }
    with patch_peft(policy=policy) as switch:
        assert switch.policy == policy


def test_error_in_a_routed_call_propagates_and_leaves_the_model() -> None:
    """What depends on the model is checked by the routed call: here a forced backend that does not
    recognise it."""
    reg = kbitprep.Registry()
    reg.register(MarkerBackend("marker"))
    model = tiny_llama()
    state = model_state(model)
    with patch_peft(policy={"backend": "marker", "registry": reg}):
        import peft

        with pytest.raises(BackendMismatchError, match="does not recognise"):
            peft.prepare_model_for_kbit_training(model)
    assert model_state(model) == state
    assert peft.prepare_model_for_kbit_training is _peft_function()


def test_a_script_alias_is_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """multiprocessing registers a script's ``__main__`` again as ``__mp_main__``: one module, one name."""
    main = sys.modules["__main__"]
    monkeypatch.setitem(sys.modules, "__mp_main__", main)
    monkeypatch.setattr(main, "orig", _peft_function(), raising=False)
    with patch_peft() as switch:
        assert main.orig is not _peft_function()  # routed
        listed = [n for n in switch.patched if n.endswith(".orig")]
    assert listed == ["__main__.orig"]
    assert main.orig is _peft_function()


def test_missing_peft_raises_and_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft.utils.other", None)  # import peft.utils.other now raises ImportError
    monkeypatch.delattr(sys.modules["peft.utils"], "other")
    with pytest.raises(BackendUnavailableError, match="pip install peft"):
        patch_peft()


def test_threads_patching_at_once_leave_everything_original() -> None:
    import peft

    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait(timeout=30)
        for _ in range(3):
            with patch_peft(policy="peft" if i % 2 else None) as s:
                assert (
                    isinstance(s, PeftPatch)
                    and s.active
                    and peft.prepare_model_for_kbit_training is not _peft_function()
                )

    errors = run_in_threads(worker, 4, "patch_peft")
    assert errors == []
    assert peft.prepare_model_for_kbit_training is _peft_function()


def test_a_module_that_refuses_rebinding_is_skipped_and_not_reported() -> None:
    class FrozenModule(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            raise AttributeError(f"{self.__name__} is read-only")

    frozen = FrozenModule("kbitprep_fake_frozen")
    vars(frozen)[NAME] = _peft_function()
    sys.modules[frozen.__name__] = frozen
    try:
        with patch_peft() as switch:
            assert vars(frozen)[NAME] is _peft_function()
        assert f"kbitprep_fake_frozen.{NAME}" not in switch.patched and f"peft.{NAME}" in switch.patched
    finally:
        del sys.modules[frozen.__name__]
