"""Regression tests for failures found by trying kbitprep as users would (issue 11, core items).

Each test names the item it guards; each failed on the code before the fix.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.errors import (
    AlreadyPreparedWarning,
    BackendWarning,
    CheckpointingOverrideWarning,
    InvalidPolicyError,
    NotPreparedError,
    PlanMismatchError,
)

from ..reliability.support import assert_restored, full_state
from ..threads import run_in_threads
from ..tiny import tiny_llama


def _input_grad_hooks(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return sum(1 for h in emb._forward_hooks.values() if "require_grad" in getattr(h, "__name__", ""))


def _checkpoint_kwargs(model: nn.Module) -> dict[str, Any]:
    for mod in model.modules():
        if getattr(mod, "gradient_checkpointing", False) and "_gradient_checkpointing_func" in vars(mod):
            return dict(mod._gradient_checkpointing_func.keywords)
    raise AssertionError("checkpointing is not enabled")


# --------------------------------------------------------------------------- item 3: two threads, one model


@pytest.mark.parametrize("run", range(5))
def test_item3_two_threads_preparing_one_model_prepare_once_and_undo_exactly(run: int) -> None:
    model = tiny_llama()
    before = full_state(model)
    barrier = threading.Barrier(2)
    caught: list[list[warnings.WarningMessage]] = [[], []]

    def job(i: int) -> None:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            barrier.wait(timeout=30)
            kbitprep.prepare(model, upcast="all")
        caught[i] = list(got)

    errors = run_in_threads(job, 2, "prepare")
    assert not errors, errors
    # warnings.catch_warnings is process-wide, so count the no-op warning over both threads
    noop = {id(w.message) for got in caught for w in got if issubclass(w.category, AlreadyPreparedWarning)}
    assert len(noop) == 1, "exactly one of the two prepares must be the documented no-op"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    kbitprep.undo(model)
    assert_restored(model, before, "undo after two concurrent prepares")
    with pytest.raises(NotPreparedError):
        kbitprep.undo(model)


# --------------------------------------------------------------------------- item 5: user's checkpointing kept


def _user_checkpointed_model() -> nn.Module:
    model = tiny_llama()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}
    )
    return model


def test_item5_users_checkpointing_settings_are_kept_and_no_second_hook() -> None:
    model = _user_checkpointed_model()
    hooks = _input_grad_hooks(model)
    assert hooks == 1  # transformers registered one with checkpointing
    before = full_state(model)
    plan = kbitprep.plan(model)
    assert "already enabled on the model" in plan.checkpointing_note
    assert dict(plan.checkpointing_kwargs) == {"use_reentrant": False, "preserve_rng_state": False}
    assert any("already present, not added again" in h for h in plan.hooks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointingOverrideWarning)
        kbitprep.prepare(model)
    assert _input_grad_hooks(model) == 1
    assert _checkpoint_kwargs(model) == {"use_reentrant": False, "preserve_rng_state": False}
    kbitprep.undo(model)
    assert_restored(model, before, "undo after keeping the user's checkpointing")


def test_item5_users_checkpointing_without_use_reentrant_is_kept_without_a_warning() -> None:
    """torch runs ``{}`` reentrant: the plan keeps it exactly, and prepare neither re-enables nor warns."""
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})
    plan = kbitprep.plan(model)
    assert plan.checkpointing.value == "reentrant" and dict(plan.checkpointing_kwargs) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointingOverrideWarning)
        kbitprep.prepare(model)
    assert _checkpoint_kwargs(model) == {} and _input_grad_hooks(model) == 1


def test_item5_an_explicit_mode_replaces_the_users_settings_with_a_warning_and_a_plan_note() -> None:
    model = _user_checkpointed_model()
    before = full_state(model)
    plan = kbitprep.plan(model, checkpointing="reentrant")
    assert any("will be replaced by" in n and "preserve_rng_state=False" in n for n in plan.notes)
    with pytest.warns(CheckpointingOverrideWarning, match="use_reentrant=False"):
        kbitprep.prepare(model, checkpointing="reentrant")
    # the user's other setting survives; only the mode asked for changes; still one hook
    assert _checkpoint_kwargs(model) == {"use_reentrant": True, "preserve_rng_state": False}
    assert _input_grad_hooks(model) == 1
    kbitprep.undo(model)
    assert_restored(model, before, "undo after replacing the user's checkpointing")
    assert _checkpoint_kwargs(model) == {"use_reentrant": False, "preserve_rng_state": False}


def test_item5_checkpointing_false_leaves_the_users_checkpointing_and_says_so() -> None:
    model = _user_checkpointed_model()
    plan = kbitprep.plan(model, checkpointing=False)
    assert any("prepare leaves it as it is" in n for n in plan.notes)
    kbitprep.prepare(model, checkpointing=False)
    assert _checkpoint_kwargs(model) == {"use_reentrant": False, "preserve_rng_state": False}


# --------------------------------------------------------------------------- item 6: use_cache everywhere


def _family_model(family_id: str) -> nn.Module:
    """A tiny bf16 model of one of the architecture families (tests/families.py)."""
    import transformers

    from ..families import FAMILIES

    family = next(f for f in FAMILIES if f.id == family_id)
    torch.manual_seed(0)
    model: nn.Module = getattr(transformers, family.model_class)(family.make_config())
    return model.to(torch.bfloat16)


def _use_cache_flags(model: nn.Module) -> dict[str, Any]:
    from kbitprep._anatomy import model_configs

    return {f"{type(c).__name__}#{i}": getattr(c, "use_cache", None) for i, c in enumerate(model_configs(model))}


@pytest.mark.parametrize("family", ["t5-enc-dec", "llava-vlm"])
def test_item6_use_cache_is_turned_off_on_every_config_and_undo_restores_it(family: str) -> None:
    model = _family_model(family)
    flags = _use_cache_flags(model)
    assert any(v is True for v in flags.values())
    nested_true = [k for k, v in flags.items() if v is True]
    assert any(not k.endswith("#0") for k in nested_true), f"no nested config with use_cache=True: {flags}"
    plan = kbitprep.plan(model)
    assert len(plan.use_cache_off) == len(nested_true)
    kbitprep.prepare(model)
    assert not any(v is True for v in _use_cache_flags(model).values()), _use_cache_flags(model)
    kbitprep.undo(model)
    assert _use_cache_flags(model) == flags


def test_item6_dropin_leaves_use_cache_alone_like_peft() -> None:
    peft = pytest.importorskip("peft")
    ours, theirs = tiny_llama(), tiny_llama()
    assert ours.config.use_cache is True
    kbitprep.prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    assert ours.config.use_cache is theirs.config.use_cache is True


# --------------------------------------------------------------------------- item 10: raw errors


def test_item10_checkpointing_kwargs_not_a_mapping_is_a_kbitprep_error_and_model_unchanged() -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(InvalidPolicyError, match="must be a dict"):
        kbitprep.prepare(model, checkpointing_kwargs="x")  # type: ignore[arg-type]
    assert_restored(model, before, "bad checkpointing_kwargs")


def test_item10_unknown_checkpoint_keyword_is_rejected_up_front() -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(InvalidPolicyError, match=r"bogus.*valid keywords:.*preserve_rng_state"):
        kbitprep.prepare(model, checkpointing_kwargs={"bogus": 1})
    assert_restored(model, before, "unknown checkpoint keyword")


def test_item10_valid_checkpoint_keyword_is_accepted() -> None:
    model = tiny_llama()
    kbitprep.prepare(model, checkpointing_kwargs={"preserve_rng_state": False})
    assert _checkpoint_kwargs(model)["preserve_rng_state"] is False


def test_item10_plan_argument_that_is_not_a_plan_is_a_kbitprep_error() -> None:
    model = tiny_llama()
    before = full_state(model)
    with pytest.raises(InvalidPolicyError, match="plan= takes a kbitprep.Plan"):
        kbitprep.prepare(model, plan="x")  # type: ignore[arg-type]
    assert_restored(model, before, "plan='x'")


def test_item10_plan_mismatch_names_the_parameter_that_changed() -> None:
    model = tiny_llama()
    plan = kbitprep.plan(model)
    model.lm_head.weight.data = model.lm_head.weight.data.float()
    with pytest.raises(PlanMismatchError, match=r"'lm_head.weight' changed \(dtype torch.bfloat16 -> torch.float32\)"):
        kbitprep.prepare(model, plan=plan)


def test_item10_plan_for_another_model_says_so() -> None:
    plan = kbitprep.plan(tiny_llama())
    with pytest.raises(PlanMismatchError, match="made for another model"):
        kbitprep.prepare(tiny_llama(), plan=plan)


@pytest.mark.parametrize("value", ["on", True])
def test_item11_api_accepts_on_like_the_cli(value: object) -> None:
    plan = kbitprep.plan(tiny_llama(), checkpointing=value)  # type: ignore[arg-type]
    assert plan.checkpointing.value == "reentrant"


# --------------------------------------------------------------------------- item 9: looks quantized, unknown


class _MysteryInt8Linear(nn.Module):
    """A quantized linear of a library no installed plugin knows: int8 buffer, scales, no float weight."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        w = inner.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.to(x.dtype) * self.scales.to(x.dtype)).t()


def _mystery_model() -> nn.Module:
    model = tiny_llama()
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, _MysteryInt8Linear(getattr(layer.self_attn, name)))
    return model


def test_item9_model_that_looks_quantized_but_no_backend_knows_warns() -> None:
    model = _mystery_model()
    with pytest.warns(BackendWarning, match=r"looks quantized.*_MysteryInt8Linear.*no installed backend"):
        plan = kbitprep.plan(model)
    assert plan.backend == "unquantized"
    assert any("looks quantized" in w for w in plan.warnings)
    assert any(n.startswith("warning: ") for n in plan.notes)


def test_item9_plain_model_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        plan = kbitprep.plan(tiny_llama())
    assert plan.warnings == ()


# --------------------------------------------------------------------------- item 7: drop-in parity, torchao


def _torchao_int4_quantize_(arch: str) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        cfg = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256,
        )  # fmt: skip
        model: nn.Module = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    else:
        model = tiny_llama()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_item7_dropin_matches_peft_on_torchao_quantize_without_a_config(arch: str) -> None:
    import copy

    from peft import prepare_model_for_kbit_training as peft_fn

    from kbitprep._tensors import storage_digest

    theirs = _torchao_int4_quantize_(arch)
    ours = copy.deepcopy(theirs)
    before = full_state(ours)
    qdata = {n: storage_digest(m.weight.data.qdata) for n, m in ours.named_modules() if hasattr(m, "weight")
             and hasattr(m.weight.data, "qdata")}  # fmt: skip
    assert qdata, "the model should hold torchao quantized weights"
    peft_fn(theirs)  # PEFT succeeds here: torchao subclasses cast their scales
    kbitprep.prepare_model_for_kbit_training(ours)
    mismatched = {
        n: (p.dtype, q.dtype)
        for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters())
        if (p.dtype, p.requires_grad) != (q.dtype, q.requires_grad)
    }
    assert not mismatched, mismatched
    # the integer storage itself is never rewritten; undo is exact
    assert {n: storage_digest(m.weight.data.qdata) for n, m in ours.named_modules() if n in qdata} == qdata
    kbitprep.undo(ours)
    assert_restored(ours, before, "undo of the drop-in on torchao")


def test_item7_dropin_still_refuses_the_quanto_cast_peft_crashes_on() -> None:
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qint8, quantize

    model = tiny_llama()
    quantize(model, weights=qint8)
    freeze(model)
    kbitprep.prepare_model_for_kbit_training(model)  # PEFT raises "dtype of a weights Tensor cannot be changed"
    x = torch.randint(0, 256, (1, 8))
    assert model(input_ids=x).logits.isfinite().all()
