"""``kbitprep estimate`` on every causal-LM model type transformers ships: estimated, refused, or raw.

For each model type of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` whose default config ``kbitprep plan
--config`` accepts, the default config is shrunk to 2 layers (``num_hidden_layers``, which each
family's ``attribute_map`` points at its own key, and the per-layer lists cut with it, as
``tests/test_plan_config_sweep.py`` shrinks them), then ``kbitprep.estimate(config, batch=1, seq=64)``
runs with every default row. Each type ends as ``ok`` (an estimate), ``refused``
(``UnsupportedModelError``), ``error`` (another ``KbitprepError``) or ``raw`` (anything else).

Commands::

    .venv/bin/python benchmarks/estimate_sweep.py                   # every type; counts and refusals
    .venv/bin/python benchmarks/estimate_sweep.py --types mixtral,jamba --verbose
    .venv/bin/python benchmarks/estimate_sweep.py --out benchmarks/results/estimate-sweep.json

A type that runs longer than ``--timeout`` seconds (default 300) is recorded as ``raw`` (timeout).
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

LAYERS = 2
#: The mixture-of-experts families issue 19 names: none of them may be refused.
MOE_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_5_moe",
    "qwen3_next",
    "deepseek_v2",
    "deepseek_v4",
    "glm4_moe",
    "gpt_oss",
    "llama4",
    "minimax",
    "olmoe",
    "phimoe",
    "granitemoe",
    "ernie4_5_moe",
)
#: The state-space and hybrid families it names.
HYBRID_FAMILIES = ("mamba", "mamba2", "falcon_h1", "nemotron_h", "zamba2", "jamba")


def shrink(config: Any, layers: int = LAYERS) -> Any:
    """A copy of ``config`` with ``layers`` layers in its text config (the estimate's own cut)."""
    from kbitprep._anatomy import text_config
    from kbitprep.app.estimate import truncated_config

    if int(getattr(text_config(config), "num_hidden_layers", 0) or 0) > layers:
        return truncated_config(config, layers)
    return copy.deepcopy(config)


class _Timeout(BaseException):  # not an Exception: estimate() must not turn it into a refusal
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def sweep_one(model_type: str, timeout: float) -> tuple[str, str, float]:
    """(outcome, message, seconds) of one model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import kbitprep
    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.errors import KbitprepError, UnsupportedModelError

    started = time.perf_counter()
    try:
        config = shrink(CONFIG_MAPPING[model_type]())
    except Exception as exc:
        return "skip", f"no default config: {type(exc).__name__}: {exc}", 0.0
    try:
        plan_from_config(config, "bnb-4bit")
    except Exception as exc:
        return "skip", f"plan --config refuses it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}", 0.0
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        result = kbitprep.estimate(config, batch=1, seq=64)
    except _Timeout:
        return "raw", f"timeout after {timeout:.0f} s", time.perf_counter() - started
    except UnsupportedModelError as exc:
        return "refused", " ".join(str(exc).split())[:400], time.perf_counter() - started
    except KbitprepError as exc:
        return "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}", time.perf_counter() - started
    except Exception as exc:
        return "raw", f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}", time.perf_counter() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    peak = result.row("default").peak_bytes if any(r.variant == "default" for r in result.rows) else 0
    return "ok", f"default peak {peak} bytes", time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the counts and every type that is not ``ok``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per type (default 300)")
    parser.add_argument("--out", help="write the outcomes as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print every type as it finishes")
    args = parser.parse_args(argv)

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    outcomes: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt in types:
            kind, message, seconds = sweep_one(mt, args.timeout)
            outcomes[mt] = {"outcome": kind, "message": message, "seconds": round(seconds, 2)}
            if args.verbose:
                print(f"{kind:8} {mt:24} {seconds:6.1f} s  {message[:160]}", flush=True)
    counts = Counter(o["outcome"] for o in outcomes.values())
    planned = len(outcomes) - counts["skip"]
    print(
        f"{len(outcomes)} causal-LM types, {planned} planned: {counts['ok']} estimated, {counts['refused']} refused, "
        f"{counts['error']} other kbitprep errors, {counts['raw']} raw ({time.perf_counter() - started:.0f} s)"
    )
    for kind in ("refused", "error", "raw"):
        for mt, o in sorted(outcomes.items()):
            if o["outcome"] == kind:
                print(f"  {kind:7} {mt}: {o['message'][:240]}")
    for label, families in (("MoE", MOE_FAMILIES), ("hybrid", HYBRID_FAMILIES)):
        refused = [f for f in families if outcomes.get(f, {}).get("outcome") not in (None, "ok", "skip")]
        print(f"{label} families not estimated: {', '.join(refused) or 'none'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"counts": dict(counts), "outcomes": outcomes}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
