"""``examples/qlora_end_to_end.py`` runs as a user runs it: a fresh process, offline, on the CPU, in under a minute."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "qlora_end_to_end.py"
#: The runtime the docs promise for the example (the whole process: imports, build, train, save, reload, generate).
LIMIT_S = 60


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("bitsandbytes", "peft", "trl", "datasets")),
    reason="the example needs bitsandbytes, peft, trl and datasets",
)
def test_qlora_example_runs_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    runtime = time.perf_counter() - start
    print(f"\nexamples/qlora_end_to_end.py: {runtime:.1f} s (exit {proc.returncode})\n{proc.stdout}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = proc.stdout
    assert re.search(r"^prepared: backend bnb-4bit, 0 parameters upcast, checkpointing reentrant$", out, re.M), out
    trained = re.search(r"^trained (\d+) steps: loss ([\d.]+) -> ([\d.]+)$", out, re.M)
    assert trained, out
    assert int(trained[1]) == 8 and float(trained[3]) < float(trained[2]), trained[0]

    # SFTTrainer's fused-head calls went through kbitprep's chunked head and offload (CPU)
    assert re.search(
        r"^memory modes: head calls chunked 0, fused_kbitprep 8, fused_trl 0; offload by kbitprep$", out, re.M
    ), out

    adapter = tmp_path / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter / name).is_file() and (adapter / name).stat().st_size > 0, name
    assert not list(adapter.glob("model*.safetensors")), "the base model was saved with the adapter"

    generated = re.search(r"^generated (\d+) tokens: '(.*)' -> '(.*)'$", out, re.M)
    assert generated and int(generated[1]) >= 1 and generated[3].strip(), out
    assert runtime < LIMIT_S, f"the example took {runtime:.1f} s (promised: under {LIMIT_S} s)"
