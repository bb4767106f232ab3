"""The guide's example plugin (``examples/kbitprep-example-plugin``), installed with pip, does what the guide says.

It is discovered through its ``kbitprep.backends`` entry point, chosen by priority over the
built-in ``bnb-4bit`` it specialises on a real bitsandbytes 4-bit model, and passes kbitprep's
shipped contract suite (its own tests, run with pytest in a subprocess as its author would).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kbitprep
from kbitprep.plugin import missing_packages

from .distributions import EXAMPLES, assert_contract_suite_passes, install, on_path
from .tiny import nf4_config, saved_tiny_llama

EXAMPLE = EXAMPLES / "kbitprep-example-plugin"
PLUGIN_FILE = EXAMPLE / "kbitprep_example_plugin" / "__init__.py"
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

pytestmark = pytest.mark.skipif(bool(missing_packages(["bitsandbytes"])), reason="not installed: bitsandbytes")


def _bnb_4bit() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = nf4_config()
    return AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.bfloat16), quantization_config=config, dtype=torch.bfloat16
    )


def test_the_guide_shows_the_plugin_and_its_packaging_verbatim() -> None:
    assert len(PLUGIN_FILE.read_text().splitlines()) < 50
    guide = GUIDE.read_text()
    for path in (PLUGIN_FILE, EXAMPLE / "pyproject.toml", EXAMPLE / "tests" / "test_contract.py"):
        include = f'--8<-- "{path.relative_to(EXAMPLES.parent).as_posix()}"'
        assert include in guide, f"docs/plugins.md does not include {include}"


def test_discovered_through_its_entry_point() -> None:
    site = install("kbitprep-example-plugin", where=EXAMPLES)
    with on_path(site), warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.PluginWarning)
        reg = kbitprep.Registry()
        info = reg.get("bnb-4bit-nonreentrant")
        assert (info.distribution, info.version) == ("kbitprep-example-plugin", "0.1.0")
        assert info.entry_point == "kbitprep_example_plugin:NonReentrantBnb4bitBackend"
        assert not info.builtin and not info.missing()
        assert not [f for f in reg.failures() if f.distribution == "kbitprep-example-plugin"]
        assert reg.get("bnb-4bit").builtin  # the built-in is still there, untouched
        assert reg.names().index("bnb-4bit-nonreentrant") < reg.names().index("bnb-4bit")


def test_chosen_by_priority_over_the_builtin_it_specialises() -> None:
    site = install("kbitprep-example-plugin", where=EXAMPLES)
    with on_path(site), warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.PluginWarning)
        reg = kbitprep.Registry()
        model = _bnb_4bit()
        ours, builtin = reg.get("bnb-4bit-nonreentrant"), reg.get("bnb-4bit")
        assert ours.backend.priority > builtin.backend.priority
        # both recognise the same Linear4bit modules on the same evidence ...
        found_ours, found_builtin = ours.backend.detect(model), builtin.backend.detect(model)
        assert found_ours is not None and found_builtin is not None
        assert found_ours.modules == found_builtin.modules and len(found_ours.modules) == 14
        # ... and the registry picks the specialisation alone: the built-in claims nothing new
        selection = reg.select(model)
        assert [i.name for i, _ in selection.detections] == ["bnb-4bit-nonreentrant"]

        plan = kbitprep.plan(model, registry=reg)
        assert (plan.backend, plan.distributions) == ("bnb-4bit-nonreentrant", ("kbitprep-example-plugin",))
        assert plan.checkpointing is kbitprep.CheckpointMode.NON_REENTRANT
        assert plan.checkpointing_kwargs == {"use_reentrant": False}
        base = kbitprep.plan(model, registry=reg, backend="bnb-4bit")
        assert base.checkpointing is kbitprep.CheckpointMode.REENTRANT
        # everything else is the built-in's: storage, upcast policy, fix-ups, evidence
        assert {p.name for p in plan.quantized} == {p.name for p in base.quantized} != set()
        assert (plan.upcast_policy, plan.byte_delta) == (base.upcast_policy, base.byte_delta) == ("none", 0)
        assert [f.name for f in plan.fixups] == [f.name for f in base.fixups]
        assert plan.evidence == base.evidence

        kbitprep.prepare(model, registry=reg)
        layer = model.model.layers[0]
        assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
        assert not [n for n, p in model.named_parameters() if p.requires_grad]
        kbitprep.undo(model)
        assert not layer.gradient_checkpointing


def test_passes_the_shipped_contract_suite() -> None:
    site = install("kbitprep-example-plugin", where=EXAMPLES)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *(p for p in sys.path if p)])
    assert_contract_suite_passes(EXAMPLE, env, own_tests=2)
