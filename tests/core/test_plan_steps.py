"""The planner's steps, each on its own (``kbitprep._planning``): ``build_plan`` is their sequence."""

from __future__ import annotations

import warnings

import torch

from kbitprep._anatomy import anatomy
from kbitprep._fsdp import detect_fsdp
from kbitprep._planning import (
    merge_declarations,
    mixed_precision_notes,
    plan_checkpointing,
    plan_input_grads_hooks,
    plan_parameters,
    plan_use_cache_off,
    raise_backend_warnings,
    resolve_choices,
)
from kbitprep._tensors import iter_unique_parameters
from kbitprep.errors import BackendWarning
from kbitprep.plugin import CheckpointMode, Declarations

from ..tiny import tiny_llama

NO_FSDP = detect_fsdp(False)


def _choices(decl: Declarations, *, upcast: object = None, checkpointing: object = True, memory: object = None):  # type: ignore[no-untyped-def]
    return resolve_choices(decl, NO_FSDP, upcast, checkpointing, memory, peft_compat=False)  # type: ignore[arg-type]


def test_merged_declarations_allow_only_what_every_backend_allows() -> None:
    a = Declarations(quantized=frozenset({"x"}), checkpointing=frozenset(CheckpointMode) - {CheckpointMode.OFF})
    b = Declarations(
        quantized=frozenset({"y"}),
        allow_upcast=False,
        checkpointing=frozenset({CheckpointMode.NON_REENTRANT}),
        trainable=False,
        not_trainable_reason="no backward",
    )
    merged = merge_declarations([a, b])
    assert merged.quantized == {"x", "y"}
    assert merged.allow_upcast is False and merged.default_upcast == "none"
    assert merged.checkpointing == {CheckpointMode.NON_REENTRANT}
    assert merged.default_checkpointing is CheckpointMode.NON_REENTRANT
    assert not merged.trainable and merged.not_trainable_reason == "no backward"


def test_the_lowest_preset_chooses_no_upcast_and_reentrant_checkpointing() -> None:
    decl = Declarations(default_upcast="all", default_checkpointing=CheckpointMode.NON_REENTRANT)
    choices = _choices(decl, memory="lowest")
    assert choices.policy_label == "none" and choices.mode is CheckpointMode.REENTRANT
    assert choices.modes is not None and choices.modes.offload and choices.modes.chunked_head
    default = _choices(decl)
    assert default.policy_label == "all" and default.mode is CheckpointMode.NON_REENTRANT


def test_checkpointing_the_user_enabled_is_kept_when_left_default_and_replaced_when_asked() -> None:
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decl = Declarations()
    kept = plan_checkpointing(model, anatomy(model), _choices(decl), decl, True, None, peft_compat=False)
    assert kept.keep_existing and kept.mode is CheckpointMode.NON_REENTRANT
    assert kept.kwargs == {"use_reentrant": False} and not kept.notes
    asked = _choices(decl, checkpointing="reentrant")
    replaced = plan_checkpointing(model, anatomy(model), asked, decl, "reentrant", None, peft_compat=False)
    assert not replaced.keep_existing and replaced.kwargs == {"use_reentrant": True}
    assert any("will be replaced" in n for n in replaced.notes)


def test_parameters_freeze_and_upcast_only_what_the_policy_and_backend_allow() -> None:
    model = tiny_llama(torch.bfloat16)
    unique = list(iter_unique_parameters(model))
    decl = Declarations(quantized=frozenset({"model.layers.0.mlp.up_proj.weight"}))
    params = plan_parameters(unique, decl, _choices(decl, upcast="all"), frozenset(), peft_compat=False)
    by_name = {p.name: p for p in params}
    assert all(not p.requires_grad_after for p in params)
    assert by_name["model.layers.0.mlp.up_proj.weight"].dtype_after is torch.bfloat16  # quantized: never cast
    assert by_name["model.norm.weight"].dtype_after is torch.float32
    forbidden = Declarations(allow_upcast=False, default_upcast="none")
    none = plan_parameters(unique, forbidden, _choices(forbidden), frozenset(), peft_compat=False)
    assert all(not p.upcast for p in none)
    assert not mixed_precision_notes(params, "all")  # only quantized storage stays bf16 beside fp32
    assert not mixed_precision_notes(none, "none")
    norms = plan_parameters(unique, decl, _choices(decl, upcast="norms"), frozenset(), peft_compat=False)
    assert {p.module_type for p in norms if p.upcast} == {"LlamaRMSNorm"}
    assert mixed_precision_notes(norms, "norms")  # fp32 norms beside bf16 linears: train under autocast


def test_hooks_and_use_cache_follow_the_checkpointing_mode() -> None:
    model = tiny_llama()
    decl = Declarations()
    body = anatomy(model)
    on = plan_checkpointing(model, body, _choices(decl), decl, True, None, peft_compat=False)
    hooks, notes = plan_input_grads_hooks(body, on, decl)
    assert hooks == ["input-require-grads hook on model.embed_tokens (registered by transformers with checkpointing)"]
    assert not notes
    assert plan_use_cache_off(body, on.mode, peft_compat=False) == ("LlamaConfig",)
    off = plan_checkpointing(model, body, _choices(decl, checkpointing=False), decl, False, None, peft_compat=False)
    assert plan_input_grads_hooks(body, off, decl) == ([], [])
    assert plan_use_cache_off(body, off.mode, peft_compat=False) == ()
    assert plan_use_cache_off(body, on.mode, peft_compat=True) == ()  # the drop-in leaves use_cache alone


def test_backend_warnings_are_raised_once_each() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = raise_backend_warnings([Declarations(warnings=("converted nothing",)), Declarations()])
    assert found == ("converted nothing",)
    assert [str(w.message) for w in caught if w.category is BackendWarning] == ["kbitprep: converted nothing"]
