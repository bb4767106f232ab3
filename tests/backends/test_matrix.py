"""The per-backend matrix: every backend through the same checks on a real quantized tiny model.

Rows come from ``tests/backends/cases/*.py``; the table is printed at the end of the run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch

import kbitprep
from kbitprep.plugin import CheckpointMode, missing_packages

from ..state import model_state, tensor_digests
from ..tiny import batch
from .case import BackendCase
from .registry_of_cases import all_cases

CASES = all_cases()


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> Iterator[BackendCase]:
    c: BackendCase = request.param
    missing = missing_packages(c.requires)
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    with c.entered():
        yield c


def _declarations(model: torch.nn.Module) -> tuple[str, kbitprep.Declarations]:
    reg = kbitprep.default_registry()
    sel = reg.select(model)
    decls = [reg.declare(info, model, det) for info, det in sel.detections]
    quantized = frozenset().union(*(d.quantized for d in decls))
    modes = frozenset.intersection(*(d.checkpointing for d in decls))
    return sel.primary.name, kbitprep.Declarations(
        quantized=quantized,
        checkpointing=modes,
        default_checkpointing=decls[0].default_checkpointing if modes else CheckpointMode.OFF,
    )


def _refused(case: BackendCase, model: torch.nn.Module) -> bool:
    """For a row kbitprep must refuse: plan says not trainable, prepare and the drop-in raise
    NotTrainableError with the expected reason, and the model is unchanged. False for rows that train."""
    if not case.not_trainable:
        return False
    before = model_state(model)
    plan = kbitprep.plan(model)
    assert not plan.trainable and plan.not_trainable_reason
    with pytest.raises(kbitprep.NotTrainableError, match=case.not_trainable):
        kbitprep.prepare(model)
    with pytest.raises(kbitprep.NotTrainableError, match=case.not_trainable):
        kbitprep.prepare_model_for_kbit_training(model)
    assert model_state(model) == before
    return True


@pytest.mark.matrix("detect")
def test_detected_with_evidence(case: BackendCase) -> None:
    model = case.build()
    plan = kbitprep.plan(model)
    assert plan.backend == case.backend, plan.evidence
    assert plan.evidence and all(e.strip() for e in plan.evidence)


@pytest.mark.matrix("plan")
def test_plan_matches_declarations_and_changes_nothing(case: BackendCase) -> None:
    model = case.build()
    before = model_state(model)
    _, decl = _declarations(model)
    plan = kbitprep.plan(model)
    assert model_state(model) == before, "plan() changed the model"
    names_in_plan = {a for p in plan.params for a in p.aliases}
    assert {a for p in plan.quantized for a in p.aliases} == decl.quantized & names_in_plan
    assert not [p.name for p in plan.params if p.quantized and p.upcast]
    assert all(not p.requires_grad_after for p in plan.params)
    if decl.checkpointing:
        assert plan.checkpointing in decl.checkpointing
    else:
        assert plan.checkpointing is CheckpointMode.OFF
    assert plan.bytes_after - plan.bytes_before == plan.byte_delta


@pytest.mark.matrix("storage")
def test_prepare_keeps_quantized_storage_and_freezes(case: BackendCase) -> None:
    model = case.build()
    if _refused(case, model):
        return
    _, decl = _declarations(model)
    if case.backend != "unquantized":
        assert decl.quantized, "a quantized backend must declare its quantized storage"
    digests = tensor_digests(model, decl.quantized)
    types = {n: (type(t), t.dtype) for n, t in model.state_dict(keep_vars=True).items() if n in decl.quantized}
    kbitprep.prepare(model)
    assert tensor_digests(model, decl.quantized) == digests
    after = {n: (type(t), t.dtype) for n, t in model.state_dict(keep_vars=True).items() if n in decl.quantized}
    assert after == types
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    plan = kbitprep.report(model).plan
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if plan.checkpointing is CheckpointMode.OFF:
        assert not any(flags)
    else:
        assert any(flags)


@pytest.mark.matrix("train")
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_lora_forward_backward_step(case: BackendCase, mode: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = case.build()
    if _refused(case, model):
        return
    _, decl = _declarations(model)
    if CheckpointMode(mode) not in decl.checkpointing:
        pytest.skip(f"{case.backend} does not support {mode} checkpointing")
    kbitprep.prepare(model, checkpointing=mode)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(case.lora_targets), lora_dropout=0.0)
    )
    lora = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    opt = torch.optim.AdamW([p for _, p in lora], lr=1e-2)
    peft_model.train()
    data = batch(vocab=model.config.vocab_size)
    for step in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = peft_model(**data).loss
        assert math.isfinite(loss.item())
        loss.backward()
        if step == 1:
            no_grad = [n for n, p in lora if p.grad is None or not bool(p.grad.ne(0).any())]
            assert not no_grad, f"LoRA parameters without gradient after two steps: {no_grad[:4]}"
        opt.step()
        opt.zero_grad()


@pytest.mark.matrix("undo")
def test_undo_exact_and_second_prepare_is_noop(case: BackendCase) -> None:
    model = case.build()
    if _refused(case, model):
        return
    before = model_state(model)
    kbitprep.prepare(model)
    prepared = model_state(model)
    with pytest.warns(kbitprep.AlreadyPreparedWarning):
        kbitprep.prepare(model)
    assert model_state(model) == prepared
    kbitprep.undo(model)
    assert model_state(model) == before


@pytest.mark.matrix("peft-parity")
def test_parity_with_peft(case: BackendCase) -> None:
    from peft import prepare_model_for_kbit_training as peft_prepare

    ours = case.build()
    if _refused(case, ours):
        return
    theirs = case.build()
    if case.peft_fails:
        with pytest.raises(Exception, match=case.peft_fails):
            peft_prepare(theirs)
        kbitprep.prepare_model_for_kbit_training(ours)  # must succeed where PEFT crashes
        with torch.no_grad():  # ... and leave a model whose forward works
            assert math.isfinite(ours(**batch(vocab=ours.config.vocab_size)).loss.item())
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_prepare(theirs)
    kbitprep.prepare_model_for_kbit_training(ours)
    a = {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    b = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    assert a == b
    gc_a = {n: getattr(m, "gradient_checkpointing", None) for n, m in theirs.named_modules()}
    gc_b = {n: getattr(m, "gradient_checkpointing", None) for n, m in ours.named_modules()}
    assert gc_a == gc_b
    emb_a, emb_b = theirs.get_input_embeddings(), ours.get_input_embeddings()
    assert bool(len(emb_a._forward_hooks)) == bool(len(emb_b._forward_hooks))
    assert len(emb_b._forward_hooks) <= 1, "kbitprep never stacks input-grad hooks"
