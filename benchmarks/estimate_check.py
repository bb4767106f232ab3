"""The estimate against real tracked training steps on the CPU: MoE, hybrid and every built-in scheme.

Runs the cases of ``tests/test_estimate_moe.py`` (and a few more rows) and prints, for each, the real
peak (``measure_step``), the simulated peak (``target="cpu"``) and the error. The tests hold each within
5%; this prints the numbers. Run from the repository root::

    .venv/bin/python benchmarks/estimate_check.py            # every case
    .venv/bin/python benchmarks/estimate_check.py --only moe # moe, hybrid or schemes
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases() -> list[tuple[str, str, Any]]:
    """(group, label, thunk returning (real, sim)) for every case."""
    from tests.test_estimate_moe import (
        SCHEME_CASES,
        _dense_config,
        _nf4,
        _scheme_loader,
        real_and_simulated,
        tiny_jamba_config,
    )
    from tests.tiny_configs import tiny_moe_config

    out: list[tuple[str, str, Any]] = []
    for family in ("qwen3_moe", "mixtral", "olmoe"):
        for variant in ("peft", "default", "chunked_head"):
            out.append(
                (
                    "moe",
                    f"{family} {variant}",
                    lambda f=family, v=variant: real_and_simulated(tiny_moe_config(f), "bnb-4bit", v, _nf4()),
                )
            )
    out.append(
        (
            "moe",
            "qwen3_moe default, router aux loss",
            lambda: real_and_simulated(
                tiny_moe_config("qwen3_moe", output_router_logits=True), "bnb-4bit", "default", _nf4()
            ),
        )
    )
    for family in ("qwen3_moe", "mixtral"):
        out.append(
            (
                "moe",
                f"{family} default, expert adapters",
                lambda f=family: real_and_simulated(tiny_moe_config(f), "bnb-4bit", "default", _nf4(), experts=True),
            )
        )
    for variant in ("peft", "default"):
        out.append(
            (
                "hybrid",
                f"jamba {variant} (dt_proj unquantized)",
                lambda v=variant: real_and_simulated(tiny_jamba_config(), "bnb-4bit", v, _nf4(skip=("dt_proj",))),
            )
        )
    for scheme in ("bnb-4bit", *SCHEME_CASES):
        for variant in ("peft", "default"):
            out.append(
                (
                    "schemes",
                    f"{scheme} {variant}",
                    lambda s=scheme, v=variant: real_and_simulated(
                        _dense_config(), s, v, _scheme_loader(s), kbitprep_targets=True
                    ),
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Print real peak, simulated peak and error of each case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["moe", "hybrid", "schemes"], help="one group of cases")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, label, run in cases():
            if args.only and group != args.only:
                continue
            real, sim = run()
            error = sim.peak_bytes / real - 1
            worst = max(worst, abs(error))
            print(f"{group:8} {label:42} real {real:>11,} B  estimate {sim.peak_bytes:>11,} B  error {error:+.2%}")
    print(f"largest error: {worst:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
