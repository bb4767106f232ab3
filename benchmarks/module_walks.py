"""Walks of the module tree during one ``kbitprep.plan``: how many, and who makes them.

A walk is one call of the root module's ``named_modules`` (directly, or through ``modules()``,
``parameters()``, ``named_buffers()`` ..., which torch builds on it), counted with
:func:`kbitprep.testing.count_module_walks` on a tiny Llama (2 layers) saved and reloaded with the
bitsandbytes NF4 config, and on the same model unquantized. The registry is every installed backend
(the built-ins), loaded before counting; one plan is made first to warm up.

Usage::

    python benchmarks/module_walks.py            # both models, each walk's caller
    python benchmarks/module_walks.py --models bnb-4bit
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kbitprep
from kbitprep.testing import count_module_walks, tiny_causal_lm

#: The callers that are the backends' detectors and declarations, and the contract helpers they use.
PLUGIN_SIDE = ("kbitprep_plugins", "kbitprep.plugin", "kbitprep._registry")


def _bnb_4bit(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    float_model: Any = tiny_causal_lm()  # a transformers model: it has save_pretrained
    float_model.save_pretrained(folder)
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model: nn.Module = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, dtype=torch.bfloat16)
    return model


def measure(model: nn.Module) -> str:
    """One warm-up plan, then the walks of one counted plan, as text."""
    kbitprep.default_registry().names()  # discovery (entry points) is not part of a plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kbitprep.plan(model)
        with count_module_walks(model) as walks:
            the_plan = kbitprep.plan(model)
    plugin_side = walks.count(*PLUGIN_SIDE)
    return (
        f"backend {the_plan.backend}: {walks.total} walks per plan "
        f"({plugin_side} by the backends and the contract helpers, {walks.total - plugin_side} by the core)\n"
        + "\n".join(str(walks).splitlines()[1:])
    )


def main(argv: list[str] | None = None) -> int:
    """Print the walks per plan of each model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bnb-4bit,unquantized", help="comma-separated: bnb-4bit, unquantized")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kbitprep-walks-") as tmp:
        builders = {"bnb-4bit": lambda: _bnb_4bit(Path(tmp) / "tiny-llama"), "unquantized": tiny_causal_lm}
        for name in args.models.split(","):
            print(f"== {name}")
            print(measure(builders[name]()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
