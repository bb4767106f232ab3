"""Concurrency: one registry shared by threads; discovery once; results identical to sequential runs."""

from __future__ import annotations

import importlib.metadata
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep import Registry

from ..state import model_state
from ..tiny import tiny_llama
from .support import assert_restored, full_state, recorded_warnings

THREADS = 8


def _run_together(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` in threads released together by a barrier; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = jobs[i]()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def _slow_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading entry points take a while, so threads arriving together really overlap in discovery."""
    real = importlib.metadata.entry_points

    def slow(**kwargs: Any) -> Any:
        time.sleep(0.2)
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", slow)


def test_discovery_runs_once_when_threads_trigger_first_use_together(monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_entry_points(monkeypatch)
    with recorded_warnings():
        reg = Registry(strict=False)
        assert reg.discovery_count == 0  # nothing read at construction
        models = [nn.Sequential(nn.Linear(4, 4, dtype=torch.bfloat16)) for _ in range(THREADS)]
        jobs: list[Callable[[], Any]] = [reg.names, reg.failures, lambda: reg.get("unquantized").name]
        jobs += [lambda m=m: kbitprep.plan(m, registry=reg).backend for m in models[len(jobs) :]]
        results = _run_together(jobs)
    assert reg.discovery_count == 1
    assert results[2] == "unquantized" and all(r == "unquantized" for r in results[3:])
    assert results[0] == reg.names() and [str(f) for f in results[1]] == [str(f) for f in reg.failures()]


def _pair() -> tuple[nn.Module, nn.Module]:
    """Two different models: a bf16 Llama, and an fp16 Llama with tied embeddings, some weights frozen."""
    a = tiny_llama(torch.bfloat16, seed=11)
    b = tiny_llama(torch.float16, seed=12, tie_word_embeddings=True, num_hidden_layers=3)
    b.model.layers[1].requires_grad_(False)
    return a, b


OPTIONS: tuple[dict[str, Any], dict[str, Any]] = (
    {"upcast": "norms", "checkpointing": "reentrant"},
    {"upcast": "all", "checkpointing": "non_reentrant"},
)


def _prepare(model: nn.Module, reg: Registry, options: dict[str, Any]) -> dict[str, Any]:
    plan = kbitprep.plan(model, registry=reg, **options)
    kbitprep.prepare(model, registry=reg, **options)
    prepared = model_state(model)
    report = kbitprep.report(model)
    kbitprep.undo(model)
    return {"plan": plan.to_dict(), "state": prepared, "steps": report.steps, "undone": model_state(model)}


def test_two_threads_prepare_two_models_like_sequential_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    with recorded_warnings():
        sequential_reg = Registry(strict=False)
        a, b = _pair()
        expected = [_prepare(a, sequential_reg, OPTIONS[0]), _prepare(b, sequential_reg, OPTIONS[1])]
        assert expected[0]["state"] != expected[1]["state"]  # two really different preparations

        _slow_entry_points(monkeypatch)
        reg = Registry(strict=False)  # first used by the two threads at once
        for round_ in range(3):
            a, b = _pair()
            before = [full_state(a), full_state(b)]
            jobs = [lambda m=m, o=o: _prepare(m, reg, o) for m, o in zip((a, b), OPTIONS)]  # type: ignore[misc]
            results = _run_together(jobs)
            assert results == expected, f"round {round_}"
            assert_restored(a, before[0], "undo in a thread")
            assert_restored(b, before[1], "undo in a thread")
    assert reg.discovery_count == 1
