"""The FSDP dtype policy in one process: detection, the plan it gives, and the bnb 4-bit storage check."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kbitprep
from kbitprep import CheckpointingConflictWarning, FsdpWarning, detect_fsdp, training_arguments_for
from kbitprep._fsdp import FSDP_ENV_VARIABLES
from kbitprep.errors import InvalidPolicyError, UnsupportedModelError

from ..tiny import saved_tiny_llama, tiny_llama
from .common import load_bnb_4bit

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture(autouse=True)
def _no_fsdp_env() -> Iterator[None]:
    """Start without FSDP variables, and drop any a test (or TrainingArguments) set."""
    saved = dict(os.environ)
    for name in ("ACCELERATE_USE_FSDP", *FSDP_ENV_VARIABLES):
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("fsdp", "environ", "enabled", "version"),
    [
        (None, {}, False, None),
        (True, {}, True, None),
        (True, {"FSDP_VERSION": "2"}, True, 2),
        (1, {}, True, 1),
        (2, {"FSDP_VERSION": "1"}, True, 2),
        (False, {"ACCELERATE_USE_FSDP": "true"}, False, None),
        (None, {"ACCELERATE_USE_FSDP": "true"}, True, None),
        (None, {"ACCELERATE_USE_FSDP": "True", "FSDP_VERSION": "2"}, True, 2),
        (None, {"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}, False, None),
        (None, {"FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, True, None),
        (None, {"FSDP_VERSION": "7"}, True, None),
    ],
)
def test_detect_fsdp(fsdp: bool | int | None, environ: dict[str, str], enabled: bool, version: int | None) -> None:
    setting = detect_fsdp(fsdp, environ=environ)
    assert (setting.enabled, setting.version) == (enabled, version)
    assert setting.uniform_dtype is (enabled and version != 2)
    assert setting.source


def test_detect_fsdp_activation_checkpointing_and_bad_values() -> None:
    assert detect_fsdp(None, environ={"FSDP_ACTIVATION_CHECKPOINTING": "true"}).activation_checkpointing
    assert not detect_fsdp(True, environ={}).activation_checkpointing
    for bad in (3, "yes", 1.0):
        with pytest.raises(InvalidPolicyError, match="fsdp="):
            detect_fsdp(bad)  # type: ignore[arg-type]


def test_detect_fsdp_on_a_wrapped_model() -> None:
    from torch.distributed.fsdp import FSDPModule

    model = tiny_llama()
    assert not detect_fsdp(None, model=model).enabled
    # fully_shard needs a process group; a subclass of the FSDP2 marker class is what detection looks for
    model.model.layers[0].__class__ = type("ShardedLayer", (FSDPModule, type(model.model.layers[0])), {})
    setting = detect_fsdp(None, model=model)
    assert (setting.enabled, setting.version) == (True, 2) and "wrapped" in setting.source


# --------------------------------------------------------------------------- plans


def test_plan_under_fsdp_keeps_dtypes_and_prefers_non_reentrant(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    plain = kbitprep.plan(model, upcast="norms")
    assert plain.to_upcast and "fsdp" not in plain.extras
    fsdp = kbitprep.plan(model, fsdp=True)
    assert fsdp.upcast_policy == "none" and not fsdp.to_upcast
    assert fsdp.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
    assert "FSDP" in fsdp.checkpointing_note
    assert fsdp.extras["fsdp"]["dtypes"] == ["bfloat16"]
    assert any("no fp32 upcast" in n for n in fsdp.notes)
    assert fsdp.to_dict()["extras"]["fsdp"]["enabled"] is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    from_env = kbitprep.plan(model)
    assert from_env.extras["fsdp"]["source"] == "ACCELERATE_USE_FSDP=true" and not from_env.to_upcast
    assert "fsdp" not in kbitprep.plan(model, fsdp=False).extras


def test_explicit_upcast_under_fsdp1_is_refused_when_it_mixes_dtypes() -> None:
    model = tiny_llama()
    with pytest.raises(InvalidPolicyError, match="Must flatten tensors with uniform dtype"):
        kbitprep.plan(model, fsdp=1, upcast="norms")
    uniform = kbitprep.plan(model, fsdp=1, upcast="all")  # everything fp32: one dtype, FSDP1 accepts it
    assert uniform.extras["fsdp"]["dtypes"] == ["float32"]
    with pytest.warns(FsdpWarning, match="several dtypes"):
        mixed = kbitprep.plan(model, fsdp=2, upcast="norms")  # FSDP2 shards per parameter
    assert mixed.extras["fsdp"]["dtypes"] == ["bfloat16", "float32"]


def test_fsdp_activation_checkpointing_turns_kbitprep_checkpointing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    p = kbitprep.plan(model)
    assert p.checkpointing is kbitprep.CheckpointMode.OFF
    assert p.checkpointing_note == "FSDP applies its own activation checkpointing"
    with pytest.raises(InvalidPolicyError, match="FSDP_ACTIVATION_CHECKPOINTING"):
        kbitprep.plan(model, checkpointing="reentrant")


def test_drop_in_under_fsdp_notes_the_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = kbitprep.prepare_model_for_kbit_training(tiny_llama())
    plan = kbitprep.report(model).plan
    assert plan.upcast_policy == "peft" and plan.to_upcast  # PEFT's rules, unchanged
    assert any("kbitprep.prepare(model, fsdp=True)" in n for n in plan.notes)


# --------------------------------------------------------------------------- bitsandbytes 4-bit storage


@needs_bnb
def test_bnb_uint8_storage_is_refused_under_fsdp1_and_the_model_is_untouched() -> None:
    model = load_bnb_4bit(saved_tiny_llama(torch.bfloat16), torch.uint8)
    before = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=r"bnb_4bit_quant_storage=torch\.bfloat16"):
        kbitprep.prepare(model, fsdp=True)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before
    with pytest.raises(UnsupportedModelError, match="uint8"):
        kbitprep.plan(model, fsdp=1)
    with pytest.warns(FsdpWarning, match="FSDP2 shards per parameter"):
        p = kbitprep.plan(model, fsdp=2)
    assert p.extras["fsdp"]["bnb_4bit_quant_storage"] == "uint8"


@needs_bnb
def test_bnb_matching_storage_passes_and_upcast_is_refused() -> None:
    model = load_bnb_4bit(saved_tiny_llama(torch.bfloat16), torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FsdpWarning)
        p = kbitprep.plan(model, fsdp=1)
    assert (p.extras["fsdp"]["bnb_4bit_quant_storage"], p.extras["fsdp"]["bnb_4bit_compute_dtype"]) == (
        "bfloat16",
        "bfloat16",
    )
    assert p.extras["fsdp"]["dtypes"] == ["bfloat16"] and not p.to_upcast
    assert any("matches the other parameters" in n for n in p.notes)
    with pytest.raises(InvalidPolicyError, match="while the packed weights stay bfloat16"):
        kbitprep.plan(model, fsdp=1, upcast="norms")


@needs_bnb
def test_bnb_compute_dtype_mismatch_warns(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=qc, dtype=torch.bfloat16
    )
    with pytest.warns(FsdpWarning, match="bnb_4bit_compute_dtype=float32 differs"):
        p = kbitprep.plan(model, fsdp=1)
    assert p.extras["fsdp"]["bnb_4bit_compute_dtype"] == "float32"


# --------------------------------------------------------------------------- with TrainingArguments


def test_training_arguments_with_fsdp_warn_about_a_model_prepared_without_it(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    upcast = kbitprep.prepare(tiny_llama(), upcast="norms")
    ok = kbitprep.prepare(tiny_llama(), fsdp=True)
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, fsdp=True, fsdp_config={"version": 1}
    )
    # TrainingArguments(fsdp=...) exports FSDP_* variables: a prepare() after it detects FSDP by itself
    assert detect_fsdp().enabled
    with pytest.warns(CheckpointingConflictWarning, match=r"without kbitprep's FSDP policy \(\d+ parameters"):
        training_arguments_for(upcast, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointingConflictWarning)
        training_arguments_for(ok, args)


def test_fsdp_own_activation_checkpointing_in_arguments_warns(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model = kbitprep.prepare(tiny_llama(), fsdp=True)  # kbitprep checkpoints (non-reentrant)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        fsdp=True,
        fsdp_config={"version": 2, "activation_checkpointing": True},
    )
    with pytest.warns(CheckpointingConflictWarning, match="checkpointed twice"):
        training_arguments_for(model, args)
