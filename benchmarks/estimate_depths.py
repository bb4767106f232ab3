"""The estimate's depth extrapolation against simulating every layer, on models whose layers differ.

For each shape (the family's default config, cut to 10-12 layers so that simulating every layer stays
quick), prints the error of the default estimate (two depths, chosen by the layers' repeating part) and
of the former choice (always 1 and 2 layers) against ``exact=True``, per row, and the time of each.
Run from the repository root::

    .venv/bin/python benchmarks/estimate_depths.py [model_type ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: model type -> config overrides (realistic widths; depth cut so that the exact simulation is quick).
SHAPES: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"num_hidden_layers": 10, "first_k_dense_replace": 3},
    "glm4_moe": {"num_hidden_layers": 10},
    "qwen3_next": {"num_hidden_layers": 12},
    "gemma2": {"num_hidden_layers": 12},
    "qwen3_moe": {
        "num_hidden_layers": 12,
        "hidden_size": 2048,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
    },
}


def main() -> int:
    """Print one line per shape."""
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import AutoConfig

    import kbitprep
    from kbitprep.app import estimate as est

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    chosen = est._fit_depths
    for model_type in args.model_types:
        config = AutoConfig.for_model(model_type, **SHAPES[model_type])
        kw: dict[str, Any] = {"batch": 2, "seq": 512, "variants": ["peft", "default", "chunked_head"]}
        new = kbitprep.estimate(config, **kw)
        est._fit_depths = lambda c, d, n: ((1, 2), "")  # type: ignore[assignment]
        try:
            old = kbitprep.estimate(config, **kw)
        finally:
            est._fit_depths = chosen
        exact = kbitprep.estimate(config, exact=True, **kw)

        def errors(e: Any, exact: Any = exact) -> str:
            return " ".join(f"{r.peak_bytes / x.peak_bytes - 1:+.2%}" for r, x in zip(e.rows, exact.rows, strict=True))

        print(
            f"{model_type:12} {config.num_hidden_layers} layers; simulated {new.simulated_layers}: {errors(new)} "
            f"({new.seconds:.1f} s) | 1 and 2: {errors(old)} ({old.seconds:.1f} s) | "
            f"every layer: {exact.seconds:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
