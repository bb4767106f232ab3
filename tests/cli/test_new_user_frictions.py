"""What a new user following the docs ran into (issue 20): units, noise, wording and ``plan -v``.

Hub ids (item 5) are in ``test_hub_ids.py``; the exception classes (items 1 and 2) in
``tests/core/test_errors.py``; ``patch_peft``'s early validation (item 3) in
``tests/integrations/test_patch_peft.py``; the pages that must run in order (item 4) are run by
``tests/test_doc_blocks.py``, and ``cli.md``'s error examples are checked here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import kbitprep
from kbitprep.app.cli import main
from kbitprep.app.estimate import Estimate, EstimateRow, format_gpu_memory, parse_bytes

from ..tiny import saved_tiny_llama, tiny_llama_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _config() -> LlamaConfig:
    """The tests' tiny Llama config (its dtype unset, as many hub configs read back)."""
    return tiny_llama_config()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _records(name: str, level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches logger ``name``'s handlers, at ``level`` and above."""
    logger = logging.getLogger(name)
    handler = _Records()
    handler.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- item 6: units


def test_gpu_memory_is_shown_in_both_units() -> None:
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("24GiB") == 24 * 2**30
    assert format_gpu_memory(24 * 10**9) == "24 GB = 22.35 GiB"
    row = EstimateRow("default", 10**9, {"weights": 10**9}, 0, "none", "reentrant", {}, fits=True, max_batch=1)
    est = Estimate(
        "Llama", "bnb-4bit", "bfloat16", 1, 16, 16, 32, "all-linear", "adamw", 2, (2,), 0, 24 * 10**9, (row,), 0.1
    )
    assert re.search(r"^fits 24 GB = 22\.35 GiB +yes$", est.render(), re.M), est.render()


def test_gpu_memory_help_says_which_unit_is_which(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "24GiB is 24 x 2^30 bytes (a card sold as 24GB has that), 24GB is 24 x 10^9 bytes" in text


# --------------------------------------------------------------------------- item 7: noise


def test_estimate_is_quiet(recwarn: pytest.WarningsRecorder) -> None:
    """No transformers notice (`torch_dtype` is deprecated, use_cache=True with checkpointing) and no warning."""
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None and hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # transformers says each notice once per process: let it say it again
    with _records("transformers", logging.WARNING) as records:
        kbitprep.estimate(_config(), batch=1, seq=16, variants=["peft", "default"])
    assert [r.getMessage() for r in records] == []
    assert [str(w.message) for w in recwarn] == []


def test_the_config_dtype_is_read_without_the_deprecated_alias() -> None:
    from kbitprep.app.metaplan import config_dtype

    class Spy(LlamaConfig):
        reads = 0

        @property
        def torch_dtype(self) -> object:  # transformers 5: a deprecated alias that warns when read
            Spy.reads += 1
            return self.dtype

    assert config_dtype(Spy()) is torch.bfloat16 and Spy.reads == 0


def test_a_refused_config_prints_no_fake_tensor_log(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A model whose code fails on fake tensors (here a kernel whose meta function rejects its inputs, as
    the grouped expert matmul of mixture-of-experts layers did) is refused with one clean
    UnsupportedModelError; torch logs the meta function's traceback first unless the estimate quiets it."""
    from transformers.models.llama import modeling_llama

    def bad_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        wider = x.new_zeros(*x.shape[:-1], x.shape[-1] + 1)
        return torch.cat([x, wider], dim=1)  # sizes differ in the last dimension: the meta kernel raises

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", bad_forward)
    refused = pytest.raises(kbitprep.UnsupportedModelError, match="cannot simulate a training step of this llama")
    with _records("torch._subclasses.fake_tensor") as records, refused:
        kbitprep.estimate(_config(), batch=1, seq=16, variants=["default"])
    assert records == []
    err = capfd.readouterr().err
    assert "failed while attempting to run meta" not in err and "Traceback" not in err, err[-2000:]


# --------------------------------------------------------------------------- item 9: wording and plan -v


def test_plan_says_how_much_less_than_peft(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(saved_tiny_llama()), "--quantization", "bnb-4bit"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("kbitprep keeps"))
    assert re.fullmatch(r"kbitprep keeps [\d.]+ \w?i?B less \(\d+\.\d% less than PEFT's\)", line), line


def test_plan_v_logs_what_the_plan_decided(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "plan", str(saved_tiny_llama())]) == 0
    err = capsys.readouterr().err
    info = [x for x in err.splitlines() if x.startswith("kbitprep: INFO: ")]
    assert any(
        re.match(r"kbitprep: INFO: plan for LlamaForCausalLM \(checkpoint .+\): backend unquantized; ", x)
        and "upcast policy none (0 parameters to fp32); checkpointing reentrant (backend default)" in x
        for x in info
    ), err
    assert any("parameter bytes after prepare: kbitprep " in x for x in info), err
    assert "DEBUG" not in err


# --------------------------------------------------------------------------- item 4: cli.md's error examples


def _cli_error_examples() -> list[tuple[str, str]]:
    """(command, the error line cli.md shows for it) of the error examples that run on this machine."""
    page = (DOCS / "cli.md").read_text()
    block = re.search(r"without a traceback \(`--debug` shows it\):\n\n```console\n(.*?)```", page, re.S)
    assert block, "cli.md lost its error examples"
    lines = block.group(1).splitlines()
    pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    assert all(cmd.startswith("$ kbitprep ") for cmd, _ in pairs), pairs
    return [(cmd.removeprefix("$ "), shown) for cmd, shown in pairs if "#" not in cmd]  # "# with hqq not installed"


def test_cli_error_examples_print_what_the_page_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a folder where cli.md's own python block made the files its examples use."""
    from ..test_doc_blocks import _run_python, read_blocks

    makers = [b for b in read_blocks("cli.md") if b.lang == "python" and "broken.json" in b.source]
    assert makers, "cli.md makes no broken.json for its error examples"
    monkeypatch.chdir(tmp_path)
    _run_python(makers[0], {"__name__": "__main__"})
    examples = _cli_error_examples()
    assert len(examples) >= 4
    for command, shown in examples:
        code = main(shlex.split(command)[1:])
        err = capsys.readouterr().err.strip()
        assert code in (1, 2), (command, code)
        assert err == shown, f"{command}\n  page: {shown}\n  real: {err}"


def test_cli_page_config_plan_is_what_the_command_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """cli.md's `kbitprep plan --config llama-3-70b.json` block, run on the config the page makes, prints its sample."""
    from ..test_doc_blocks import _run_python, read_blocks

    blocks = read_blocks("cli.md")
    maker = next(b for b in blocks if b.lang == "python" and "llama-3-70b.json" in b.source)
    command = next(b for b in blocks if b.lang == "bash" and "plan --config llama-3-70b.json" in b.source)
    sample = next(b for b in blocks if b.lang == "text" and "planned from llama-3-70b.json" in b.source)
    assert maker.line < command.line < sample.line  # in the order a reader follows them
    monkeypatch.chdir(tmp_path)
    _run_python(maker, {"__name__": "__main__"})
    capsys.readouterr()
    assert main(shlex.split(command.source.strip())[1:]) == 0
    assert capsys.readouterr().out.strip().splitlines() == sample.source.strip().splitlines()
