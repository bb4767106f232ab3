"""The second example plugin (``examples/kbitprep-toyquant-plugin``), installed with pip, works end to end.

Its layer class, ``toyquant.ToyInt8Linear`` (int8 weight and per-row scale in *buffers*, defined in
``toyquant.layers`` and re-exported by ``toyquant``), is one PEFT does not know. The plugin is
discovered through its entry point, recognised by the re-exported class path, chosen by the
planner, given LoRA adapters through ``kbitprep.lora_config`` (its own LoRA layer, registered with
PEFT's custom-module mapping), trained, undone, planned from a bare config with its own scheme
through the CLI, and passes kbitprep's shipped contract suite (its own tests, run as its author
would).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.plugin import class_path, find_modules, missing_packages
from kbitprep.testing import model_state, tiny_causal_lm

from .distributions import EXAMPLES, assert_contract_suite_passes, install, on_path
from .tiny import batch, tiny_llama_config

DIST = "kbitprep-toyquant-plugin"
EXAMPLE = EXAMPLES / DIST
PLUGIN_FILE = EXAMPLE / "toyquant_kbitprep" / "__init__.py"
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
LAYERS = 14  # 7 linears in each of the tiny Llama's 2 decoder layers; lm_head stays nn.Linear

pytestmark = pytest.mark.skipif(bool(missing_packages(["peft"])), reason="not installed: peft")


@pytest.fixture(scope="module")
def site() -> Path:
    """The distribution, pip-installed (no deps, no network) into its own target directory."""
    return install(DIST, where=EXAMPLES)


@pytest.fixture
def installed(site: Path) -> Iterator[kbitprep.Registry]:
    """The distribution on the path, and a fresh registry that discovered it through its entry point."""
    with on_path(site), warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.PluginWarning)
        yield kbitprep.Registry()


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *(p for p in sys.path if p)])
    return env


def _toy_model(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    import toyquant

    return toyquant.quantize(tiny_causal_lm(dtype))


def _toy_layers(model: nn.Module) -> dict[str, nn.Module]:
    import toyquant

    return {n: m for n, m in model.named_modules() if isinstance(m, toyquant.ToyInt8Linear)}


def _storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ToyInt8Linear buffer (int8 qweight and float scale), copied."""
    return {
        f"{n}.{b}": getattr(m, b).detach().clone() for n, m in _toy_layers(model).items() for b in ("qweight", "scale")
    }


def test_the_guide_shows_the_plugin_and_its_packaging_verbatim() -> None:
    assert len(PLUGIN_FILE.read_text().splitlines()) < 80
    guide = GUIDE.read_text()
    for path in (PLUGIN_FILE, EXAMPLE / "pyproject.toml", EXAMPLE / "toyquant_kbitprep" / "lora.py"):
        include = f'--8<-- "{path.relative_to(EXAMPLES.parent).as_posix()}"'
        assert include in guide, f"docs/plugins.md does not include {include}"


def test_kbitprep_backends_lists_it_with_its_distribution(site: Path) -> None:
    code = (
        "import json, kbitprep; print(json.dumps([[b.name, b.distribution, b.version, b.entry_point, "
        "b.backend.priority, b.builtin] for b in kbitprep.backends()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(site), capture_output=True, text=True, timeout=300, check=True
    )
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert ["toyquant", DIST, "0.1.0", "toyquant_kbitprep:ToyQuantBackend", 100, False] in listed


def test_discovered_with_its_scheme(installed: kbitprep.Registry) -> None:
    info = installed.get("toyquant")
    assert (info.distribution, info.version, info.builtin) == (DIST, "0.1.0", False)
    assert not info.missing() and not [f for f in installed.failures() if f.distribution == DIST]
    (scheme,) = info.backend.schemes()
    assert (scheme.name, scheme.module_class, scheme.param_name) == ("toyquant-int8", "ToyInt8Linear", "qweight")
    assert scheme.quantize is not None and scheme.quantizes


def test_the_class_is_found_by_its_re_exported_path(installed: kbitprep.Registry) -> None:
    model = _toy_model()
    layer = _toy_layers(model)["model.layers.0.self_attn.q_proj"]
    assert class_path(layer) == "toyquant.layers.ToyInt8Linear"  # the path the detector does not name
    assert find_modules(model, "toyquant.ToyInt8Linear") == list(_toy_layers(model))
    found = installed.get("toyquant").backend.detect(model)
    assert found is not None and found.modules == tuple(_toy_layers(model)) and len(found.modules) == LAYERS
    assert found.evidence == (f"{LAYERS} x toyquant.layers.ToyInt8Linear",)
    assert installed.get("toyquant").backend.detect(tiny_causal_lm()) is None


def test_the_scheme_formula_is_the_stored_bytes(installed: kbitprep.Registry) -> None:
    (scheme,) = installed.get("toyquant").backend.schemes()
    for dtype in (torch.bfloat16, torch.float32):
        model = tiny_causal_lm(dtype)
        shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if type(m) is nn.Linear}
        assert scheme.quantize is not None
        scheme.quantize(model, dtype)
        layers = _toy_layers(model)
        assert set(layers) == set(shapes) - {"lm_head"}
        for name, layer in layers.items():
            stored = (layer.qweight.nbytes, layer.scale.nbytes)
            assert stored == scheme.bytes_for(*shapes[name], dtype), name


def test_peft_refuses_the_layer_without_the_mapping(installed: kbitprep.Registry) -> None:
    """Why the plugin declares lora_layers: PEFT has no LoRA layer for a class it does not know."""
    import peft

    model = _toy_model()
    with pytest.raises(ValueError, match=r"Target module ToyInt8Linear\(.*\) is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    # and PEFT's all-linear finds none of them (they are not nn.Linear): only lm_head, which it leaves out
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg: Any = _maybe_include_all_linear_layers(peft.LoraConfig(r=4, target_modules="all-linear"), _toy_model())
    assert cfg.target_modules == set()


def test_plan_prepare_lora_train_undo(installed: kbitprep.Registry) -> None:
    import peft

    reg = installed
    model = _toy_model()
    loaded = model_state(model)
    storage = _storage(model)

    plan = kbitprep.plan(model, registry=reg)  # every installed backend competes
    assert (plan.backend, plan.distributions) == ("toyquant", (DIST,))
    assert plan.trainable and plan.upcast_policy == "none"

    kbitprep.prepare(model, registry=reg)
    assert kbitprep.lora_targets(model, registry=reg) == list(_toy_layers(model))
    cfg = kbitprep.lora_config(model, r=4, registry=reg)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Unsupported layer type")  # the LoRA layer knows its shape
        peft_model = peft.get_peft_model(model, cfg)
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "ToyInt8LoraLinear"]
    assert len(wrapped) == LAYERS
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * LAYERS and all(p.requires_grad for p in lora.values())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == set(lora)

    opt = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    got_grad: set[str] = set()
    losses = []
    peft_model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = peft_model(**batch()).loss
        loss.backward()
        got_grad |= {n for n, p in lora.items() if p.grad is not None and p.grad.abs().sum() > 0}
        losses.append(loss.item())
        opt.step()
    assert got_grad == set(lora), f"LoRA tensors without gradient: {sorted(set(lora) - got_grad)}"
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] != losses[0]
    after = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in _storage(peft_model).items()}
    assert after.keys() == storage.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in storage.items())  # bit-exact

    kbitprep.undo(peft_model)
    base = peft_model.unload()  # the ToyInt8Linear layers back in place of their LoRA wrappers
    restored = model_state(base)
    # every parameter and buffer (dtype, class, requires_grad, bytes) and use_cache exactly as loaded;
    # the input-grads hook PeftModel itself registers is PEFT's, not kbitprep's, so modules are not compared
    assert (restored["params"], restored["buffers"], restored["use_cache"]) == (
        loaded["params"],
        loaded["buffers"],
        loaded["use_cache"],
    )
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def test_plan_counts_the_buffers_holding_quantized_storage(installed: kbitprep.Registry) -> None:
    """ToyInt8Linear keeps everything in buffers: the plan counts them as quantized storage."""
    model = _toy_model()
    decl = installed.get("toyquant").backend
    found = decl.detect(model)
    assert found is not None
    declared = decl.declare(model, found).quantized
    assert declared == set(_storage(model)) and len(declared) == 2 * LAYERS
    plan = kbitprep.plan(model, registry=installed)
    assert {p.name for p in plan.quantized} == declared
    row = plan.by_module_type()["ToyInt8Linear"]
    stored = sum(t.nbytes for t in _storage(model).values())
    assert (row["quantized"], row["bytes_before"], row["bytes_after"]) == (2 * LAYERS, stored, stored)


def _plan_config(site: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kbitprep", "plan", "--config", str(config), *extra, "--json"],
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_plans_a_config_with_the_plugins_scheme(site: Path, tmp_path: Path) -> None:
    """``kbitprep plan --config CONFIG.json --quantization toyquant-int8``: nothing loaded, exact bytes."""
    config = tiny_llama_config()
    config.save_pretrained(tmp_path)
    out = _plan_config(site, tmp_path / "config.json", "--quantization", "toyquant-int8", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.stdout)
    q = data["quantization"]
    assert (q["name"], q["module_class"], q["quantized_layers"]) == ("toyquant-int8", "ToyInt8Linear", LAYERS)
    assert (data["plan"]["backend"], data["plan"]["distributions"]) == ("toyquant", [DIST])

    # the bytes are the scheme's formula on every converted linear, and what toyquant really stores
    with on_path(site):
        import toyquant
        from toyquant_kbitprep import ToyQuantBackend

        (scheme,) = ToyQuantBackend().schemes()
        model = tiny_causal_lm(torch.bfloat16)
        linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
        shapes = [(m.out_features, m.in_features) for m in linears]  # lm_head is not converted
        formula = [scheme.bytes_for(o, i, torch.bfloat16) for o, i in shapes]
        toyquant.quantize(model)
        stored = sum(t.nbytes for t in _storage(model).values())
    assert (q["weight_bytes"], q["overhead_bytes"]) == (sum(d for d, _ in formula), sum(s for _, s in formula))
    assert q["weight_bytes"] + q["overhead_bytes"] == stored
    assert q["quantized_parameters"] == sum(o * i for o, i in shapes)
    assert data["plan"]["by_module_type"]["ToyInt8Linear"]["bytes_after"] == stored


def test_passes_the_shipped_contract_suite(site: Path) -> None:
    assert_contract_suite_passes(EXAMPLE, _env(site), own_tests=2)
