"""The planner's steps, each on its own (``kbitprep._planning``): ``build_plan`` is their sequence."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kbitprep._anatomy import anatomy
from kbitprep._fsdp import detect_fsdp
from kbitprep._planning import (
    InputGradsHooks,
    merge_declarations,
    mixed_precision_notes,
    plan_checkpointing,
    plan_embedding_hooks,
    plan_input_grads_hooks,
    plan_parameters,
    plan_stack_hooks,
    plan_use_cache_off,
    raise_backend_warnings,
    resolve_choices,
)
from kbitprep._tensors import iter_unique_parameters
from kbitprep.errors import BackendWarning
from kbitprep.plugin import CheckpointMode, Declarations

from ..families import FAMILIES
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
    hooks = plan_input_grads_hooks(body, on, decl)
    assert hooks.lines == (
        "input-require-grads hook on model.embed_tokens (registered by transformers with checkpointing)",
    )
    assert not hooks.notes and not hooks.sites  # transformers registers it: kbitprep adds nothing
    assert plan_use_cache_off(body, on.mode, peft_compat=False) == ("LlamaConfig",)
    off = plan_checkpointing(model, body, _choices(decl, checkpointing=False), decl, False, None, peft_compat=False)
    assert plan_input_grads_hooks(body, off, decl) == InputGradsHooks()
    assert plan_use_cache_off(body, off.mode, peft_compat=False) == ()
    assert plan_use_cache_off(body, on.mode, peft_compat=True) == ()  # the drop-in leaves use_cache alone


def test_backend_warnings_are_raised_once_each() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = raise_backend_warnings([Declarations(warnings=("converted nothing",)), Declarations()])
    assert found == ("converted nothing",)
    assert [str(w.message) for w in caught if w.category is BackendWarning] == ["kbitprep: converted nothing"]


def _whisper() -> Any:
    """The whisper-speech family's tiny model (bf16, random, not quantized)."""
    return next(f for f in FAMILIES if f.id == "whisper-speech").build()


def test_a_stack_that_does_not_start_from_the_token_embeddings_gets_pre_hooks_on_its_layers() -> None:
    """Regression (issue 17): Whisper's encoder starts from input_features, and only the decoder's token
    embeddings were hooked, so with reentrant checkpointing no encoder parameter got a gradient. The plan now
    hooks the encoder's checkpointed layers and says so; the decoder stays fed by its hooked embeddings."""
    model = _whisper()
    body = anatomy(model)
    assert [s.name for s in body.stacks] == ["model.encoder.layers", "model.decoder.layers"]
    assert body.stacks[0].main_input == "input_features" and body.stacks[1].embeddings is body.embeddings
    decl = Declarations()
    reentrant = plan_checkpointing(model, body, _choices(decl), decl, True, None, peft_compat=False)
    assert reentrant.mode is CheckpointMode.REENTRANT
    hooks = plan_input_grads_hooks(body, reentrant, decl)
    encoder_layers = tuple(name for name, _ in body.stacks[0].layers)
    assert hooks.sites == (body.embeddings_name, *encoder_layers)
    (line,) = [h for h in hooks.lines if "pre-hook" in h]
    assert "model.encoder.layers" in line and "input_features" in line and line.endswith("(kbitprep)")
    asked = _choices(decl, checkpointing="non_reentrant")
    non_reentrant = plan_checkpointing(model, body, asked, decl, "non_reentrant", None, peft_compat=False)
    assert plan_stack_hooks(body, non_reentrant, decl, []) == ([], [])  # nothing needs a hook
    no_hook = Declarations(input_grads_hook=False)
    assert plan_stack_hooks(body, reentrant, no_hook, []) == ([], [])
    model.enable_input_require_grads()  # hooks already there, the encoder's conv1 among them: kept, not doubled
    hooked = anatomy(model)
    present = plan_input_grads_hooks(hooked, reentrant, decl)
    assert present.sites == () and all("already present" in h for h in present.lines)
    assert any("model.encoder.conv1" in h for h in present.lines)


def test_the_drop_in_hooks_what_peft_hooks_every_sub_model_input_embedding() -> None:
    """Regression: PEFT's function calls transformers' enable_input_require_grads, which hooks the input
    embeddings of every sub-model (Whisper: the decoder's embed_tokens and the encoder's conv1); the drop-in
    hooked only the token embeddings. It adds no layer pre-hooks (PEFT does not)."""
    model = _whisper()
    body = anatomy(model)
    decl = Declarations()
    reentrant = plan_checkpointing(model, body, _choices(decl), decl, True, None, peft_compat=True)
    peft = plan_input_grads_hooks(body, reentrant, decl, peft_compat=True)
    twin = _whisper()
    twin.enable_input_require_grads()
    assert set(peft.sites) == {name for name, mod in twin.named_modules() if mod._forward_hooks}
    assert all(h.by == "kbitprep" for h in plan_embedding_hooks(body, reentrant, decl, peft_compat=True))
    assert not [h for h in peft.lines if "pre-hook" in h]
