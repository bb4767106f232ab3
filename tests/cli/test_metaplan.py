"""The planner behind ``kbitprep plan --config``: its storage formulas and rules against real models.

Each quantization scheme really quantizes a small Llama on the CPU; the bytes its library stores
for every converted weight (data, scales, quantization state) must equal the formula, the layers
it converts must be the ones the meta planner converts, and the plan made from the config alone
must agree with ``kbitprep.plan`` of the loaded model wherever the two can be compared.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.app.demo import demo_config, load_checkpoint
from kbitprep.app.metaplan import SCHEMES, ConfigError, converted_linears, load_config, peft_plan, plan_from_config
from kbitprep.errors import InvalidPolicyError
from kbitprep.plugin import missing_packages

QUANTIZED = [name for name, s in SCHEMES.items() if s.quantizes]


def _inner_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's values; tensor subclasses are opened up to their plain inner tensors."""
    data = t.data if isinstance(t, nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        names, _ = data.__tensor_flatten__()
        return sum(_inner_bytes(getattr(data, n)) for n in names)
    return data.numel() * data.element_size()


def _stored_bytes(module: nn.Module) -> int:
    """Everything the library keeps for one converted weight: the parameter (without bias) and
    its scales / quantization state wherever they live."""
    total = sum(_inner_bytes(p) for n, p in module.named_parameters(recurse=False) if n != "bias")
    weight = module._parameters.get("weight")
    state = getattr(weight, "quant_state", None)
    while state is not None:  # bitsandbytes 4-bit: absmax, code, offset; nested state2
        total += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    scb = getattr(weight, "SCB", None)  # bitsandbytes 8-bit row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    meta = getattr(module, "meta", None)  # hqq: scale and zero beside W_q
    if isinstance(meta, dict):
        total += sum(v.numel() * v.element_size() for v in meta.values() if isinstance(v, torch.Tensor))
    return total


@functools.cache
def _checkpoint() -> Path:
    from transformers import LlamaForCausalLM

    path = Path(tempfile.mkdtemp(prefix="kbitprep-cli-metaplan-"))
    torch.manual_seed(0)
    LlamaForCausalLM(demo_config()).to(torch.bfloat16).save_pretrained(path)
    return path


@functools.cache
def _loaded(scheme: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_checkpoint(_checkpoint(), scheme, torch.bfloat16)


def _skip_if_missing(scheme: str) -> None:
    missing = missing_packages(SCHEMES[scheme].requires)
    if missing:
        pytest.skip(f"{scheme} needs {', '.join(missing)}")


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_formula_equals_what_the_library_stores(scheme: str) -> None:
    _skip_if_missing(scheme)
    s = SCHEMES[scheme]
    model = _loaded(scheme)
    f = torch.empty((), dtype=torch.bfloat16).element_size()
    mods = dict(model.named_modules())
    converted = [
        n
        for n, m in mods.items()
        if type(m).__name__ == s.module_class
        and (s.module_class != "Linear" or type(m.weight.data) is not torch.Tensor)
    ]
    assert converted, f"{scheme}: no converted layers found"
    meta = kbitprep.app.metaplan.build_meta_model(demo_config(), torch.bfloat16)  # type: ignore[attr-defined]
    assert sorted(converted) == sorted(converted_linears(meta))
    shapes = {n: (m.out_features, m.in_features) for n, m in meta.named_modules() if isinstance(m, nn.Linear)}
    for name in converted:
        data, extra = s.weight_bytes(*shapes[name], f)
        assert _stored_bytes(mods[name]) == data + extra, f"{scheme}: {name}"


@pytest.mark.parametrize("scheme", [*QUANTIZED, "none"])
def test_plan_from_config_agrees_with_plan_of_loaded_model(scheme: str) -> None:
    _skip_if_missing(scheme)
    s = SCHEMES[scheme]
    model = _loaded(scheme)
    real = kbitprep.plan(model)
    meta = plan_from_config(load_config(_checkpoint() / "config.json"), scheme)
    assert meta.plan.backend == real.backend == s.backend
    assert (meta.plan.upcast_policy, meta.plan.checkpointing) == (real.upcast_policy, real.checkpointing)
    assert meta.plan.hooks == real.hooks
    real_q = {p.name.rpartition(".")[0] for p in real.quantized}
    meta_q = {p.name.rpartition(".")[0] for p in meta.plan.quantized}
    assert meta_q == real_q
    assert meta.quantized_layers == len(real_q)
    # every other parameter: same name, dtype, bytes, requires_grad before and after
    plain_real = {p.name: p for p in real.params if not p.quantized}
    plain_meta = {p.name: p for p in meta.plan.params if not p.quantized}
    assert plain_meta.keys() == plain_real.keys()
    for name, p in plain_meta.items():
        r = plain_real[name]
        assert (p.dtype_before, p.dtype_after, p.bytes_before, p.bytes_after) == (
            r.dtype_before,
            r.dtype_after,
            r.bytes_before,
            r.bytes_after,
        ), name
        assert (p.requires_grad_before, p.requires_grad_after) == (r.requires_grad_before, r.requires_grad_after), name
    assert len(meta.plan.to_freeze) == len(real.to_freeze)
    # PEFT's rules: the same parameters upcast
    real_peft = peft_plan(model)
    assert {p.name for p in meta.peft.to_upcast} == {p.name for p in real_peft.to_upcast}
    assert meta.peft.checkpointing == real_peft.checkpointing


@pytest.mark.parametrize("scheme", [*QUANTIZED, "none"])
@pytest.mark.parametrize("upcast", ["norms", "all"])
def test_upcast_refused_exactly_where_the_backend_refuses_it(scheme: str, upcast: str) -> None:
    _skip_if_missing(scheme)
    config = load_config(_checkpoint() / "config.json")
    try:
        kbitprep.plan(_loaded(scheme), upcast=upcast)
    except InvalidPolicyError:
        with pytest.raises(InvalidPolicyError):
            plan_from_config(config, scheme, upcast=upcast)
    else:
        meta = plan_from_config(config, scheme, upcast=upcast)
        real = kbitprep.plan(_loaded(scheme), upcast=upcast)
        assert {p.name for p in meta.plan.to_upcast} == {p.name for p in real.to_upcast}


@pytest.mark.parametrize("scheme", ["bnb-4bit", "bnb-8bit", "torchao-int8", "hqq-4bit", "none"])
def test_peft_figure_is_what_peft_really_leaves(scheme: str) -> None:
    """The figure the demo and ``plan`` show for PEFT: run PEFT's own function on a fresh load and weigh it."""
    _skip_if_missing(scheme)
    peft_utils = pytest.importorskip("peft.utils")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_checkpoint(_checkpoint(), scheme, torch.bfloat16)
        figure = peft_plan(model)
        peft_utils.prepare_model_for_kbit_training(model)
    seen: set[int] = set()
    after = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            after += _inner_bytes(p)
    assert figure.bytes_after == after
    assert len(figure.to_upcast) == sum(1 for p in model.parameters() if p.dtype == torch.float32)


def test_peft_really_raises_on_quanto_as_the_note_says() -> None:
    _skip_if_missing("quanto-int8")
    peft_utils = pytest.importorskip("peft.utils")
    model = load_checkpoint(_checkpoint(), "quanto-int8", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype of a weights Tensor cannot be changed"):
        peft_utils.prepare_model_for_kbit_training(model)
    assert "raises" in SCHEMES["quanto-int8"].peft_note


def test_prepare_refuses_meta_models_but_plan_works() -> None:
    meta = kbitprep.app.metaplan.build_meta_model(demo_config(), torch.bfloat16)  # type: ignore[attr-defined]
    assert kbitprep.plan(meta).bytes_before == sum(p.numel() * 2 for p in meta.parameters())
    with pytest.raises(kbitprep.UnsupportedModelError, match="meta device"):
        kbitprep.prepare(meta)


def test_tied_embeddings_are_not_converted() -> None:
    config = demo_config()
    config.tie_word_embeddings = True
    meta = plan_from_config(config, "bnb-4bit")
    names = {p.name for p in meta.plan.params}
    assert "lm_head.weight" not in names  # tied: one parameter, planned once as the embedding
    emb = next(p for p in meta.plan.params if p.name == "model.embed_tokens.weight")
    assert "lm_head.weight" in emb.aliases and not emb.quantized


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"hidden_size": 8}', 'no "model_type"'),
        ('{"model_type": "no-such-model"}', "no-such-model"),
    ],
)
def test_load_config_rejects_malformed_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_a_backend_whose_schemes_raise_is_reported_and_left_out() -> None:
    import kbitprep
    from kbitprep.app.metaplan import schemes
    from kbitprep.plugin import Backend

    class BrokenSchemes(Backend):
        name = "broken-schemes"
        priority = 5

        def detect(self, model):  # type: ignore[no-untyped-def]
            return None

        def schemes(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("no table")

    reg = kbitprep.Registry(discover=True)
    reg.register(BrokenSchemes())
    with pytest.warns(kbitprep.PluginWarning, match=r"schemes\(\) raised RuntimeError: no table.*schemes are left out"):
        found = schemes(reg)
    assert "bnb-4bit" in found and [f.stage for f in reg.failures() if f.name == "broken-schemes"] == ["schemes"]
