"""``benchmarks/bench.py --quick`` end to end: structure and deterministic figures, never timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import kbitprep

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"
QUICK_VARIANTS = ("peft", "default", "chunked-head", "lowest")
QUICK_BACKENDS = {"bnb-nf4": "bnb-4bit", "torchao-int8": "torchao"}  # benchmark backend -> kbitprep plugin


def check_quick_results(result: dict[str, Any], steps: int) -> None:
    """Everything the quick run must show; reusable on any ``cpu-quick.json``."""
    meta = result["meta"]
    assert meta["mode"] == "cpu-quick" and meta["device"] == "cpu"
    for key in ("date", "machine", "command", "versions", "batch", "seq", "steps", "peak"):
        assert meta[key], key
    assert meta["steps"] == steps
    assert set(result["models"]) == {"tiny"} and result["models"]["tiny"]["params"] > 0
    expected = {f"tiny/{b}/{v}" for b in QUICK_BACKENDS for v in QUICK_VARIANTS}
    assert set(result["runs"]) == expected
    for key, run in result["runs"].items():
        assert run["error"] is None, f"{key}: {run['error']}\n{run.get('traceback', '')}"
        assert len(run["losses"]) == steps and all(math.isfinite(x) for x in run["losses"]), key
        for field in ("param_bytes_before", "param_bytes_after", "peak_bytes", "step_s_median", "prepare_s"):
            assert run[field] > 0, (key, field)
        assert run["peak_reset"] is True  # the peak is the training peak, not the load
        vs = run["vs_peft"]
        assert set(vs) == {"param_bytes_after", "peak_bytes", "step_s_median", "prepare_s", "loss"}
        assert all(vs[k] > 0 for k in ("param_bytes_after", "peak_bytes", "step_s_median", "prepare_s"))
        assert run["lora_params"] == result["runs"][f"tiny/{run['backend']}/peft"]["lora_params"] > 0
    for backend, plugin in QUICK_BACKENDS.items():
        runs = {v: result["runs"][f"tiny/{backend}/{v}"] for v in QUICK_VARIANTS}
        peft_run = runs["peft"]
        assert peft_run["vs_peft"]["param_bytes_after"] == 1.0
        assert peft_run["vs_peft"]["loss"]["max_abs"] == 0.0
        for v in ("default", "chunked-head", "lowest"):
            # the default never holds more parameter bytes than PEFT's function
            assert runs[v]["param_bytes_after"] <= peft_run["param_bytes_after"], (backend, v)
            assert runs[v]["param_bytes_after"] == runs["default"]["param_bytes_after"]
            assert runs[v]["kbitprep"]["backend"] == plugin and not runs[v]["kbitprep"]["forced"]
            # same data and seeds: the losses follow PEFT's (bf16 vs PEFT's fp32 copies: small differences)
            assert runs[v]["vs_peft"]["loss"]["max_rel"] < 1e-2, (backend, v)
        # the chunked head computes the same loss as the plain head (identical weights, data, seeds)
        for v in ("chunked-head", "lowest"):
            diff = runs[v]["loss_vs_default"]
            assert diff["first_abs"] <= 1e-4 * abs(runs["default"]["losses"][0]), (backend, v, diff)
            assert diff["max_rel"] <= 1e-3, (backend, v, diff)
            assert runs[v]["logits_none"] is True
        assert runs["default"]["logits_none"] is False and peft_run["logits_none"] is False
        assert runs["default"]["kbitprep"]["upcast_policy"] == "none"
        assert "float32" not in runs["default"]["param_dtypes"]
        lowest = runs["lowest"]["kbitprep"]
        assert lowest["checkpointing"] == "reentrant" and lowest["upcast_policy"] == "none"
        assert lowest["memory"]["preset"] == "lowest" and lowest["memory"]["chunked_head"] == 256
        assert lowest["memory"]["offload"] is True
        assert runs["lowest"]["memory_stats"]["packed"] > 0 and runs["lowest"]["memory_stats"]["offloaded"] == 0
    # bnb: PEFT's fp32 copies of embeddings, lm_head and norms are what kbitprep does not make
    bnb = {v: result["runs"][f"tiny/bnb-nf4/{v}"] for v in QUICK_VARIANTS}
    assert bnb["peft"]["param_dtypes"].get("float32", 0) > 0
    assert bnb["default"]["param_bytes_after"] < bnb["peft"]["param_bytes_after"]


@pytest.mark.slow
def test_quick_benchmark(tmp_path: Path) -> None:
    names = {b.name for b in kbitprep.backends()}
    missing = sorted(p for p in QUICK_BACKENDS.values() if p not in names)
    if missing:
        pytest.skip(f"backend plugin(s) {', '.join(missing)} not installed, so the benchmark cannot prepare with them")
    steps = 3
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--steps", str(steps), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu-quick.json").read_text())
    check_quick_results(result, steps)
    table = (tmp_path / "cpu-quick.md").read_text()
    assert "| variant | params after prepare | x PEFT |" in table
    for variant in QUICK_VARIANTS:
        assert table.count(f"| {variant} |") == len(QUICK_BACKENDS)
    assert "chunked-head vs default: max abs loss diff" in table


def test_cuda_mode_refuses_without_a_gpu_and_dry_runs(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--cuda", "--dry-run"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    one_b, eight_b = report["models"]["llama-3.2-1b"], report["models"]["llama-3.1-8b"]
    # the architectures' sizes; the nf4 figures match the H200 PEFT baseline (../shared/bench/) to a block
    assert one_b["params"] == 1_235_814_400 and eight_b["params"] == 8_030_261_248
    assert abs(eight_b["nf4_param_bytes_peft_upcast"] - 7_693_419_008) < 4096
    assert abs(eight_b["nf4_param_bytes_no_upcast"] - 5_591_540_224) < 4096
    assert len(report["children"]) == 2 * (5 + 4)  # 2 models x (5 plain-loop variants + 4 through TRL's fused head)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        run = subprocess.run(
            [sys.executable, str(BENCH), "--cuda", "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert run.returncode == 2 and "needs a GPU" in run.stderr
        assert not list(tmp_path.iterdir())
