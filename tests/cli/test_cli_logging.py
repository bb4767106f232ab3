"""The CLI's -v / -vv / -q: kbitprep's log records on stderr on request, only the result with -q."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbitprep.app.cli import main

from ..tiny import saved_tiny_llama


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return saved_tiny_llama()


def test_vv_logs_the_backend_choice(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-vv", "plan", str(checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "kbitprep: DEBUG: backend 'unquantized' recognises LlamaForCausalLM" in err
    assert "kbitprep: DEBUG: selected unquantized for LlamaForCausalLM" in err


def test_without_v_nothing_is_logged(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(checkpoint)]) == 0
    assert "DEBUG" not in capsys.readouterr().err


def test_v_after_the_command_works_too(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(checkpoint), "-vv"]) == 0
    assert "selected unquantized" in capsys.readouterr().err


def test_q_prints_no_kbitprep_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bitsandbytes config under which transformers converts no Falcon layer: the plan warns, -q keeps quiet."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)
    FalconForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--quantization", "bnb-4bit"]) == 0
    loud = capsys.readouterr().err
    assert "kbitprep: warning: this model was loaded with a bitsandbytes 4-bit quantization config" in loud
    assert main(["-q", "plan", str(tmp_path), "--quantization", "bnb-4bit"]) == 0
    assert "warning" not in capsys.readouterr().err
