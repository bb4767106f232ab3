"""Small traps with an exact behaviour each (issue 17 item 5, issue 20 item 8).

* ``undo`` of a ``copy.deepcopy`` of a prepared model undoes the copy exactly and leaves the original prepared.
* The ``use_cache=False`` prepare sets stays out of checkpoints saved after prepare (the model's own
  ``save_pretrained`` and a merged PEFT model's); undo removes the guard.
* ``prepare(verify=...)`` takes a bool; after ``verify=True`` the report shows the check's result.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import kbitprep
from kbitprep.errors import InvalidPolicyError, NotPreparedError

from ..state import model_state
from ..tiny import batch, tiny_llama


@pytest.mark.parametrize("memory", [None, "lowest"])
def test_undo_of_a_deep_copy_undoes_the_copy_exactly(memory: str | None) -> None:
    fresh = model_state(tiny_llama())
    model = kbitprep.prepare(tiny_llama(), memory=memory)
    prepared = model_state(model)
    clone = copy.deepcopy(model)
    kbitprep.undo(clone)
    assert model_state(clone) == fresh
    assert "forward" not in vars(clone) and not clone.model.gradient_checkpointing
    with pytest.raises(NotPreparedError):
        kbitprep.report(clone)
    assert model_state(model) == prepared  # the original is untouched: still prepared
    assert kbitprep.report(model).plan.backend == "unquantized"
    out = clone(**batch())
    assert out.logits is not None


def _read_use_cache(path: Path) -> object:
    return json.loads((path / "config.json").read_text())["use_cache"]


def test_checkpoints_saved_after_prepare_keep_the_loaded_use_cache(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = kbitprep.prepare(tiny_llama())
    assert model.config.use_cache is False  # off for training
    model.save_pretrained(tmp_path / "prepared")
    assert _read_use_cache(tmp_path / "prepared") is True
    assert model.config.use_cache is False  # and still off after the save

    merged = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert _read_use_cache(tmp_path / "merged") is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded(**batch()).past_key_values is not None  # a plain forward returns its cache again

    kbitprep.undo(model)
    assert not any("save_pretrained" in vars(m) for m in model.modules())


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_verify_takes_a_bool(value: object) -> None:
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(InvalidPolicyError, match="verify"):
        kbitprep.prepare(model, verify=value)  # type: ignore[arg-type]
    assert model_state(model) == before


def test_the_report_shows_the_gradient_flow_check_after_verify() -> None:
    model = kbitprep.prepare(tiny_llama(), verify=True)
    text = str(kbitprep.report(model))
    assert "gradient flow  : passed - " in text and "trainable parameters got a gradient" in text
    assert kbitprep.report(model).to_dict()["gradient_flow"].startswith("passed")
    assert "gradient flow: passed" in kbitprep.report(model)._repr_html_()
    plain = kbitprep.prepare(tiny_llama())
    assert "gradient flow" not in str(kbitprep.report(plain))
