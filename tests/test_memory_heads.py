"""The chunked output head on families that transform the head's output before the loss.

Gemma 2 and 3 soft-cap the logits (``final_logit_softcapping``), Cohere scales them (``logit_scale``),
Granite divides them (``logits_scaling``), Falcon-H1 multiplies them (``lm_head_multiplier``). The
chunked head applies the same transform inside each chunk (kbitprep._memory.chunked_loss.HeadTransform),
so its loss equals the plain forward's; a transform the config does not explain still falls back.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import transformers as tf

import kbitprep
from kbitprep.errors import KbitprepWarning

from .test_memory_modes import _batch, _train_step

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MAMBA = dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16)

#: family -> (config class, model class, the transform's key and a value that changes the logits, what it says)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any], str]] = {
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        dict(final_logit_softcapping=2.0, head_dim=16),
        "soft-capped at 2",
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        dict(final_logit_softcapping=2.0, head_dim=16),
        "soft-capped at 2",
    ),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(logit_scale=4.0), "logits x 4"),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(logits_scaling=0.25), "logits / 0.25"),
    "falcon_h1": (tf.FalconH1Config, tf.FalconH1ForCausalLM, dict(lm_head_multiplier=3.0, **MAMBA), "logits x 3"),
}


def _pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    config_cls, model_cls, extra, _ = FAMILIES[family]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(model_cls(config_cls(vocab_size=256, **SMALL, **extra)))
    for model in models:
        for p in model.parameters():
            p.requires_grad_(False)
    return models[0], models[1]


def _unfreeze(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("self_attn.q_proj.weight", "self_attn.o_proj.weight")))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_head_keeps_the_familys_transform(family: str) -> None:
    plain, chunked = _pair(family)
    kbitprep.prepare(plain, checkpointing=False)
    plan = kbitprep.plan(chunked, memory={"chunked_head": 8}, checkpointing=False)
    said = FAMILIES[family][3]
    assert any(said in note for note in plan.notes), plan.notes  # the plan says what the head does
    kbitprep.prepare(chunked, plan=plan)
    for model in (plain, chunked):
        _unfreeze(model)
    batch = _batch()
    ref_loss, ref_grads, _ = _train_step(plain, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitprepWarning)  # no fallback
        loss, grads, out = _train_step(chunked, batch)
    assert out.logits is None
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    stats = kbitprep.memory_modes(chunked)
    assert stats["head_calls"]["chunked"] == 1 and stats["head_transform"] == said


def test_a_config_changed_after_prepare_is_followed() -> None:
    plain, chunked = _pair("gemma2")
    kbitprep.prepare(plain, checkpointing=False)
    kbitprep.prepare(chunked, memory={"chunked_head": 8}, checkpointing=False)
    for model in (plain, chunked):
        model.config.final_logit_softcapping = 1.5  # the forward reads it at each call; so does the chunked head
        _unfreeze(model)
    batch = _batch()
    ref_loss, _, _ = _train_step(plain, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitprepWarning)
        loss, _, out = _train_step(chunked, batch)
    assert out.logits is None and loss == pytest.approx(ref_loss, rel=1e-5)
    assert kbitprep.memory_modes(chunked)["head_transform"] == "soft-capped at 1.5"


def test_a_transform_the_config_does_not_explain_falls_back_with_a_warning() -> None:
    """Cohere's forward multiplies by the module's ``logit_scale``, set from the config at init: a config
    changed afterwards no longer says what the forward does, so the chunked head steps aside."""
    plain, chunked = _pair("cohere")
    kbitprep.prepare(plain, checkpointing=False)
    kbitprep.prepare(chunked, memory={"chunked_head": 8}, checkpointing=False)
    for model in (plain, chunked):
        model.config.logit_scale = 2.0  # the module keeps multiplying by 4.0
        _unfreeze(model)
    batch = _batch()
    with pytest.warns(KbitprepWarning, match="config does not say"):
        loss, _, out = _train_step(chunked, batch)
    ref_loss, _, _ = _train_step(plain, batch)
    assert out.logits is not None and loss == pytest.approx(ref_loss, rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitprepWarning)  # warned once, not at every step
        _train_step(chunked, batch)
