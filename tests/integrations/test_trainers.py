"""transformers ``Trainer`` and TRL ``SFTTrainer`` on models kbitprep prepared (real quantized tiny models, CPU).

Each training test loads a tiny Llama quantized by a real library, prepares it with kbitprep,
trains LoRA adapters for a few steps on learnable toy data with ``gradient_checkpointing=True``
in the arguments (aligned by :func:`kbitprep.training_arguments_for`), and checks that the loss
over the data falls, every adapter tensor changed, and the model still has exactly one
input-require-grads hook and the ``use_reentrant`` kbitprep chose.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import kbitprep
from kbitprep import CheckpointingConflictWarning, checkpointing_status, training_arguments_for
from kbitprep.errors import InvalidPolicyError, NotPreparedError

from ..tiny import saved_tiny_llama, tiny_llama
from .common import LOADERS, adapter_state, full_loss, learnable_ids, lora_config, tiny_tokenizer, training_kwargs

STEPS = 4  # training_kwargs() runs 4 steps
LR = 5e-2


def _load(row: str) -> torch.nn.Module:
    backend, module, loader = LOADERS[row]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        pytest.skip(f"{module} is not installed")
    model = loader(saved_tiny_llama(torch.bfloat16))
    assert kbitprep.plan(model).backend == backend
    return model


def _check_trained(
    model: torch.nn.Module,
    before_loss: float,
    before: dict[str, torch.Tensor],
    ids: list[list[int]],
    logged: list[float],
) -> None:
    after_loss = full_loss(model, ids)
    assert len(logged) == STEPS
    assert after_loss < before_loss - 0.2, (before_loss, after_loss, logged)
    after = adapter_state(model)
    assert after.keys() == before.keys() and before
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"adapter tensors that did not change: {unchanged[:4]}"
    assert all(after[n].abs().sum() > 0 for n in after if "lora_B" in n)


def _check_checkpointing(model: torch.nn.Module, prepared: torch.nn.Module) -> None:
    plan = kbitprep.report(prepared).plan
    status = checkpointing_status(model)
    assert plan.checkpointing is not kbitprep.CheckpointMode.OFF
    assert status.enabled and status.consistent
    assert status.use_reentrant is (plan.checkpointing is kbitprep.CheckpointMode.REENTRANT)
    assert status.input_grads_hooks == 1, status


@pytest.mark.parametrize("row", ["bnb-4bit", "torchao-int8"])
def test_trainer_trains_prepared_model(row: str, tmp_path: Path) -> None:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    base = kbitprep.prepare(_load(row))
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config())
    ids = learnable_ids()
    before_loss, before = full_loss(model, ids), adapter_state(model)

    requested = TrainingArguments(**training_kwargs(tmp_path, gradient_checkpointing=True))
    args = training_arguments_for(model, requested)
    assert requested.gradient_checkpointing is True  # the caller's object is not changed
    assert args.gradient_checkpointing is False and args.ddp_find_unused_parameters is False

    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _check_trained(model, before_loss, before, ids, logged)
    _check_checkpointing(model, base)


@pytest.mark.parametrize("row", ["bnb-4bit", "quanto-int8"])
def test_sft_trainer_trains_prepared_model(row: str, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base = kbitprep.prepare(_load(row))
    ids = learnable_ids()
    requested = SFTConfig(**training_kwargs(tmp_path))
    assert requested.gradient_checkpointing is True  # TRL's default
    args = training_arguments_for(base, requested)
    assert args.gradient_checkpointing is False

    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        processing_class=tiny_tokenizer(),
        peft_config=lora_config(),
    )
    model = trainer.model
    before_loss, before = full_loss(model, ids), adapter_state(model)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _check_trained(model, before_loss, before, ids, logged)
    _check_checkpointing(model, base)


def test_upstream_trainer_reenables_checkpointing(tmp_path: Path) -> None:
    """Why training_arguments_for exists: without it, Trainer (transformers 5.24) enables checkpointing a
    second time, replaces kbitprep's use_reentrant=True with False and stacks a second input-grads hook.
    If this starts failing, transformers changed that behaviour: revisit the docs (docs/training.md)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    base = kbitprep.prepare(_load("bnb-4bit"), checkpointing="reentrant")
    model = get_peft_model(base, lora_config())
    assert checkpointing_status(model).input_grads_hooks == 1
    ids = learnable_ids(1)
    args = TrainingArguments(**training_kwargs(tmp_path, gradient_checkpointing=True, max_steps=1))
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})).train()
    status = checkpointing_status(model)
    assert status.input_grads_hooks == 2
    assert status.use_reentrant is False


# --------------------------------------------------------------------------- the helper itself


def _prepared_tiny(**prepare_kwargs: Any) -> torch.nn.Module:
    return kbitprep.prepare(tiny_llama(), **prepare_kwargs)


def test_training_arguments_for_aligns_a_copy(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = _prepared_tiny(checkpointing="non_reentrant")
    args = TrainingArguments(
        **training_kwargs(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointingConflictWarning)
        new = training_arguments_for(model, args)
    assert new is not args
    assert (new.gradient_checkpointing, new.activation_checkpointing) == (False, False)
    assert new.gradient_checkpointing_kwargs is None and new.activation_checkpointing_kwargs is None
    assert new.ddp_find_unused_parameters is False
    assert (args.gradient_checkpointing, args.ddp_find_unused_parameters) == (True, None)
    assert new.learning_rate == args.learning_rate and new.output_dir == args.output_dir


def test_training_arguments_for_keeps_explicit_find_unused(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = _prepared_tiny()
    args = TrainingArguments(**training_kwargs(tmp_path, ddp_find_unused_parameters=True))
    assert training_arguments_for(model, args).ddp_find_unused_parameters is True


def test_training_arguments_for_warns_on_conflicting_reentrant(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = _prepared_tiny(checkpointing="reentrant")
    args = TrainingArguments(
        **training_kwargs(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    )
    with pytest.warns(CheckpointingConflictWarning, match="use_reentrant=False.*kbitprep prepared reentrant"):
        new = training_arguments_for(model, args)
    assert new.gradient_checkpointing is False
    assert checkpointing_status(model).use_reentrant is True


def test_training_arguments_for_warns_on_ignored_kwargs(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = _prepared_tiny()
    args = TrainingArguments(
        **training_kwargs(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"offload": True})
    )
    with pytest.warns(CheckpointingConflictWarning, match="offload are ignored"):
        training_arguments_for(model, args)


def test_training_arguments_for_leaves_trainer_checkpointing_when_kbitprep_did_not(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = _prepared_tiny(checkpointing=False)
    args = TrainingArguments(**training_kwargs(tmp_path, gradient_checkpointing=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointingConflictWarning)
        new = training_arguments_for(model, args)
    assert new.gradient_checkpointing is True and new.ddp_find_unused_parameters is None
    assert not checkpointing_status(model).enabled


def test_training_arguments_for_refuses_bad_input(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(**training_kwargs(tmp_path))
    with pytest.raises(NotPreparedError, match="kbitprep.prepare"):
        training_arguments_for(tiny_llama(), args)
    with pytest.raises(InvalidPolicyError, match="TrainingArguments"):
        training_arguments_for(_prepared_tiny(), {"gradient_checkpointing": True})


def test_checkpointing_status_reads_the_model() -> None:
    model = tiny_llama()
    off = checkpointing_status(model)
    assert (off.enabled, off.layers, off.use_reentrant, off.input_grads_hooks) == (False, 0, None, 0)
    kbitprep.prepare(model, checkpointing="reentrant")
    on = checkpointing_status(model)
    assert on.enabled and on.consistent and on.use_reentrant is True and on.input_grads_hooks == 1
    assert on.layers >= 2  # both decoder layers (transformers also flags the LlamaModel)
    kbitprep.undo(model)
    assert checkpointing_status(model) == off
