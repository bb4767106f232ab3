"""kbitprep.estimate: predicted peak training memory against GPU measurements and a real CPU step."""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kbitprep.app.estimate import (
    DEFAULT_VARIANTS,
    Estimate,
    Variant,
    _resolve_variant,
    _simulate_variant,
    add_estimate_parser,
    estimate,
    parse_bytes,
    run_estimate,
)
from kbitprep.app.metaplan import SCHEMES
from kbitprep.errors import ConfigError, InvalidPolicyError, KbitprepError

from .tiny import nf4_config

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"

# --------------------------------------------------------------------------- the GPU measurements


def _bench_models() -> dict[str, dict[str, Any]]:
    """benchmarks/bench.py's model shapes (one definition for the benchmark and these tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kbitprep_bench", REPO / "benchmarks" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return {k: {n: v for n, v in shape.items() if n != "rope_parameters"} for k, shape in bench.MODELS.items()}


#: Llama-3.2-1B and Llama-3.1-8B architectures (random weights), exactly as benchmarks/bench.py builds them.
LLAMA_1B = _bench_models()["llama-3.2-1b"]
LLAMA_8B = _bench_models()["llama-3.1-8b"]
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)

#: ``peak_train`` (torch.cuda.max_memory_allocated over 6 steps, bytes) of the H200 runs, copied from
#: ../shared/bench/h200-peft-baseline.json ("variants", 1B) and ../shared/bench/h200-memory-modes.json
#: ("runs"); same setup everywhere: bnb NF4 double quantization, bf16 compute and autocast, LoRA r=16
#: all-linear, AdamW, batch 4 x 1024 tokens. Key: (file, entry) -> (model, how to estimate it, bytes).
#: The "chunkedloss" runs computed the head and the loss in checkpointed chunks of 256 positions of
#: all 4 sequences at once (1024 tokens a chunk): estimated with chunked_head=1024 (kbitprep's
#: default 256-token chunk predicts lower peaks, shown in docs/estimate.md); their offload was
#: torch.autograd.graph.save_on_cpu(pin_memory=True), simulated as such (offload_impl="save_on_cpu").
MEASURED: dict[tuple[str, str], tuple[str, Variant, int]] = {
    ("h200-peft-baseline.json", "peft_default"): ("1b", Variant("peft", peft=True), 9156971520),
    ("h200-peft-baseline.json", "peft_nonreentrant"): (
        "1b",
        Variant("peft_nonreentrant", peft=True, checkpointing="non_reentrant"),
        9156971520,
    ),
    ("h200-peft-baseline.json", "peft_no_gc"): (
        "1b",
        Variant("peft_no_gc", peft=True, checkpointing="off"),
        19236727808,
    ),
    ("h200-peft-baseline.json", "no_upcast_reentrant"): (
        "1b",
        Variant("no_upcast_reentrant", checkpointing="reentrant"),
        7836417024,
    ),
    ("h200-peft-baseline.json", "no_upcast_nonreentrant"): (
        "1b",
        Variant("no_upcast_nonreentrant", checkpointing="non_reentrant"),
        7836417024,
    ),
    ("h200-peft-baseline.json", "norms_fp32_nonreentrant"): (
        "1b",
        Variant("norms_fp32_nonreentrant", upcast="norms", checkpointing="non_reentrant"),
        8088210432,
    ),
    ("h200-memory-modes.json", "1b-no_upcast_reentrant_chunkedloss"): (
        "1b",
        Variant("chunkedloss", memory={"preset": "chunked_head", "chunked_head": 1024}),
        3145088512,
    ),
    ("h200-memory-modes.json", "8b-peft_default"): ("8b", Variant("peft", peft=True), 17950190592),
    ("h200-memory-modes.json", "8b-no_upcast_reentrant"): (
        "8b",
        Variant("no_upcast_reentrant", checkpointing="reentrant"),
        13723372544,
    ),
    ("h200-memory-modes.json", "8b-no_upcast_reentrant_chunkedloss"): (
        "8b",
        Variant("chunkedloss", memory={"preset": "chunked_head", "chunked_head": 1024}),
        9065598464,
    ),
    ("h200-memory-modes.json", "8b-no_upcast_reentrant_chunkedloss_offload"): (
        "8b",
        Variant("chunkedloss_offload", memory={"preset": "lowest", "chunked_head": 1024}, offload_impl="save_on_cpu"),
        7933095936,
    ),
}
TOLERANCE = 0.10


def _config(shape: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def test_measured_numbers_match_the_shared_files() -> None:
    """The numbers copied above are the ones in ../shared/bench (skipped where that folder is absent)."""
    if not SHARED_BENCH.is_dir():
        pytest.skip(f"{SHARED_BENCH} is absent (the copies in MEASURED are checked by the other tests)")
    for (name, entry), (model, _, peak) in MEASURED.items():
        data = json.loads((SHARED_BENCH / name).read_text())
        runs = data.get("variants") or data.get("runs")
        assert runs[entry]["peak_train"] == peak, (name, entry)
        assert runs[entry].get("error") is None
        cfg = runs[entry].get("config") or data["meta"]["config"]
        shape = LLAMA_1B if model == "1b" else LLAMA_8B
        assert (cfg["hidden"], cfg["layers"], cfg["vocab"]) == (
            shape["hidden_size"],
            shape["num_hidden_layers"],
            shape["vocab_size"],
        )
        assert (cfg["B"], cfg["T"]) == (4, 1024)


@pytest.fixture(scope="module")
def predictions() -> dict[tuple[str, str], tuple[int, int]]:
    """(file, entry) -> (predicted, measured) for every measured run; one estimate per model."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for model, shape in (("1b", LLAMA_1B), ("8b", LLAMA_8B)):
        keys = [k for k, v in MEASURED.items() if v[0] == model]
        result = estimate(
            _config(shape),
            quantization="bnb-4bit",
            batch=4,
            seq=1024,
            lora_r=16,
            variants=[MEASURED[k][1] for k in keys],
        )
        for key in keys:
            out[key] = (result.row(MEASURED[key][1].name).peak_bytes, MEASURED[key][2])
    return out


@pytest.mark.slow
def test_predictions_within_ten_percent_of_every_gpu_peak(predictions: dict[tuple[str, str], tuple[int, int]]) -> None:
    errors = {f"{k[0]}:{k[1]}": (p / m - 1) for k, (p, m) in predictions.items()}
    assert len(errors) == len(MEASURED)
    bad = {k: f"{e:+.1%}" for k, e in errors.items() if abs(e) > TOLERANCE}
    assert not bad, bad


@pytest.mark.slow
def test_predictions_order_the_settings_as_measured(predictions: dict[tuple[str, str], tuple[int, int]]) -> None:
    """Beyond the 10%: where the GPU showed a difference between two runs, the estimate shows it too."""
    by_model: dict[str, list[tuple[int, int]]] = {}
    for key, pm in predictions.items():
        by_model.setdefault(MEASURED[key][0], []).append(pm)
    for pairs in by_model.values():
        for p1, m1 in pairs:
            for p2, m2 in pairs:
                if m1 > m2 * 1.05:
                    assert p1 > p2


# --------------------------------------------------------------------------- a real CPU step


TINY = _bench_models()["tiny"]  # the benchmark's tiny model


@pytest.fixture(scope="module")
def tiny_checkpoint() -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="kbitprep-estimate-")) / "tiny"
    model: Any = LlamaForCausalLM(_config(TINY))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _real_peak(path: Path, variant: str, batch: int, seq: int) -> int:
    """Load with bnb 4-bit, prepare, LoRA, one warm-up step, then track one real step on the CPU."""
    import peft
    from transformers import AutoModelForCausalLM

    import kbitprep
    from kbitprep.app.estimate_sim import measure_step

    qc = nf4_config()
    model: Any = AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16)
    model.train()  # before any forward: an eval-mode forward repacks bnb weights on AVX512-BF16 CPUs
    if variant == "peft":
        model = peft.prepare_model_for_kbit_training(model)
    else:
        model = kbitprep.prepare(model, memory=None if variant == "default" else variant)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": ids, "labels": ids.clone()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**b).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = measure_step(model, b, opt, vocab=TINY["vocab_size"])
    assert tracker.peak > 0
    return tracker.peak


@pytest.mark.parametrize("variant", ["peft", "default", "chunked_head"])
def test_simulation_matches_a_real_cpu_step(tiny_checkpoint: Path, variant: str) -> None:
    """The fake-tensor step and a real bnb 4-bit step on the CPU, tracked the same way, agree within 2%.

    The simulation runs with its CPU settings here (bitsandbytes' CPU kernel, AdamW without
    foreach, CPU autocast) so that both sides run the same code paths.
    """
    batch, seq = 2, 128
    real = _real_peak(tiny_checkpoint, variant, batch, seq)
    chosen = (
        Variant("peft", peft=True)
        if variant == "peft"
        else Variant(variant, memory=None if variant == "default" else variant)
    )
    rv = _resolve_variant(chosen, SCHEMES["bnb-4bit"])
    common = dict(
        batch=batch, seq=seq, lora_r=16, lora_alpha=32, lora_targets="all-linear", target="cpu", foreach=False
    )
    sim = _simulate_variant(_config(TINY), SCHEMES["bnb-4bit"], torch.bfloat16, rv, common)
    assert sim.peak_bytes == pytest.approx(real, rel=0.02), (sim.peak_bytes, real, sim.parts)


def test_layer_extrapolation_matches_simulating_every_layer() -> None:
    """Extrapolating from 2 and 3 layers gives what simulating all 8 gives (identical layers)."""
    shape = dict(TINY, num_hidden_layers=8)
    fast = estimate(_config(shape), batch=2, seq=64, variants=["chunked_head"])
    exact = estimate(_config(shape), batch=2, seq=64, variants=["chunked_head"], exact=True)
    assert fast.simulated_layers == (2, 3) and exact.simulated_layers == (8,)
    for a, b in zip(fast.rows, exact.rows):
        assert a.peak_bytes == pytest.approx(b.peak_bytes, rel=0.01), a.variant


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_other_architectures(model_type: str) -> None:
    """Not only Llama: any causal LM transformers builds runs through the same real model code.

    Gemma 2 soft-caps its logits; the chunked head applies the cap to each chunk, so it does not
    step aside there either (no full-logits note).
    """
    from transformers import AutoConfig

    settings = {k: v for k, v in TINY.items() if k != "tie_word_embeddings"}
    settings["vocab_size"] = 32000  # the logits dominate the peak, so chunking the head shows
    cfg = AutoConfig.for_model(model_type, **settings, head_dim=32)
    result = estimate(cfg, batch=2, seq=512, variants=["peft", "default", "chunked_head"])
    peft_row, default, chunked = result.rows
    assert peft_row.peak_bytes > default.peak_bytes > chunked.peak_bytes > 0
    assert chunked.parts["logits_loss"] < default.parts["logits_loss"] / 3
    assert not any("does not apply" in n for n in result.notes)


def test_offload_rows_run_kbitprep_offload_hooks() -> None:
    """The offload row moves each layer's saved input (2 MiB here) to the host: kbitprep's own hooks
    decide what goes; save_on_cpu moves more (every saved tensor, the head's included)."""
    cfg = _config(dict(TINY, hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8))
    result = estimate(
        cfg,
        batch=4,
        seq=512,
        variants=["default", "offload", Variant("soc", memory="offload", offload_impl="save_on_cpu")],
    )
    default, offload, soc = result.rows
    layer_input = 4 * 512 * 512 * 2
    assert offload.offloaded_bytes >= 3 * layer_input
    assert soc.offloaded_bytes > offload.offloaded_bytes
    assert offload.parts["activations"] < default.parts["activations"]
    assert offload.peak_bytes < default.peak_bytes
    assert default.offloaded_bytes == 0


# --------------------------------------------------------------------------- the API and the CLI


@pytest.fixture(scope="module")
def small() -> Estimate:
    return estimate(_config(dict(TINY, vocab_size=4096)), batch=2, seq=256, gpu_memory="64MB")


def test_rows_parts_and_ordering(small: Estimate) -> None:
    assert [r.variant for r in small.rows] == list(DEFAULT_VARIANTS)
    for row in small.rows:
        assert sum(row.parts.values()) == row.peak_bytes
        assert row.parts["weights"] > 0 and row.parts["adapters"] > 0
    peak = {r.variant: r.peak_bytes for r in small.rows}
    assert peak["default"] < peak["peft"]  # no fp32 copies of the embeddings, head and norms
    assert peak["chunked_head"] < peak["default"]  # no full logits
    assert small.row("chunked_head").parts["logits_loss"] < small.row("default").parts["logits_loss"]
    assert small.row("lowest").memory == {"preset": "lowest", "chunked_head": 256, "offload": True}
    assert small.row("peft").upcast == "peft" and small.row("default").upcast == "none"


def test_gpu_memory_fit(small: Estimate) -> None:
    gpu = parse_bytes("64MB")
    for row in small.rows:
        assert row.fits == (row.peak_bytes <= gpu)
        assert row.max_batch is not None and row.max_seq is not None and small.row("peft").max_seq is not None
        if row.fits:
            assert row.max_batch >= small.batch and row.max_seq >= small.seq
        else:
            assert row.max_batch < small.batch and row.max_seq < small.seq
    assert (small.row("lowest").max_seq or 0) >= (small.row("peft").max_seq or 0)


def test_gpu_memory_largest_batch_really_fits() -> None:
    """The largest batch the extrapolation gives fits when estimated, and one more does not by much."""
    cfg = _config(dict(TINY, vocab_size=4096))
    first = estimate(cfg, batch=2, seq=256, variants=["default"], gpu_memory="60MB").rows[0]
    assert first.max_batch is not None and first.max_batch > 2
    again = estimate(cfg, batch=first.max_batch, seq=256, variants=["default"]).rows[0]
    assert again.peak_bytes <= parse_bytes("60MB") * 1.03


def test_json_and_render(small: Estimate) -> None:
    data = json.loads(json.dumps(small.to_dict()))
    assert [r["variant"] for r in data["rows"]] == list(DEFAULT_VARIANTS)
    assert all(isinstance(r["peak_bytes"], int) for r in data["rows"])
    text = small.render()
    for name in DEFAULT_VARIANTS:
        assert name in text
    assert "PEAK" in text and "fits" in text


def test_estimate_accepts_a_loaded_model_and_leaves_it_alone(tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kbitprep.testing import model_state

    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, quantization_config=nf4_config(), dtype=torch.bfloat16
    )
    before = model_state(model)
    result = estimate(model, batch=1, seq=64, variants=["default"])
    assert result.quantization == "bnb-4bit"
    assert model_state(model) == before
    from_config = estimate(_config(TINY), batch=1, seq=64, variants=["default"])
    assert result.rows[0].peak_bytes == from_config.rows[0].peak_bytes


def test_unquantized_rows() -> None:
    result = estimate(_config(TINY), quantization="none", batch=1, seq=64, variants=["peft", "default"])
    peft_row, default = result.rows
    assert peft_row.checkpointing == "off"  # PEFT's function enables none on an unquantized model
    assert peft_row.parts["weights"] > 2 * default.parts["weights"] * 0.9  # it upcasts everything to fp32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quantization": "bnb-3bit"}, KbitprepError, "unknown quantization"),
        ({"batch": 0}, InvalidPolicyError, "batch=0"),
        ({"seq": -1}, InvalidPolicyError, "seq=-1"),
        ({"lora_r": 1.5}, InvalidPolicyError, "lora_r"),
        ({"optimizer": "lion"}, InvalidPolicyError, "adamw"),
        ({"upcast": "some"}, InvalidPolicyError, "upcast"),
        ({"checkpointing": "sometimes"}, InvalidPolicyError, "reentrant"),
        ({"variants": ["fastest"]}, InvalidPolicyError, "fastest"),
        ({"variants": []}, InvalidPolicyError, "empty"),
        ({"memory": "nonsense"}, InvalidPolicyError, "preset"),
        ({"memory": "lowest", "variants": ["peft"]}, InvalidPolicyError, "not both"),
        ({"gpu_memory": "lots"}, InvalidPolicyError, "24GB"),
        ({"lora_targets": []}, InvalidPolicyError, "lora_targets"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        estimate(_config(TINY), **kwargs)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        estimate(tmp_path / "missing.json")
    with pytest.raises(InvalidPolicyError, match="config"):
        estimate(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidPolicyError):
        estimate(42)


def test_parse_bytes() -> None:
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 TB") == 1_500_000_000_000
    assert parse_bytes(1000) == 1000
    for bad in ("", "GB", "-3GB", "3 parsecs", 0):
        with pytest.raises(InvalidPolicyError):
            parse_bytes(bad)  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kbitprep")
    sub = parser.add_subparsers(dest="command")
    add_estimate_parser(sub)
    return parser


def test_cli_json(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    _config(TINY).to_json_file(cfg)
    args = _parser().parse_args(
        ["estimate", "--config", str(cfg), "--batch", "1", "--seq", "64", "--gpu-memory", "1GB", "--json"]
    )
    out = io.StringIO()
    assert run_estimate(args, out) == 0
    data = json.loads(out.getvalue())
    assert [r["variant"] for r in data["rows"]] == list(DEFAULT_VARIANTS)
    assert all(r["peak_bytes"] > 0 and r["fits"] is True for r in data["rows"])


def test_cli_text_with_one_memory_mode(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    _config(TINY).to_json_file(cfg)
    args = _parser().parse_args(
        ["estimate", "--config", str(cfg), "--batch", "1", "--seq", "64", "--memory", "chunked_head"]
    )
    out = io.StringIO()
    assert run_estimate(args, out) == 0
    text = out.getvalue()
    assert "chunked_head" in text and "peft" in text and "lowest" not in text.split("PEAK")[0]


def test_cli_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    args = _parser().parse_args(["estimate", "--config", str(bad)])
    with pytest.raises(ConfigError, match="not valid JSON"):
        run_estimate(args, io.StringIO())


# --------------------------------------------------------------------------- speed


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "limit_s"), [(LLAMA_8B, 60.0), (LLAMA_70B, 180.0)], ids=["8b", "70b"])
def test_speed_and_memory(shape: dict[str, Any], limit_s: float) -> None:
    """Every row of an 8B (70B) estimate in under a minute (three) on 2 cores, in well under 2 GB.

    Timed in CPU seconds of this process, so that other work on a shared machine does not count
    (the simulation runs on one thread: fake tensors compute nothing).
    """
    import resource

    started, wall = time.process_time(), time.perf_counter()
    result = estimate(_config(shape))
    elapsed = time.process_time() - started
    assert elapsed < limit_s, (elapsed, time.perf_counter() - wall)
    assert [r.variant for r in result.rows] == list(DEFAULT_VARIANTS)
    assert math.isfinite(result.rows[0].peak_bytes)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_rss < 2 * 10**9


# --------------------------------------------------------------------------- other threads


def test_an_estimate_changes_nothing_for_a_training_step_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """While an estimate is in the middle of its simulated step (held there), another thread runs a real
    offload training step (``force_copy=True`` on the CPU) on a packed batch under CPU autocast: its
    mask helpers, its autocast answers and its offload copies are the real ones, and its gradients are
    those of the same step run alone; the estimate made meanwhile equals the one made alone."""
    import threading

    from transformers import masking_utils

    import kbitprep
    from kbitprep._memory import OffloadHooks, state_of
    from kbitprep.app import estimate_sim

    from .test_memory_modes import _train_step, _unfreeze_some
    from .tiny import tiny_llama

    cfg = _config(dict(TINY, num_hidden_layers=1))
    kwargs: dict[str, Any] = {"batch": 1, "seq": 32, "variants": ["offload"]}
    alone = estimate(cfg, **kwargs).to_dict()

    # a packed batch: each row holds two sequences (the position ids restart), so the mask differs
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(20), torch.arange(20)]).expand(2, -1)
    train_batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": position_ids}

    host_copies: list[tuple[type, int]] = []

    class CountingHooks(OffloadHooks):
        def copy_to_host(self, src: torch.Tensor) -> tuple[Any, Any]:
            host, done = super().copy_to_host(src)
            host_copies.append((type(host), host.untyped_storage().nbytes()))
            return host, done

    def offload_model() -> torch.nn.Module:
        model = tiny_llama(torch.float32)
        kbitprep.prepare(model, memory="offload", checkpointing="reentrant")
        _unfreeze_some(model)
        state = state_of(model)
        assert state is not None
        state.offloader = CountingHooks(min_bytes=1024, force_copy=True)
        return model

    reference = tiny_llama(torch.float32)
    kbitprep.prepare(reference, checkpointing="reentrant")
    _unfreeze_some(reference)
    ref_loss, ref_grads, _ = _train_step(reference, train_batch)

    inside, release = threading.Event(), threading.Event()
    real_dispatch = estimate_sim.StepTracker.__torch_dispatch__

    def held_dispatch(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not inside.is_set() and threading.current_thread() is not threading.main_thread():
            inside.set()
            assert release.wait(120), "the training thread did not finish"
        return real_dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(estimate_sim.StepTracker, "__torch_dispatch__", held_dispatch)
    during: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run_estimate_thread() -> None:
        try:
            during["estimate"] = estimate(cfg, **kwargs).to_dict()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            inside.set()

    worker = threading.Thread(target=run_estimate_thread)
    worker.start()
    try:
        assert inside.wait(300), "the estimate never reached its simulated step"
        assert not errors, errors
        # the main thread trains while the estimate is held in the middle of its simulated step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            during["autocast"] = torch.is_autocast_enabled()  # CUDA's flag: no CUDA autocast here
        packed = masking_utils.find_packed_sequence_indices(position_ids)
        during["packed"] = packed is not None and bool((packed[:, -1] == 1).all())
        loss, grads, _ = _train_step(offload_model(), train_batch)
    finally:
        release.set()
        worker.join(300)
    assert not errors, errors
    assert during["autocast"] is False
    assert during["packed"] is True
    assert host_copies and all(kind is torch.Tensor for kind, _ in host_copies), host_copies
    assert sum(n for _, n in host_copies) >= 2 * 2 * 40 * 64 * 4  # each layer's fp32 input, 2 x 40 x 64
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert torch.equal(grads[name], g), name
    for result in (during["estimate"],):
        result.pop("seconds")
    alone.pop("seconds")
    assert during["estimate"] == alone


def test_mask_wrappers_are_installed_once_and_answer_as_the_originals_outside_an_estimate() -> None:
    from transformers import masking_utils

    from kbitprep.app import estimate_sim

    estimate_sim._install_mask_wrappers()
    first = masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa
    estimate_sim._install_mask_wrappers()
    assert (masking_utils.find_packed_sequence_indices, masking_utils._ignore_causal_mask_sdpa) == first
    for wrapper in first:
        assert getattr(wrapper, "_kbitprep_wrapper", False)
        assert not getattr(wrapper.__wrapped__, "_kbitprep_wrapper", False)  # one layer, around the original
    packed = torch.cat([torch.arange(3), torch.arange(5)])[None]
    assert masking_utils.find_packed_sequence_indices(packed).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    with estimate_sim._simulation_patches("cuda"):
        assert masking_utils.find_packed_sequence_indices(packed) is None
    assert masking_utils.find_packed_sequence_indices(packed) is not None
