"""The command line as users reported it (issue 11, items 8, 10, 11, 12): global flags before the
command, corrupt checkpoints, the ``--allow-mismatch`` hint, ``--checkpointing`` values that mean
what the API's mean, and output that holds kbitprep's words only.

Cheap checks call :func:`kbitprep.app.cli.main` in process; the noise checks run ``python -m kbitprep``
in subprocesses (a few at a time, started once), because library noise happens at import time.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import kbitprep
from kbitprep.app.cli import CHECKPOINTING_CHOICES, main

from .test_cli import Run, _env, _run, tiny_llama_checkpoint

NOISY_PLUGIN = '''
"""A backend plugin whose quantization library is noisy when imported, as gptqmodel is (a banner on
stdout), and which is noisy itself in every other way a library can be."""

import logging
import os
import warnings

import gptqmodel  # noqa: F401 - prints its banner

from kbitprep.plugin import Backend

print("noisy-plugin: print on stdout")
os.write(1, b"noisy-plugin: write to file descriptor 1\\n")
logging.getLogger("noisy_plugin").warning("noisy-plugin: a log record")
warnings.warn("noisy-plugin: a library warning", UserWarning)


class NoisyBackend(Backend):
    name = "noisy"
    priority = 1
    description = "claims nothing"

    def detect(self, model):
        return None

    def declare(self, model, detection):
        raise AssertionError("never detected")
'''
NOISE = ("GPT-QModel", "noisy-plugin", "Failed to load", "UserWarning", "FutureWarning", "warnings.warn")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama checkpoint, corrupt copies of it, a tiny Falcon, and a site with a noisy plugin."""
    from transformers import FalconConfig, FalconForCausalLM

    root = tmp_path_factory.mktemp("cli-reports")
    ckpt = tiny_llama_checkpoint(root)
    garbage, truncated = root / "garbage", root / "truncated"
    for bad in (garbage, truncated):
        shutil.copytree(ckpt, bad)
    weights = (ckpt / "model.safetensors").read_bytes()
    (garbage / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    falcon = root / "tiny-falcon"
    torch.manual_seed(0)
    FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)).to(
        torch.bfloat16
    ).save_pretrained(falcon)
    site = root / "noisy-site"
    info = site / "noisy_kbitprep_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "noisy_kbitprep_plugin.py").write_text(NOISY_PLUGIN.lstrip())
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: noisy-kbitprep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kbitprep.backends]\nnoisy = noisy_kbitprep_plugin:NoisyBackend\n")
    return {"ckpt": ckpt, "garbage": garbage, "truncated": truncated, "falcon": falcon, "noisy_site": site}


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> Run:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return Run(args, rc, out, err)


# --------------------------------------------------------------------------- item 11: global flags


def test_json_before_the_command_is_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    run = _in_process(capsys, "--json", "backends")
    assert run.returncode == 0, run.stderr
    data = run.json()  # one JSON document, not the table
    assert data["command"] == "backends" and {b["name"] for b in data["backends"]} >= {"bnb-4bit", "unquantized"}
    after = _in_process(capsys, "backends", "--json").json()
    assert [b["name"] for b in after["backends"]] == [b["name"] for b in data["backends"]]


def test_debug_before_the_command_is_honoured(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    missing = str(files["ckpt"] / "missing")
    for args in (("--debug", "plan", missing), ("plan", missing, "--debug"), ("--debug", "--json", "plan", missing)):
        run = _in_process(capsys, *args)
        assert run.returncode == 1, args
        assert "Traceback (most recent call last)" in run.stderr, args
        assert run.stderr.strip().splitlines()[-1].startswith("kbitprep: error: no such file or directory")
    quiet = _in_process(capsys, "plan", missing)
    assert "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1


# --------------------------------------------------------------------------- item 11: corrupt weights


@pytest.mark.parametrize("which", ["garbage", "truncated"])
def test_corrupt_safetensors_is_a_user_error(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], which: str
) -> None:
    for quantization in ("none", "bnb-4bit"):
        run = _in_process(capsys, "plan", str(files[which]), "--quantization", quantization)
        err = run.stderr.strip()
        assert run.returncode == 1, (quantization, run.stderr)
        assert "\n" not in err and "Traceback" not in run.stderr
        assert err.startswith(f"kbitprep: error: cannot load {files[which]} with quantization {quantization}: ")
        assert "SafetensorError" in err and "internal error" not in err


# --------------------------------------------------------------------------- items 10/11: --allow-mismatch


def test_backend_mismatch_hint_names_the_cli_flag(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    ckpt = str(files["ckpt"])
    refused = _in_process(capsys, "plan", ckpt, "--backend", "bnb-4bit")
    err = refused.stderr.strip()
    assert refused.returncode == 1 and "\n" not in err
    assert "backend 'bnb-4bit' does not recognise" in err
    assert "--allow-mismatch" in err and "Omit --backend" in err
    assert "allow_mismatch=True" not in err and "backend=" not in err, "API keywords the CLI does not have"

    forced = _in_process(capsys, "plan", ckpt, "--backend", "bnb-4bit", "--allow-mismatch", "--json")
    assert forced.returncode == 0, forced.stderr
    plan = forced.json()["plan"]
    assert plan["backend"] == "bnb-4bit" and plan["forced"] is True

    alone = _in_process(capsys, "plan", ckpt, "--allow-mismatch")
    assert alone.returncode == 1 and "--allow-mismatch applies to a backend chosen with --backend" in alone.stderr


# --------------------------------------------------------------------------- item 11: --checkpointing


#: CLI value -> the API values that mean the same (the bool and, where the API takes it, the word).
SAME_AS_API: dict[str, tuple[Any, ...]] = {
    "on": (True, "on"),
    "off": (False, "off"),
    "reentrant": ("reentrant",),
    "non_reentrant": ("non_reentrant",),
}


#: What each choice gives on an unquantized Llama (its backend's default mode is reentrant).
MODE = {"on": "reentrant", "off": "off", "reentrant": "reentrant", "non_reentrant": "non_reentrant"}


def test_checkpointing_choices_are_the_api_values(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    from kbitprep.app.demo import load_checkpoint

    assert set(CHECKPOINTING_CHOICES) == set(SAME_AS_API)
    model = load_checkpoint(files["ckpt"])
    for choice, api_values in SAME_AS_API.items():
        run = _in_process(capsys, "plan", str(files["ckpt"]), "--checkpointing", choice, "--json")
        assert run.returncode == 0, run.stderr
        cli = run.json()["plan"]
        assert cli["checkpointing"] == MODE[choice]
        for value in api_values:
            api = kbitprep.plan(model, checkpointing=value).to_dict(params=False)
            assert (cli["checkpointing"], cli["checkpointing_kwargs"]) == (
                api["checkpointing"],
                api["checkpointing_kwargs"],
            ), (choice, value)
    bad = _in_process(capsys, "plan", str(files["ckpt"]), "--checkpointing", "true")
    assert bad.returncode == 2 and "invalid choice: 'true'" in bad.stderr


# --------------------------------------------------------------------------- item 12: only kbitprep's words


def _commands(f: dict[str, Path]) -> dict[str, tuple[tuple[str, ...], dict[str, str]]]:
    noisy = _env(PYTHONPATH=str(f["noisy_site"]))
    return {
        "backends_json": (("--json", "backends"), noisy),
        "backends_debug": (("--debug", "backends"), noisy),
        "plan_bnb": (("plan", str(f["ckpt"]), "--quantization", "bnb-4bit"), noisy),
        "plan_falcon": (("plan", str(f["falcon"]), "--quantization", "bnb-4bit"), _env()),
        "demo": (("demo", "--steps", "2"), _env()),
    }


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, Callable[[], Run]]:
    """Start the subprocesses now, three at a time; each test waits for its own."""
    pytest.importorskip("gptqmodel")
    pool = ThreadPoolExecutor(max_workers=3)
    futures: dict[str, Future[Run]] = {n: pool.submit(_run, *c) for n, c in _commands(files).items()}
    pool.shutdown(wait=False)
    return {n: (lambda fut=fut: fut.result()) for n, fut in futures.items()}


def _stderr_lines(run: Run) -> list[str]:
    """Lines on stderr, progress-bar redraws (carriage returns) split apart, blanks dropped."""
    return [line for line in re.split(r"[\r\n]+", run.stderr) if line.strip()]


def _assert_only_kbitprep(run: Run, progress: str | None = None) -> None:
    assert run.returncode == 0, run.stderr
    for marker in NOISE:
        assert marker not in run.stdout, (marker, run.stdout[:2000])
    for line in _stderr_lines(run):
        ours = line.startswith("kbitprep: ") or (progress is not None and line.startswith(progress))
        assert ours, f"not kbitprep's output on stderr: {line!r}"


@pytest.mark.slow
def test_noisy_library_stays_silent_without_debug(runs: dict[str, Callable[[], Run]]) -> None:
    as_json = runs["backends_json"]()
    _assert_only_kbitprep(as_json)
    assert not _stderr_lines(as_json)
    noisy = {b["name"]: b for b in json.loads(as_json.stdout)["backends"]}["noisy"]  # stdout: one JSON document
    assert (noisy["distribution"], noisy["importable"]) == ("noisy-kbitprep-plugin", True)

    plan = runs["plan_bnb"]()  # imports bitsandbytes ("Failed to load CPU gemm_4bit_forward" on AVX512-BF16 CPUs)
    _assert_only_kbitprep(plan)
    assert not _stderr_lines(plan) and plan.stdout.startswith("kbitprep plan for ")


@pytest.mark.slow
def test_debug_shows_the_library_noise(runs: dict[str, Callable[[], Run]]) -> None:
    """The control: the noise is real, and --debug (only) lets it through."""
    run = runs["backends_debug"]()
    assert run.returncode == 0, run.stderr
    everything = run.stdout + run.stderr
    assert "GPT-QModel" in everything and "noisy-plugin: print on stdout" in everything
    assert "noisy-plugin: a log record" in everything  # (`backends` itself ignores warnings raised by plugins)


@pytest.mark.slow
def test_demo_prints_only_kbitprep_words(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["demo"]()
    _assert_only_kbitprep(run, progress="LoRA training")
    assert run.stdout.startswith("kbitprep demo: ") and "gradient flow  : passed" in run.stdout


@pytest.mark.slow
def test_a_kbitprep_warning_is_one_line_once(runs: dict[str, Callable[[], Run]]) -> None:
    """Item 8 through the CLI: the bnb config that converted no Falcon layer warns once, in kbitprep's words."""
    run = runs["plan_falcon"]()
    _assert_only_kbitprep(run)
    lines = _stderr_lines(run)
    assert len(lines) == 1, lines
    assert lines[0].startswith("kbitprep: warning: this model was loaded with a bitsandbytes 4-bit quantization config")
    assert "kbitprep: kbitprep:" not in lines[0] and "transformers converted no layer" in lines[0]
    assert "note: warning: this model was loaded with a bitsandbytes 4-bit" in run.stdout
    assert run.stdout.startswith("kbitprep plan for transformers.models.falcon")
