"""kbitprep's memory modes under TRL's trainers, which call ``model(..., fused_lm_head=True)``.

TRL 1.16's ``SFTTrainer`` and ``DPOTrainer`` patch the causal LM with ``add_fused_lm_head`` after
kbitprep's prepare: its forward runs the backbone and its own head directly. These tests check, in
the trainers themselves and call by call, that kbitprep's offload runs under that forward (it sits
on the backbone), that kbitprep's chunked head serves the fused calls on the CPU with TRL's output
(loss, per-token log-probs, entropy, accuracy: TRL's metrics keep working) equal to TRL's own head,
and that kbitprep's offload steps aside for another offload instead of running beside it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import kbitprep
from kbitprep.errors import CheckpointingConflictWarning, KbitprepWarning

from ..tiny import saved_tiny_llama, tiny_llama
from ..tiny_configs import TINY_DECODER
from .common import LOADERS, adapter_state, learnable_ids, lora_config, tiny_tokenizer, training_kwargs

trl = pytest.importorskip("trl")
ALL_STATS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _bnb_model() -> torch.nn.Module:
    return LOADERS["bnb-4bit"][2](saved_tiny_llama(torch.bfloat16))


def _check_kbitprep_ran(model: torch.nn.Module, calls: int) -> dict[str, Any]:
    stats = kbitprep.memory_modes(model)
    assert stats["packed"] > 0, "kbitprep's offload hooks never ran"
    assert stats["offload_by"] == "kbitprep"
    assert stats["head_calls"]["fused_kbitprep"] >= calls and stats["head_calls"]["fused_trl"] == 0, stats
    return stats


def test_sft_trainer_runs_kbitprep_offload_and_chunked_head(tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base = kbitprep.prepare(_bnb_model(), memory="lowest")
    args = kbitprep.training_arguments_for(base, SFTConfig(**training_kwargs(tmp_path)))
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": learnable_ids()}),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config(),
    )
    before = adapter_state(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    # TRL's metrics come from the per-token statistics kbitprep's head returned
    assert all(0.0 <= h["mean_token_accuracy"] <= 1.0 and h["entropy"] > 0 for h in logs)
    _check_kbitprep_ran(trainer.model, calls=4)
    after = adapter_state(trainer.model)
    assert [n for n in before if torch.equal(before[n], after[n])] == []


def test_dpo_trainer_runs_kbitprep_offload_and_chunked_head(tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base = kbitprep.prepare(_bnb_model(), memory="lowest")
    words = [f"t{i}" for i in range(10, 90, 10)]
    rows = {
        "prompt": [" ".join(words[i : i + 3]) for i in range(4)],
        "chosen": [" " + " ".join(words[i + 3 : i + 5]) for i in range(4)],
        "rejected": [" " + " ".join(reversed(words[i + 3 : i + 5])) for i in range(4)],
    }
    kw = training_kwargs(tmp_path, per_device_train_batch_size=2, max_steps=2)
    args = kbitprep.training_arguments_for(base, DPOConfig(**kw, max_length=16))
    torch.manual_seed(0)
    trainer = DPOTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config(),
    )
    before = adapter_state(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("rewards/accuracies" in h for h in logs)
    _check_kbitprep_ran(trainer.model, calls=2)
    after = adapter_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def _fused_pair(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], **call: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fused call served by kbitprep's chunked head, then the same call served by TRL's head."""
    results = []
    for chunked in (True, False):
        kbitprep.set_memory_modes(model, chunked_head=chunked)
        out = model(**batch, **call, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append({**{k: getattr(out, k) for k in (*ALL_STATS, "label_mask", "loss")}, "grads": grads})
    return results[0], results[1]


def _assert_same(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    for key in (*ALL_STATS, "label_mask", "loss"):
        a, b = ours[key], theirs[key]
        if a.dtype == torch.bool:
            assert torch.equal(a, b), key
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=key)
    assert ours["grads"].keys() == theirs["grads"].keys() and ours["grads"]
    for name in ours["grads"]:
        torch.testing.assert_close(ours["grads"][name], theirs["grads"][name], rtol=1e-4, atol=1e-6, msg=name)


def _batch(vocab: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_calls_equal_trls_head(family: str, temperature: float) -> None:
    """kbitprep's chunked head answers a fused call with what TRL's head computes (fp32, to 1e-5), gradients too."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    if family == "llama":
        model = tiny_llama(torch.float32)
    else:
        cfg = Gemma2Config(**TINY_DECODER, head_dim=16, final_logit_softcapping=2.0)
        model = Gemma2ForCausalLM(cfg)
    kbitprep.prepare(model, memory={"chunked_head": 8})
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(("q_proj.weight", "down_proj.weight")))
    add_fused_lm_head(model, temperature=temperature, outputs=ALL_STATS)
    model.train()
    ours, theirs = _fused_pair(model, _batch())
    _assert_same(ours, theirs)
    calls = kbitprep.memory_modes(model)["head_calls"]
    assert calls["fused_kbitprep"] == 1 and calls["fused_trl"] == 1


def test_fused_calls_with_shift_labels_and_num_items() -> None:
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory={"chunked_head": 8})
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model.train()
    batch = _batch()
    shift = torch.nn.functional.pad(batch.pop("labels"), (0, 1), value=-100)[:, 1:]
    ours, theirs = _fused_pair(model, batch, shift_labels=shift, num_items_in_batch=torch.tensor(30))
    for key in ("log_sum_sq_probs", "mean_logits"):
        assert ours[key] is None and theirs[key] is None
    ours = {k: v for k, v in ours.items() if v is not None}
    theirs = {k: v for k, v in theirs.items() if v is not None}
    for key in ("log_probs", "entropy", "loss"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours["is_top1"], theirs["is_top1"])


def test_without_the_chunked_head_trls_head_serves_and_offload_still_runs() -> None:
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory="offload")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    add_fused_lm_head(model)
    model.train()
    model(**_batch(), fused_lm_head=True).loss.backward()
    stats = kbitprep.memory_modes(model)
    assert stats["packed"] > 0 and stats["offload_by"] == "kbitprep"
    assert stats["head_calls"] == {"chunked": 0, "fused_kbitprep": 0, "fused_trl": 0}  # no router without the head


def _offload_model() -> torch.nn.Module:
    model = tiny_llama(torch.float32)
    kbitprep.prepare(model, memory="offload")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    model.train()
    return model


def test_offload_steps_aside_for_an_outer_saved_tensors_offload() -> None:
    model = _offload_model()
    batch = _batch()
    with pytest.warns(KbitprepWarning, match="steps aside"), torch.autograd.graph.save_on_cpu():
        model(**batch).loss.backward()
    stats = kbitprep.memory_modes(model)
    assert stats["packed"] == 0 and stats["offload_by"] == "torch.autograd.graph.save_on_cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error", KbitprepWarning)  # warned once
        with torch.autograd.graph.save_on_cpu():
            model(**batch).loss.backward()
    model(**batch).loss.backward()  # alone again: kbitprep's runs
    assert kbitprep.memory_modes(model)["offload_by"] == "kbitprep" and kbitprep.memory_modes(model)["packed"] > 0


def test_offload_steps_aside_for_transformers_offloading_checkpoint() -> None:
    """``activation_checkpointing_enable(offload=True)`` (also what Trainer does with
    ``activation_checkpointing_kwargs={"offload": True}``) wraps each layer's checkpoint in save_on_cpu with
    pinned memory, which needs an accelerator to run; the detection kbitprep's forward makes is checked here."""
    from kbitprep._memory.offload import other_offload

    model = _offload_model()
    assert other_offload(model) == ""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True}, offload=True)
    assert other_offload(model) == "transformers' activation_checkpointing_enable(offload=True)"
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert other_offload(model) == ""


def test_training_arguments_turn_off_trls_activation_offloading(tmp_path: Path) -> None:
    from trl import SFTConfig

    model = kbitprep.prepare(tiny_llama(), memory="offload")
    requested = SFTConfig(**training_kwargs(tmp_path), activation_offloading=True)
    with pytest.warns(CheckpointingConflictWarning, match="activation_offloading"):
        args = kbitprep.training_arguments_for(model, requested)
    assert args.activation_offloading is False and requested.activation_offloading is True
    plain = kbitprep.prepare(tiny_llama())
    assert kbitprep.training_arguments_for(plain, requested).activation_offloading is True  # TRL's runs
