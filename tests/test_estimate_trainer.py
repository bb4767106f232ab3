"""The estimate follows the training stack (``trainer=``): TRL's trainers call ``fused_lm_head=True``.

On CUDA TRL's fused head serves those calls whatever kbitprep prepared (kbitprep._memory.trl_fused), so
the chunked head saves nothing there and every ``trl`` row runs TRL's head; on the CPU kbitprep's chunked
head serves them, so its rows keep their savings. The plain rows are unchanged.
"""

from __future__ import annotations

import pytest

import kbitprep
from kbitprep.errors import InvalidPolicyError

from .tiny import tiny_llama_config

pytest.importorskip("trl")
SHAPE = dict(vocab_size=4096, hidden_size=128, intermediate_size=256)


def _rows(trainer: str) -> dict[str, int]:
    est = kbitprep.estimate(tiny_llama_config(**SHAPE), batch=2, seq=256, trainer=trainer)
    return {r.variant: r.peak_bytes for r in est.rows}


def test_trl_rows_follow_trls_head_on_cuda() -> None:
    plain, trl = _rows("plain"), _rows("trl")
    assert plain["chunked_head"] < plain["default"]  # the plain loop: kbitprep's chunked head saves
    assert trl["chunked_head"] == trl["default"]  # under TRL on CUDA, TRL's head serves every row
    assert trl["default"] != plain["default"]  # ... and the rows are not the plain loop's
    est = kbitprep.estimate(tiny_llama_config(**SHAPE), batch=2, seq=256, trainer="trl", variants=["default"])
    assert any(n.startswith("trainer trl:") for n in est.notes)


def test_an_unknown_trainer_is_an_invalid_option() -> None:
    with pytest.raises(InvalidPolicyError, match="trainer"):
        kbitprep.estimate(tiny_llama_config(**SHAPE), batch=1, seq=16, trainer="axolotl")


def test_the_cli_takes_the_trainer(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    from pathlib import Path

    from kbitprep.app.cli import main

    path = Path(str(tmp_path)) / "config.json"
    tiny_llama_config(**SHAPE).to_json_file(path)
    assert main(["estimate", "--config", str(path), "--batch", "1", "--seq", "64", "--trainer", "trl"]) == 0
    assert "trainer trl:" in capsys.readouterr().out
