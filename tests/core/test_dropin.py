"""kbitprep.prepare_model_for_kbit_training against PEFT's function (the oracle)."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import kbitprep

from ..tiny import tiny_llama


def test_signature_matches_peft() -> None:
    from peft import prepare_model_for_kbit_training as peft_fn

    ours = inspect.signature(kbitprep.prepare_model_for_kbit_training).parameters
    theirs = inspect.signature(peft_fn).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


def test_kbitprep_does_not_import_peft_at_run_time() -> None:
    import subprocess
    import sys

    code = "import sys, kbitprep, torch; m=torch.nn.Linear(2,2); kbitprep.prepare(m); print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-1000:]


def _compare(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert {n: (p.dtype, p.requires_grad) for n, p in a.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in b.named_parameters()
    }
    assert {n: getattr(m, "gradient_checkpointing", None) for n, m in a.named_modules()} == {
        n: getattr(m, "gradient_checkpointing", None) for n, m in b.named_modules()
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("use_gc", [True, False])
def test_parity_on_unquantized(dtype: torch.dtype, use_gc: bool) -> None:
    from peft import prepare_model_for_kbit_training as peft_fn

    theirs = tiny_llama(dtype)
    ours = copy.deepcopy(theirs)
    peft_fn(theirs, use_gradient_checkpointing=use_gc)
    kbitprep.prepare_model_for_kbit_training(ours, use_gradient_checkpointing=use_gc)
    _compare(theirs, ours)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_parity_with_kbit_flags_and_checkpointing_kwargs(kwargs: dict[str, bool] | None) -> None:
    """A model flagged the way PEFT checks for k-bit (is_loaded_in_8bit) gets checkpointing from both."""
    from peft import prepare_model_for_kbit_training as peft_fn

    theirs = tiny_llama()
    theirs.is_loaded_in_8bit = True
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_fn(theirs, gradient_checkpointing_kwargs=kwargs)
    kbitprep.prepare_model_for_kbit_training(ours, gradient_checkpointing_kwargs=kwargs)
    _compare(theirs, ours)
    reentrant = (kwargs or {}).get("use_reentrant", True)
    assert ours.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant
    emb_t, emb_o = theirs.get_input_embeddings(), ours.get_input_embeddings()
    assert bool(emb_t._forward_hooks) == bool(emb_o._forward_hooks)
    assert len(emb_o._forward_hooks) == 1  # PEFT + transformers 5 leave two identical hooks; we never stack


def test_dropin_can_be_undone_and_called_twice() -> None:
    model = tiny_llama()
    ref = [p.detach().clone() for p in model.parameters()]
    kbitprep.prepare_model_for_kbit_training(model)
    with pytest.warns(kbitprep.AlreadyPreparedWarning):
        kbitprep.prepare_model_for_kbit_training(model)
    kbitprep.undo(model)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(model.parameters(), ref))
