"""kbitprep.estimate on mixture-of-experts and hybrid (Mamba + attention) models, and on every built-in
scheme: each checked against a real training step on the CPU, tracked the same way.

The real side loads a tiny model with the scheme, prepares it (PEFT's function or ``kbitprep.prepare``),
attaches LoRA, takes one warm-up step (AdamW's state), then :func:`kbitprep.app.estimate_sim.measure_step`
tracks one step. The simulation runs with its CPU settings (``target="cpu"``, AdamW without foreach), so
both sides run the same kernels; the peaks must agree within 5% (they agree within 0.5% today).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep.app.estimate import Variant, _resolve_variant, _simulate_variant
from kbitprep.app.estimate_sim import GPU_UNVERIFIED, SimResult, expert_note, measure_step
from kbitprep.app.metaplan import SCHEMES

from .tiny import nf4_config, tiny_llama_config
from .tiny_configs import TINY_DECODER, TINY_EXPERTS, tiny_moe_config

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TOLERANCE = 0.05
BATCH, SEQ = 2, 64


def _variant(name: str) -> Variant:
    return Variant("peft", peft=True) if name == "peft" else Variant(name, memory=None if name == "default" else name)


def _saved(config: Any) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix=f"kbitprep-{config.model_type}-"))
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


def real_and_simulated(
    config: Any,
    scheme: str,
    variant: str,
    load: Callable[[Path], nn.Module],
    *,
    experts: bool = False,
    kbitprep_targets: bool = False,
    batch: int = BATCH,
    seq: int = SEQ,
) -> tuple[int, SimResult]:
    """(real tracked peak, simulation) of one training step with LoRA r=16 on PEFT's ``"all-linear"``, or
    on the targets of :func:`kbitprep.lora_config` (``kbitprep_targets``; with ``experts``, the fused expert
    weights too)."""
    model = load(_saved(config))
    model.train()  # before any forward: an eval-mode forward repacks bnb 4-bit weights on AVX512-BF16 CPUs
    if variant == "peft":
        model = kbitprep.prepare_model_for_kbit_training(model)
    else:
        model = kbitprep.prepare(model, memory=None if variant == "default" else variant)
    if experts or kbitprep_targets:
        lora = kbitprep.lora_config(model, r=16, lora_alpha=32, experts=experts, task_type="CAUSAL_LM")
        targets: Any = sorted(lora.target_modules)
    else:
        targets = "all-linear"
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    vocab = int(config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "labels": ids.clone()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**data).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    real = measure_step(model, data, opt, vocab=vocab).peak
    rv = _resolve_variant(_variant(variant), SCHEMES[scheme])
    common = dict(
        batch=batch,
        seq=seq,
        lora_r=16,
        lora_alpha=32,
        lora_targets=targets,
        target="cpu",
        foreach=False,
        lora_experts=experts,
    )
    sim = _simulate_variant(config, SCHEMES[scheme], torch.bfloat16, rv, common)
    assert sim.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    return real, sim


def _nf4(skip: tuple[str, ...] = ()) -> Callable[[Path], nn.Module]:
    def load(path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        qc: Any = nf4_config()
        if skip:
            qc.llm_int8_skip_modules = list(skip)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16)

    return load


def tiny_jamba_config() -> Any:
    """A 2-layer Jamba: a Mamba layer with a dense MLP, then an attention layer with 4 experts (2 per token)."""
    from transformers import JambaConfig

    return JambaConfig(
        **TINY_DECODER,
        **TINY_EXPERTS,
        mamba_d_state=8,
        mamba_expand=2,
        mamba_dt_rank=8,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
    )


MOE_CASES = {
    # Qwen3-MoE with the router's auxiliary loss on: the router logits of every layer kept for it
    "qwen3_moe-default-aux": (lambda: tiny_moe_config("qwen3_moe", output_router_logits=True), "default", False),
    # PEFT's function upcasts the bf16 experts to fp32: the grouped expert matmul runs in fp32
    "mixtral-peft": (lambda: tiny_moe_config("mixtral"), "peft", False),
    # expert adapters (PEFT's target_parameters): W + B @ A per expert stack at each forward
    "qwen3_moe-experts": (lambda: tiny_moe_config("qwen3_moe"), "default", True),
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_estimate_matches_a_real_cpu_step(case: str) -> None:
    make, variant, experts = MOE_CASES[case]
    real, sim = real_and_simulated(make(), "bnb-4bit", variant, _nf4(), experts=experts)
    assert sim.peak_bytes == pytest.approx(real, rel=TOLERANCE), (case, sim.peak_bytes, real, sim.parts)
    assert sim.fused_experts[0] == 2 * 2  # gate/up and down in each of the 2 layers


def test_hybrid_estimate_matches_a_real_cpu_step() -> None:
    """Jamba (Mamba + attention + experts): its Mamba mixer reads ``dt_proj.weight`` directly, which a
    bitsandbytes weight cannot serve, so it trains only with ``dt_proj`` unquantized: the estimate says
    so, and is checked against a model loaded that way."""
    real, sim = real_and_simulated(tiny_jamba_config(), "bnb-4bit", "default", _nf4(skip=("dt_proj",)))
    assert sim.peak_bytes == pytest.approx(real, rel=TOLERANCE), (sim.peak_bytes, real, sim.parts)
    assert any("llm_int8_skip_modules=['dt_proj']" in n for n in sim.model_notes), sim.model_notes
    assert any("state-space (Mamba) layers run transformers' torch path" in n for n in sim.model_notes)


# --------------------------------------------------------------------------- every built-in scheme


def _dense_config() -> Any:
    # twice the tiny Llama's width and vocabulary, with LlamaConfig's default context (2048)
    return tiny_llama_config(hidden_size=128, intermediate_size=256, vocab_size=512, max_position_embeddings=2048)


def _scheme_loader(name: str) -> Callable[[Path], nn.Module]:
    scheme = SCHEMES[name]

    def load(path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if scheme.quantization_config is not None:
            qc = scheme.quantization_config(torch.bfloat16)
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16)
        assert scheme.quantize is not None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return scheme.quantize(model, torch.bfloat16)

    return load


SCHEME_CASES = {
    "bnb-8bit": "default",
    "hqq-4bit": "default",
    "torchao-int8": "peft",
    "torchao-int4": "default",
    "quanto-int8": "peft",
    "quanto-int4": "default",
}


@pytest.mark.parametrize("scheme", list(SCHEME_CASES))
def test_every_scheme_matches_a_real_cpu_step(scheme: str) -> None:
    """The stand-in of each scheme allocates and saves what the library does on the CPU: torchao saves
    the weight it dequantized for the backward, hqq and optimum-quanto save the layer's input."""
    missing = [m for m in SCHEMES[scheme].requires if not _importable(m)]
    if missing:
        pytest.skip(f"{scheme} needs {missing}")
    variant = SCHEME_CASES[scheme]
    real, sim = real_and_simulated(_dense_config(), scheme, variant, _scheme_loader(scheme), kbitprep_targets=True)
    assert sim.peak_bytes == pytest.approx(real, rel=TOLERANCE), (scheme, sim.peak_bytes, real, sim.parts)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_schemes_whose_gpu_kernels_differ_are_marked_unverified() -> None:
    """bitsandbytes 8-bit and optimum-quanto run other kernels on CUDA than on the CPU (where the stand-ins
    were checked): their GPU rows say they are unverified, and why; the others do not."""
    assert set(GPU_UNVERIFIED) == {"bnb-8bit", "quanto-int8", "quanto-int4"}
    cfg = _dense_config()
    cfg.num_hidden_layers = 1
    common = dict(batch=1, seq=8, lora_r=4, lora_alpha=8, lora_targets="all-linear")
    for name, target in (("bnb-8bit", "cuda"), ("bnb-8bit", "cpu"), ("torchao-int8", "cuda")):
        rv = _resolve_variant(Variant("default"), SCHEMES[name])
        sim = _simulate_variant(cfg, SCHEMES[name], torch.bfloat16, rv, dict(common, target=target))
        assert sim.unverified == (GPU_UNVERIFIED.get(name, "") if target == "cuda" else "")
    assert "int8 matmuls on CUDA" in GPU_UNVERIFIED["bnb-8bit"]


# --------------------------------------------------------------------------- the grouped expert matmul


def test_grouped_mm_runs_in_every_float_dtype_on_fake_tensors() -> None:
    """torch's fake-tensor rule for ``_grouped_mm`` insists on bf16 (the CUDA fast path), but the op runs in
    fp32 too (PEFT's upcast experts): the tracker gives the output the real op gives, and counts it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kbitprep.app.estimate_sim import StepTracker

    real_a, real_w = torch.randn(10, 16), torch.randn(4, 16, 8)
    offs = torch.tensor([2, 5, 7, 10], dtype=torch.int32)
    expected = torch.nn.functional.grouped_mm(real_a, real_w, offs=offs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        a, w = torch.empty(10, 16), torch.empty(4, 16, 8)
        fake_offs = torch.empty(4, dtype=torch.int32)
    tracker = StepTracker(fake=True)
    for t in (a, w, fake_offs):
        tracker.register(t, "weights")
    with mode, tracker:
        out = torch.nn.functional.grouped_mm(a, w, offs=fake_offs)
        grad_w = torch.nn.functional.grouped_mm(a.t(), out, offs=fake_offs)
    assert (out.shape, out.dtype) == (expected.shape, expected.dtype)
    assert grad_w.shape == (4, 16, 8)
    assert tracker.peak == (a.numel() + w.numel() + out.numel() + grad_w.numel()) * 4 + fake_offs.numel() * 4


# --------------------------------------------------------------------------- the estimate's notes


def test_the_estimate_says_the_experts_stay_in_full_precision() -> None:
    """The note of the bitsandbytes plan, with the experts' share of the loaded bytes (stand-ins hold the
    quantized storage as loaded)."""
    cfg = tiny_moe_config("qwen3_moe")
    rv = _resolve_variant(Variant("default"), SCHEMES["bnb-4bit"])
    common = dict(batch=1, seq=8, lora_r=4, lora_alpha=8, lora_targets="all-linear")
    sim = _simulate_variant(cfg, SCHEMES["bnb-4bit"], torch.bfloat16, rv, common)
    note = expert_note(sim.fused_experts, SCHEMES["bnb-4bit"])
    assert note.startswith("4 fused expert weights (3-D parameters, ")
    assert "bitsandbytes integration converts nn.Linear layers only" in note
    none = _simulate_variant(
        cfg, SCHEMES["none"], torch.bfloat16, _resolve_variant(Variant("default"), SCHEMES["none"]), common
    )
    assert none.fused_experts == (0, 0, 0)  # nothing is quantized: nothing to say
    assert expert_note(none.fused_experts, SCHEMES["none"]) == ""


def test_the_expert_note_describes_the_whole_model_when_layers_are_extrapolated() -> None:
    """A 10-layer model is simulated with 2 and 3 layers; its note counts the experts of all 10 layers and
    their share of all 10 layers' bytes, as simulating every layer does."""
    cfg = tiny_moe_config("qwen3_moe", num_hidden_layers=10)
    fit = kbitprep.estimate(cfg, batch=1, seq=8, variants=["default"])
    every = kbitprep.estimate(cfg, batch=1, seq=8, variants=["default"], exact=True)
    assert fit.simulated_layers == (2, 3) and every.simulated_layers == (10,)
    notes = [n for n in fit.notes if "fused expert weights" in n]
    assert len(notes) == 1 and notes[0].startswith("20 fused expert weights"), fit.notes
    assert notes == [n for n in every.notes if "fused expert weights" in n]


def test_models_without_checkpointing_are_estimated_without_it() -> None:
    """A model class without activation checkpointing (CTRL) is simulated without it, and says so,
    instead of refusing the estimate."""
    from transformers import CTRLConfig

    cfg = CTRLConfig(n_embd=64, n_layer=2, n_head=4, dff=128, vocab_size=256, n_positions=64)
    rv = _resolve_variant(Variant("default"), SCHEMES["bnb-4bit"])
    common = dict(batch=1, seq=16, lora_r=4, lora_alpha=8, lora_targets="all-linear")
    sim = _simulate_variant(cfg, SCHEMES["bnb-4bit"], torch.bfloat16, rv, common)
    assert sim.peak_bytes > 0
    assert any("does not support activation checkpointing" in n for n in sim.model_notes)


# --------------------------------------------------------------------------- speed


@pytest.mark.slow
def test_a_30b_a3b_estimate_is_fast_and_small() -> None:
    """A Qwen3-30B-A3B-shaped estimate (48 layers, 128 experts, 8 active) with every row: under 30 s of
    CPU time and under 1 GB of peak RSS, in a fresh process (imports included)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, time\n"
        # this process's own peak (VmHWM, reset by exec); ru_maxrss would carry the forking pytest's peak over
        "def _peak_rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "t = time.process_time()\n"
        "import kbitprep\n"
        "from transformers import Qwen3MoeConfig\n"
        "cfg = Qwen3MoeConfig(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,\n"
        "    moe_intermediate_size=768, vocab_size=151936, num_attention_heads=32, num_key_value_heads=4,\n"
        "    head_dim=128)\n"
        "s = time.process_time()\n"
        "est = kbitprep.estimate(cfg, batch=4, seq=1024)\n"
        "print(json.dumps({'estimate_s': time.process_time() - s, 'total_s': time.process_time() - t,\n"
        "    'rss': _peak_rss(),\n"
        "    'rows': [r.variant for r in est.rows], 'default': est.row('default').peak_bytes}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == ["peft", "default", "chunked_head", "offload", "lowest"]
    assert result["estimate_s"] < 30, result
    assert result["rss"] < 10**9, result
    # the experts stay bf16 (bitsandbytes converts nn.Linear only): 48 x 128 x 3 x 2048 x 768 x 2 bytes
    assert result["default"] > 48 * 128 * 3 * 2048 * 768 * 2


def test_an_moe_config_without_experts_per_token_is_a_config_error() -> None:
    """DeepSeek-V2's default config leaves ``num_experts_per_tok`` unset: its router's ``topk`` fails on a
    real model too; the estimate says which key to set instead of refusing the model."""
    from transformers import AutoConfig

    from kbitprep.errors import ConfigError

    cfg = AutoConfig.for_model("deepseek_v2", num_hidden_layers=2)
    assert cfg.num_experts_per_tok is None
    with pytest.raises(ConfigError, match="num_experts_per_tok=None"):
        kbitprep.estimate(cfg, batch=1, seq=8, variants=["default"])


# --------------------------------------------------------------------------- the public output


def test_unverified_rows_say_so_in_the_table_the_json_and_the_notes() -> None:
    """An estimate of a scheme whose CUDA kernels the CPU cannot show (bitsandbytes 8-bit) marks every row
    "verified on GPU: NO" and says why in a note; a checked scheme (bitsandbytes 4-bit) says "yes"."""
    cfg = tiny_moe_config("qwen3_moe")
    int8 = kbitprep.estimate(cfg, batch=1, seq=16, quantization="bnb-8bit", variants=["peft", "default"])
    nf4 = kbitprep.estimate(cfg, batch=1, seq=16, quantization="bnb-4bit", variants=["peft", "default"])
    assert [r.unverified for r in int8.rows] == [GPU_UNVERIFIED["bnb-8bit"]] * 2
    assert [r.unverified for r in nf4.rows] == ["", ""]
    assert [r["unverified"] for r in int8.to_dict()["rows"]] == [GPU_UNVERIFIED["bnb-8bit"]] * 2

    def gpu_line(est: Any) -> list[str]:
        return next(t for t in est.render().splitlines() if t.startswith("verified on GPU")).split()[3:]

    assert gpu_line(int8) == ["NO", "(see", "note)"] * 2
    assert f"bnb-8bit rows are unverified on a GPU: {GPU_UNVERIFIED['bnb-8bit']}" in int8.notes
    assert not any("unverified" in n for n in nf4.notes)
    assert gpu_line(nf4) == ["yes"] * 2
    # the fused experts stay bf16 under bitsandbytes: the notes say so, with their share of the bytes
    assert any(n.startswith("4 fused expert weights (3-D parameters, ") for n in nf4.notes), nf4.notes


def test_the_estimate_counts_expert_and_router_adapters_when_asked(tmp_path: Path) -> None:
    """``lora_experts`` adds the fused expert adapters (PEFT's ``target_parameters``) to the attention ones;
    ``lora_router`` adds one r x (hidden + experts) adapter per layer's router. The command line's
    ``--lora-experts`` / ``--lora-router`` give the same numbers."""
    import argparse
    import io
    import json

    from kbitprep.app.estimate import add_estimate_parser, run_estimate

    cfg = tiny_moe_config("qwen3_moe")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    runs = {
        (e, r): kbitprep.estimate(
            cfg, batch=1, seq=16, variants=["default"], lora_targets=attn, lora_experts=e, lora_router=r
        )
        for e, r in ((False, False), (True, False), (True, True))
    }
    plain, experts, router = runs[False, False], runs[True, False], runs[True, True]
    assert experts.lora_params > plain.lora_params
    assert experts.row("default").parts["adapters"] > plain.row("default").parts["adapters"]
    r, layers = 16, cfg.num_hidden_layers
    assert router.lora_params - experts.lora_params == layers * r * (cfg.hidden_size + cfg.num_experts)

    parser = argparse.ArgumentParser()
    add_estimate_parser(parser.add_subparsers(dest="command"))
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    argv = ["estimate", "--config", str(path), "--batch", "1", "--seq", "16", "--lora-targets", ",".join(attn)]
    out = io.StringIO()
    assert run_estimate(parser.parse_args([*argv, "--memory", "chunked_head", "--lora-experts", "--json"]), out) == 0
    assert json.loads(out.getvalue())["lora_params"] == experts.lora_params
    with pytest.raises(kbitprep.errors.InvalidPolicyError, match="lora_experts='yes' must be True or False"):
        kbitprep.estimate(cfg, lora_experts="yes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- layers that differ


@pytest.mark.parametrize(
    ("kinds", "part"),
    [
        ([0] * 10, (0, 1)),  # identical layers
        ([1, 1, 1] + [0] * 7, (3, 1)),  # DeepSeek-V3: dense layers first, then experts
        ([0, 0, 0, 1] * 3, (0, 4)),  # Qwen3-Next: 3 linear-attention layers, 1 full
        ([0, 1] * 5, (0, 2)),  # Gemma 2: sliding and full attention
        ([9] + [0, 1] * 3, (1, 2)),  # one layer of its own, then a pattern of 2
        ([0, 1, 2, 3, 4, 5], None),  # nothing repeats twice
    ],
)
def test_the_repeating_part_of_the_layers(kinds: list[int], part: tuple[int, int] | None) -> None:
    from kbitprep.app.estimate import _repeating_part

    assert _repeating_part(kinds) == part


@pytest.mark.parametrize(
    ("model_type", "overrides", "sims", "note"),
    [
        # 2 dense layers, then experts: 1 and 2 layers would see no expert at all
        ("deepseek_v3", {"num_hidden_layers": 7, "first_k_dense_replace": 2}, (3, 4), "2 leading layers of their own"),
        ("gemma2", {"num_hidden_layers": 7}, (2, 4), "a pattern repeating every 2"),
    ],
)
def test_layers_that_differ_are_simulated_by_their_repeating_part(
    model_type: str, overrides: dict[str, Any], sims: tuple[int, int], note: str
) -> None:
    """The default widths of each family, cut to 7 layers: the estimate simulates up to one and two repeats
    of the layers' pattern, says so, and gives what simulating every layer gives."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **overrides)
    fit = kbitprep.estimate(cfg, batch=1, seq=128, variants=["default"])
    every = kbitprep.estimate(cfg, batch=1, seq=128, variants=["default"], exact=True)
    assert fit.simulated_layers == sims and every.simulated_layers == (7,)
    assert any(note in n for n in fit.notes), fit.notes
    assert fit.rows[0].peak_bytes == pytest.approx(every.rows[0].peak_bytes, rel=0.005)


@pytest.mark.parametrize(
    ("model_type", "sims", "note"),
    [
        ("llama", (2, 3), ""),  # identical layers
        ("deepseek_v3", (4, 5), "3 leading layers of their own, then a pattern repeating every 1"),
        ("jamba", (8, 16), "a pattern repeating every 8"),  # Mamba and attention layers
        ("zamba2", (54,), "starts or repeats too late to save time"),  # 44 layers before the pattern: all 54
    ],
)
def test_the_depths_chosen_for_default_configs(model_type: str, sims: tuple[int, ...], note: str) -> None:
    """Which depths the estimate simulates for the families' default configs (meta-device builds only)."""
    from transformers import AutoConfig

    from kbitprep.app.estimate import _fit_depths

    cfg = AutoConfig.for_model(model_type)
    chosen, why = _fit_depths(cfg, torch.bfloat16, cfg.num_hidden_layers)
    assert chosen == sims and note in why and bool(why) == bool(note), (chosen, why)
