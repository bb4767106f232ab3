"""The plan -> prepare -> undo pipeline on real torch / transformers models."""

from __future__ import annotations

import pytest
import torch

import kbitprep
from kbitprep import CheckpointMode, Declarations, Registry

from ..state import model_state
from ..tiny import batch, tiny_llama
from .backends_for_tests import NON_REENTRANT_ONLY, MarkerBackend, halfway_failing_fixup


def _registry(**kw: object) -> Registry:
    reg = Registry()
    reg.register(MarkerBackend("marker", priority=90, **kw))  # type: ignore[arg-type]
    return reg


def _marked(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    m = tiny_llama(dtype)
    m.kbitprep_test_marker = True
    return m


def test_plan_changes_nothing_and_reports_bytes() -> None:
    model = tiny_llama()
    before = model_state(model)
    plan = kbitprep.plan(model, upcast="all")
    assert model_state(model) == before
    n_params = sum(1 for _ in model.parameters())
    assert len(plan.params) == len(plan.to_freeze) == len(plan.to_upcast) == n_params
    assert plan.bytes_before == sum(p.numel() * 2 for p in model.parameters())
    assert plan.byte_delta == plan.bytes_before  # bf16 -> fp32 doubles
    text = str(plan)
    assert "backend        : unquantized" in text and "TOTAL" in text and "LlamaRMSNorm" in text
    data = plan.to_dict()
    assert data["totals"]["upcast"] == n_params and data["checkpointing"] == "reentrant"
    assert kbitprep.plan(model).byte_delta == 0  # the default keeps dtypes


def test_prepare_report_and_exact_undo() -> None:
    model = tiny_llama()
    before = model_state(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = kbitprep.prepare(model, upcast="all")
    assert out is model
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    rep = kbitprep.report(model)
    assert rep.plan.upcast_policy == "all" and "enabled reentrant checkpointing" in rep.steps
    assert "applied in" in str(rep)
    assert model.config.use_cache is False
    kbitprep.undo(model)
    assert model_state(model) == before
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, originals[n])  # equality, not closeness
    with pytest.raises(kbitprep.NotPreparedError):
        kbitprep.undo(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_undo_round_trip_is_lossless(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype)
    with torch.no_grad():
        for p in model.parameters():  # extreme values of the dtype survive fp32 and back
            p.view(-1)[:3] = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny, -0.0], dtype=dtype)
    ref = [p.detach().clone() for p in model.parameters()]
    kbitprep.prepare(model, upcast="all")
    kbitprep.undo(model)
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(model.parameters(), ref))


def test_atomic_when_a_fixup_raises_halfway() -> None:
    reg = _registry(decl=Declarations(fixups=(halfway_failing_fixup(),), default_upcast="norms"))
    model = _marked()
    before = model_state(model)
    with pytest.raises(RuntimeError, match="fix-up exploded halfway"):
        kbitprep.prepare(model, registry=reg)
    assert model_state(model) == before
    assert not hasattr(model.model.layers[0], "some_flag")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert kbitprep._mutation.prepared_state(model) is None


def test_second_prepare_is_a_noop_that_says_so() -> None:
    model = tiny_llama()
    kbitprep.prepare(model)
    state = model_state(model)
    with pytest.warns(kbitprep.AlreadyPreparedWarning, match="already prepared"):
        kbitprep.prepare(model, upcast="all")
    assert model_state(model) == state


def test_peft_wrapped_model_keeps_adapters_trainable() -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora
    plan = kbitprep.plan(peft_model)
    assert {p.name for p in plan.params if p.adapter} == lora
    kbitprep.prepare(peft_model)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == lora
    assert any("PEFT-wrapped" in n for n in plan.notes)


def test_checkpointing_passes_use_reentrant_explicitly() -> None:
    for mode, flag in (("reentrant", True), ("non_reentrant", False)):
        model = tiny_llama()
        kbitprep.prepare(model, checkpointing=mode)
        fn = model.model.layers[1]._gradient_checkpointing_func
        assert fn.keywords["use_reentrant"] is flag
        assert model.model.layers[1].gradient_checkpointing is True
    model = tiny_llama()
    kbitprep.prepare(model, checkpointing=False)
    assert not model.model.layers[0].gradient_checkpointing


def test_backend_restricting_checkpointing_is_honoured() -> None:
    reg = _registry(decl=NON_REENTRANT_ONLY)
    assert kbitprep.plan(_marked(), registry=reg).checkpointing is CheckpointMode.NON_REENTRANT
    with pytest.raises(kbitprep.InvalidPolicyError, match="not supported by this backend"):
        kbitprep.plan(_marked(), registry=reg, checkpointing="reentrant")


def test_never_stacks_a_second_input_grads_hook() -> None:
    model = tiny_llama()
    model.enable_input_require_grads()
    emb = model.get_input_embeddings()
    assert len(emb._forward_hooks) == 1
    kbitprep.prepare(model, checkpointing="reentrant")
    # transformers' checkpointing re-registers its hook; kbitprep must not add a third kind on top
    assert len(emb._forward_hooks) <= 2
    kbitprep.undo(model)
    assert len(emb._forward_hooks) == 1
    fresh = tiny_llama()
    kbitprep.prepare(fresh, checkpointing="reentrant")
    assert len(fresh.get_input_embeddings()._forward_hooks) == 1


@pytest.mark.parametrize(
    ("policy", "upcast_types"),
    [("none", set()), ("norms", {"LlamaRMSNorm"}), ("all", {"LlamaRMSNorm", "Linear", "Embedding"})],
)
def test_named_policies(policy: str, upcast_types: set[str]) -> None:
    plan = kbitprep.plan(tiny_llama(), upcast=policy)
    assert {p.module_type for p in plan.to_upcast} == upcast_types


def test_callable_policy_and_default_from_backend() -> None:
    plan = kbitprep.plan(tiny_llama(), upcast=lambda name, p, m: name.endswith("lm_head.weight"))
    assert [p.name for p in plan.to_upcast] == ["lm_head.weight"]
    assert plan.upcast_policy.startswith("custom:")
    reg = _registry(decl=Declarations(default_upcast="norms"))
    assert kbitprep.plan(_marked(), registry=reg).upcast_policy == "norms"


def test_fp32_model_has_nothing_to_upcast() -> None:
    plan = kbitprep.plan(tiny_llama(torch.float32), upcast="all")
    assert plan.to_upcast == () and plan.byte_delta == 0


def test_gradient_flow_check_passes_and_catches_a_missing_hook() -> None:
    model = tiny_llama()
    kbitprep.prepare(model, checkpointing="reentrant", verify=True)
    result = kbitprep.verify_gradient_flow(model)
    assert result.ok and result.checked == 1
    assert not any(p.requires_grad for p in model.parameters())  # the probe was put back
    # the bug PEFT users hit: reentrant checkpointing without the input-require-grads hook
    model.get_input_embeddings()._forward_hooks.clear()
    with pytest.raises(kbitprep.GradientFlowError, match="input-require-grads hook"):
        kbitprep.verify_gradient_flow(model)


def test_gradient_flow_check_names_parameters_without_gradient() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    kbitprep.prepare(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert kbitprep.verify_gradient_flow(peft_model, batch(seq=8)).ok
    unused = peft_model.base_model.model.model.rotary_emb
    unused.register_parameter("dangling", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(kbitprep.GradientFlowError, match="dangling"):
        kbitprep.verify_gradient_flow(peft_model, batch(seq=8))


def test_verify_failure_during_prepare_restores_the_model() -> None:
    # a backend wrongly declaring that reentrant checkpointing needs no input-grads hook, on a model
    # for which transformers does not add one itself: verify=True must catch it and roll back
    reg = _registry(decl=Declarations(input_grads_hook=False))
    model = _marked()
    model.main_input_name = "inputs_embeds"
    before = model_state(model)
    with pytest.raises(kbitprep.GradientFlowError, match="probe parameter"):
        kbitprep.prepare(model, registry=reg, checkpointing="reentrant", verify=True)
    assert model_state(model) == before
    assert kbitprep._mutation.prepared_state(model) is None


def test_plan_applied_to_another_model_is_refused() -> None:
    plan = kbitprep.plan(tiny_llama())
    other = tiny_llama()
    with pytest.raises(kbitprep.PlanMismatchError):
        kbitprep.prepare(other, plan=plan)
