"""The "kbitprep" logger: silent by default, INFO says what prepare did and why, DEBUG diagnoses."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import kbitprep

from ..tiny import tiny_llama


def test_prepare_and_undo_log_at_info_with_the_backend_and_steps(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="kbitprep"):
        kbitprep.prepare(model)
        kbitprep.undo(model)
    infos = [r for r in caplog.records if r.levelno == logging.INFO and r.name.startswith("kbitprep")]
    assert any("prepared LlamaForCausalLM with backend unquantized" in r.getMessage() for r in infos)
    assert any("froze 21 parameters" in r.getMessage() for r in infos)
    assert any(r.getMessage().startswith("undid prepare of LlamaForCausalLM") for r in infos)


def test_debug_explains_the_backend_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kbitprep"):
        kbitprep.plan(tiny_llama())
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("kbitprep")]
    assert any(m.startswith("backend 'unquantized' recognises LlamaForCausalLM") for m in msgs)
    assert any(m.startswith("selected unquantized for LlamaForCausalLM") for m in msgs)


def test_failed_prepare_logs_the_revert(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step failing inside prepare's transaction: the revert is logged at INFO, no "prepared" record."""
    from kbitprep import _mutation

    def boom(model: object, plan: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(_mutation, "apply_memory_modes", boom)
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="kbitprep"), pytest.raises(RuntimeError, match="boom"):
        kbitprep.prepare(model, upcast="all")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("kbitprep")]
    assert any(m.startswith("prepare of LlamaForCausalLM failed (RuntimeError: boom); reverted") for m in messages), (
        messages
    )
    assert not any(m.startswith("prepared ") for m in messages)


def test_library_is_silent_by_default() -> None:
    code = (
        "import torch, kbitprep, logging; m = torch.nn.Sequential(torch.nn.Linear(4, 4)); kbitprep.prepare(m); "
        "kbitprep.undo(m); print('done')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "done"
    assert "kbitprep" not in out.stderr and "prepared" not in out.stderr, out.stderr
