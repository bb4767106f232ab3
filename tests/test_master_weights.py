"""fp32 master weights for parameters that train in full after kbitprep's prepare (kbitprep._master_weights).

The case from the issue: bnb NF4, kbitprep's default (no upcast), then PEFT's ``modules_to_save=["lm_head"]``:
the trainable copy was bf16, and after 3 AdamW steps at lr 1e-5 only ~16% of its elements had changed
(100% after PEFT's function, which upcasts). Now it trains in fp32 and learns as after PEFT's function.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kbitprep

from .integrations.common import LOADERS, learnable_ids
from .tiny import saved_tiny_llama, tiny_llama

peft = pytest.importorskip("peft")


def _nf4() -> torch.nn.Module:
    pytest.importorskip("bitsandbytes", reason="the issue's case loads the model with bitsandbytes NF4 (extra 'bnb')")
    return LOADERS["bnb-4bit"][2](saved_tiny_llama(torch.bfloat16))


def _train(model: torch.nn.Module, steps: int = 3, lr: float = 1e-5) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = torch.tensor(learnable_ids())
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        loss = out.loss.detach()
    return float(loss)


def _modules_to_save_run(prepare: str) -> tuple[float, float, torch.nn.Module]:
    torch.manual_seed(0)
    base = _nf4()
    if prepare == "peft":
        base = peft.prepare_model_for_kbit_training(base)
    else:
        kbitprep.prepare(base)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    copy = model.base_model.model.lm_head.modules_to_save["default"].weight
    before = copy.detach().float().clone()
    loss = _train(model)
    changed = float((copy.detach().float() != before).float().mean())
    return changed, loss, model


def test_modules_to_save_learns_as_after_peft_function() -> None:
    changed, loss, model = _modules_to_save_run("kbitprep")
    peft_changed, peft_loss, _ = _modules_to_save_run("peft")
    assert peft_changed == 1.0
    assert changed == 1.0, f"only {changed:.1%} of the lm_head copy changed (bf16 updates rounded away)"
    assert loss == pytest.approx(peft_loss, abs=2e-3)
    head = model.base_model.model.lm_head
    assert head.modules_to_save["default"].weight.dtype is torch.float32
    # everything that does not train keeps its loaded dtype: kbitprep's parameter memory
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen and all(d is torch.bfloat16 for d in frozen.values()), frozen
    steps = kbitprep.report(model).steps
    assert any(s.startswith("fp32 master weights for 1 parameters") and "lm_head" in s for s in steps)


def test_a_layer_unfrozen_by_hand_trains_in_fp32_and_keeps_computing_in_half_precision() -> None:
    torch.manual_seed(0)
    model = tiny_llama(torch.bfloat16)
    plan = kbitprep.plan(model)
    assert plan.master_weights and any("fp32 master weights" in n for n in plan.notes)
    kbitprep.prepare(model, plan=plan)
    emb = model.model.embed_tokens
    emb.weight.requires_grad_(True)
    seen = []
    # what the first decoder layer receives: the embedding's output, after kbitprep's hooks
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0].dtype if args else kwargs["hidden_states"].dtype), with_kwargs=True
    )
    _train(model, steps=2)
    handle.remove()
    assert emb.weight.dtype is torch.float32
    assert seen == [torch.bfloat16, torch.bfloat16]  # the rest of the model still gets bf16
    assert model.model.norm.weight.dtype is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and under autocast
        loss = _train(model, steps=1)
    assert math.isfinite(loss) and emb.weight.dtype is torch.float32


def test_undo_removes_the_hooks_and_casts_back() -> None:
    model = tiny_llama(torch.bfloat16)
    hooks_before = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}
    kbitprep.prepare(model)
    model.lm_head.weight.requires_grad_(True)
    _train(model, steps=1)
    assert model.lm_head.weight.dtype is torch.float32
    kbitprep.undo(model)
    assert model.lm_head.weight.dtype is torch.bfloat16
    hooks_after = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}
    assert hooks_after == hooks_before


def test_eval_and_no_grad_forwards_change_nothing() -> None:
    model = kbitprep.prepare(tiny_llama(torch.bfloat16))
    model.lm_head.weight.requires_grad_(True)
    x = torch.tensor(learnable_ids())
    with torch.no_grad():
        model(input_ids=x)
    model.eval()
    model(input_ids=x)
    assert model.lm_head.weight.dtype is torch.bfloat16


def test_the_drop_in_upcasts_as_peft_does_and_installs_no_master_weights() -> None:
    model = tiny_llama(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kbitprep.prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype is torch.float32  # PEFT's upcast: trainable later in fp32 already
    assert not kbitprep.report(model).plan.master_weights
    fp32 = kbitprep.prepare(tiny_llama(torch.float32))
    assert not kbitprep.report(fp32).plan.master_weights  # nothing in half precision


def test_steady_training_forwards_do_not_walk_the_model_and_still_see_new_trainable_parameters() -> None:
    """The hook checks a flat list of the model's parameters; it walks the module tree again only after a
    module or parameter was registered somewhere. A parameter unfrozen by hand (no registration) and a
    layer swapped in by assignment (a registration) after the first training steps still get fp32 master
    weights."""
    from kbitprep.testing import count_module_walks

    torch.manual_seed(0)
    model = kbitprep.prepare(tiny_llama(torch.bfloat16))
    model.model.embed_tokens.weight.requires_grad_(True)
    # the first forward walks; it also registers the decoder layers into the list transformers slices,
    # seen for the first time, so the second walks once more; from then on nothing new is registered
    _train(model, steps=2)
    assert model.model.embed_tokens.weight.dtype is torch.float32
    x = torch.tensor(learnable_ids())
    model.train()
    with count_module_walks(model) as walks:
        for _ in range(3):
            model(input_ids=x, labels=x)
    assert walks.total == 0, dict(walks.callers)
    model.lm_head.weight.requires_grad_(True)  # unfrozen by hand: nothing registered
    _train(model, steps=1)
    assert model.lm_head.weight.dtype is torch.float32
    down = model.model.layers[0].mlp.down_proj
    fresh = torch.nn.Linear(down.in_features, down.out_features, bias=False, dtype=torch.bfloat16)
    model.model.layers[0].mlp.down_proj = fresh  # a new trainable layer, registered by assignment
    with count_module_walks(model) as walks:
        _train(model, steps=1)
    assert fresh.weight.dtype is torch.float32 and walks.total >= 1
