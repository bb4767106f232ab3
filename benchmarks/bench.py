#!/usr/bin/env python
"""kbitprep side by side with ``peft.prepare_model_for_kbit_training``.

The same quantized model is prepared with PEFT's function and with each kbitprep policy / memory
mode, in one run, every variant in its own process (for clean memory figures); LoRA is attached
after prepare and a few AdamW steps are run on identical data with identical seeds. Reported per
variant, with ratios to PEFT's row of the same model and backend: parameter bytes after prepare,
peak training memory, median step time, prepare() time, and the per-step loss difference.

Modes::

    python benchmarks/bench.py --quick     # CPU, tiny model, bnb 4-bit + torchao int8 (1-2 minutes on 2 cores)
    python benchmarks/bench.py --cpu       # CPU, tiny and ~100M-parameter Llama-style models
    python benchmarks/bench.py --trl       # CPU, 128k vocabulary: plain loop beside TRL's fused head (SFTTrainer's)
    python benchmarks/bench.py --cuda      # GPU only: Llama-3.2-1B / Llama-3.1-8B architectures, bnb nf4
    python benchmarks/bench.py --cuda --dry-run   # check the CUDA setup (configs, sizes, commands) anywhere

Peak memory: on CPU the peak resident set size of the variant's process while training (the
kernel's high-water mark is reset after the model is loaded and prepared, so loading does not
count); on CUDA ``torch.cuda.max_memory_allocated`` over the training steps (weights included), reported
beside ``torch.cuda.max_memory_reserved`` and the peak pinned host memory (offload's copies live there).
Results go to ``--out`` (default ``benchmarks/results/``) as ``<mode>.json`` and ``<mode>.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

# --------------------------------------------------------------------------- what is measured

#: Llama-style model shapes. ``cuda-*`` are the real architectures, with random weights.
MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "llama-100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    # the shape of the side-by-side with TRL's trainers: a 128k vocabulary makes the head the largest activation
    "llama-128k": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}

#: Quantization backends: how the saved bf16 model is reloaded.
BACKENDS: dict[str, str] = {
    "bnb-nf4": "bitsandbytes 4-bit NF4, double quantization, bf16 compute (BitsAndBytesConfig)",
    "torchao-int8": "torchao int8 weight-only (TorchAoConfig(Int8WeightOnlyConfig()))",
}

#: The variants: how the loaded model is prepared. ``kind`` is "peft" or "kbitprep" (+ keywords).
VARIANTS: dict[str, dict[str, Any]] = {
    "peft": {"kind": "peft", "label": "peft.prepare_model_for_kbit_training (defaults)"},
    "dropin": {"kind": "dropin", "label": "kbitprep.prepare_model_for_kbit_training (drop-in)"},
    "default": {"kind": "kbitprep", "kw": {}, "label": "kbitprep.prepare() default (backend's upcast, no fp32 copies)"},
    "norms": {"kind": "kbitprep", "kw": {"upcast": "norms"}, "label": "kbitprep upcast='norms'"},
    "all": {"kind": "kbitprep", "kw": {"upcast": "all"}, "label": "kbitprep upcast='all' (PEFT's dtypes)"},
    "non-reentrant": {
        "kind": "kbitprep",
        "kw": {"checkpointing": "non_reentrant"},
        "label": "kbitprep default, non-reentrant checkpointing",
    },
    "chunked-head": {
        "kind": "kbitprep",
        "kw": {"memory": "chunked_head"},
        "label": "kbitprep memory='chunked_head' (256-token chunks)",
    },
    "offload": {"kind": "kbitprep", "kw": {"memory": "offload"}, "label": "kbitprep memory='offload'"},
    "lowest": {
        "kind": "kbitprep",
        "kw": {"memory": "lowest"},
        "label": "kbitprep memory='lowest' (no upcast + reentrant + chunked head + offload)",
    },
}

# The same preparations, trained the way TRL's trainers (SFTTrainer, DPOTrainer, GRPOTrainer, KTOTrainer) compute
# their loss: the causal LM patched with trl.trainer.utils.add_fused_lm_head (as SFTTrainer does, with its outputs),
# called with fused_lm_head=True. With kbitprep's chunked head, kbitprep's head serves those calls on CPU and TRL's
# on CUDA (kbitprep._memory.trl_fused.FUSED_HEAD_BY_DEVICE); the rows record which head ran (head_calls).
_TRL_BASES = ("peft", "default", "chunked-head", "lowest")
for _base in _TRL_BASES:
    VARIANTS[f"trl-{_base}"] = {
        **VARIANTS[_base],
        "stack": "trl",
        "label": VARIANTS[_base]["label"] + ", trained through TRL's fused head (fused_lm_head=True)",
    }
TRL_VARIANTS = [f"trl-{b}" for b in _TRL_BASES]

KNOWN: dict[str, dict[str, Any]] = {"models": MODELS, "backends": BACKENDS, "variants": VARIANTS}

#: The benchmark modes.
MODES: dict[str, dict[str, Any]] = {
    "cpu-quick": {
        "device": "cpu",
        "models": ["tiny"],
        "backends": ["bnb-nf4", "torchao-int8"],
        "variants": ["peft", "default", "chunked-head", "lowest"],
        "batch": 2,
        "seq": 128,
        "steps": 3,
        "jobs": 2,
        "threads": 1,
        "timeout": 300,
    },
    "cpu": {
        "device": "cpu",
        "models": ["tiny", "llama-100m"],
        "backends": ["bnb-nf4", "torchao-int8"],
        "variants": ["peft", "dropin", "default", "norms", "all", "non-reentrant", "chunked-head", "offload", "lowest"],
        "batch": 2,
        "seq": 128,
        "steps": 4,
        "jobs": 1,
        "threads": 0,
        "timeout": 3600,
        # bf16 matmuls run without hardware support on many CPUs (50x slower than fp32 on AVX2-only ones):
        # the ~100M model gets fewer tokens, steps and variants (offload is a no-op on CPU anyway)
        "per_model": {
            "llama-100m": {
                "batch": 1,
                "seq": 128,
                "steps": 3,
                "variants": ["peft", "default", "norms", "chunked-head", "lowest"],
            }
        },
    },
    "trl": {
        "device": "cpu",
        "models": ["llama-128k"],
        "backends": ["bnb-nf4"],
        "variants": [*_TRL_BASES, *TRL_VARIANTS],
        "batch": 2,
        "seq": 512,
        "steps": 3,
        "jobs": 1,
        "threads": 0,
        "timeout": 3600,
    },
    "cuda": {
        "device": "cuda",
        "models": ["llama-3.2-1b", "llama-3.1-8b"],
        "backends": ["bnb-nf4"],
        "variants": ["peft", "default", "chunked-head", "offload", "lowest", *TRL_VARIANTS],
        "batch": 4,
        "seq": 1024,
        "steps": 8,
        "jobs": 1,
        "threads": 0,
        "timeout": 1800,
    },
}

MMAP_THRESHOLD = 65536
LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LEARNING_RATE = 1e-4
SEED = 1234
IGNORED_PREFIX = 8  # the first tokens of every row get label -100 (exercises ignore_index)


# --------------------------------------------------------------------------- child processes


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _rss_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (Linux), or -1."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _config(model: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**MODELS[model])


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Build a model with random weights from its config (bf16), save it, report its size.

    Saved in bf16 whatever the compute dtype: an fp16 run reloads it in fp16 (same random draws).
    """
    import torch
    from transformers import LlamaForCausalLM

    _quiet()
    cfg = _config(spec["model"])
    torch.manual_seed(SEED)
    device = "cuda" if spec["device"] == "cuda" else "cpu"
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(spec["path"])
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": n, "seconds": time.perf_counter() - started}


def _load(spec: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    from kbitprep.app.metaplan import SCHEMES

    # the loading recipe each backend plugin declares with its scheme
    scheme = {"bnb-nf4": "bnb-4bit", "torchao-int8": "torchao-int8"}.get(spec["backend"])
    if scheme is None:
        raise SystemExit(f"unknown backend {spec['backend']!r}; known: {', '.join(BACKENDS)}")
    build = SCHEMES[scheme].quantization_config
    qc: Any = build(_dtype(spec))
    kwargs: dict[str, Any] = {"quantization_config": qc, "dtype": _dtype(spec)}
    if spec["device"] == "cuda":
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(spec["path"], **kwargs)


def _dtype(spec: dict[str, Any]) -> Any:
    """The compute dtype: the dtype non-quantized weights are loaded in, bnb computes in, and autocast uses."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[spec.get("compute", "bf16")]


def _param_bytes(model: Any) -> int:
    from kbitprep._tensors import tensor_nbytes

    return sum(tensor_nbytes(p) for p in {id(p): p for p in model.parameters()}.values())


def _batch(step: int, vocab: int, batch: int, seq: int, device: str) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(SEED + step)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, :IGNORED_PREFIX] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def child_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, prepare one way, attach LoRA, train ``steps`` steps; measure."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import peft

    import kbitprep

    _quiet()
    cuda = spec["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA mode needs a GPU")
    variant = VARIANTS[spec["variant"]]
    out: dict[str, Any] = {"rss_after_imports": _rss_status("VmRSS")}
    model = _load(spec)
    out["param_bytes_before"] = _param_bytes(model)
    if variant["kind"] != "peft":
        # plugin discovery is a one-time cost of the process (like importing peft): not part of prepare()
        t0 = time.perf_counter()
        kbitprep.backends()
        out["registry_load_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    if variant["kind"] == "peft":
        model = peft.prepare_model_for_kbit_training(model)
    elif variant["kind"] == "dropin":
        model = kbitprep.prepare_model_for_kbit_training(model)
    else:
        kw = dict(variant["kw"])
        if spec.get("force_backend"):
            kw.update(backend=spec["force_backend"], allow_mismatch=True)
        model = kbitprep.prepare(model, **kw)
    if cuda:
        torch.cuda.synchronize()
    out["prepare_s"] = time.perf_counter() - started
    out["param_bytes_after"] = _param_bytes(model)
    if variant["kind"] != "peft":
        plan = kbitprep.report(model).plan
        out["kbitprep"] = {
            "backend": plan.backend,
            "forced": plan.forced,
            "upcast_policy": plan.upcast_policy,
            "checkpointing": plan.checkpointing.value,
            "memory": plan.to_dict(params=False)["extras"].get("memory"),
            "steps": list(kbitprep.report(model).steps),
        }
    dtypes: dict[str, int] = {}
    for p in {id(p): p for p in model.parameters()}.values():
        key = str(p.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    out["param_dtypes"] = dtypes

    torch.manual_seed(SEED)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    fused: dict[str, Any] = {}
    if variant.get("stack") == "trl":
        from trl.trainer.utils import add_fused_lm_head

        from kbitprep._memory.trl_fused import SFT_OUTPUTS

        # what SFTTrainer does: patch the causal LM under the PEFT model, then call with fused_lm_head=True
        add_fused_lm_head(model.get_base_model(), outputs=SFT_OUTPUTS)
        fused = {"fused_lm_head": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["lora_params"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    model.train()
    vocab = model.config.vocab_size
    device = "cuda" if cuda else "cpu"
    batches = [_batch(s, vocab, spec["batch"], spec["seq"], device) for s in range(spec["steps"])]

    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
        out["allocated_before_train"] = torch.cuda.memory_allocated()
        out["reserved_before_train"] = torch.cuda.memory_reserved()
    else:
        out["rss_before_train"] = _rss_status("VmRSS")
        out["peak_reset"] = _reset_peak_rss()
    losses: list[float] = []
    times: list[float] = []
    logits_none = []
    dtype = _dtype(spec)
    # fp16 needs loss scaling (what Trainer's fp16=True does); bf16 does not
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    for b in batches:
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype):
            result = model(**b, **fused)
        scaler.scale(result.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(result.loss.detach()))
        logits_none.append(getattr(result, "logits", None) is None)
        del result
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        # what the device really had to hold: a block freed with record_stream (offload's copy-outs) is
        # reused only after its copy ended, so allocated flatters offload; reserved does not
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["pinned_host_bytes"] = _pinned_host_peak(torch)
    else:
        out["peak_bytes"] = _rss_status("VmHWM")
    out["losses"] = losses
    out["step_s"] = times
    out["step_s_median"] = statistics.median(times[1:] if len(times) > 1 else times)
    out["logits_none"] = all(logits_none)
    if variant["kind"] == "kbitprep":
        from kbitprep._memory import memory_modes

        out["memory_stats"] = memory_modes(model)
        if cuda:
            # the offload copies' own count (bytes held at most), beside the pinned pool torch reports
            out["offload_host_bytes"] = out["memory_stats"]["peak_host_bytes"]
    return out


def _pinned_host_peak(torch: Any) -> int | None:
    """Peak bytes of torch's pinned host memory pool over the training steps (None where torch cannot say)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    try:
        return int(stats().get("allocated_bytes.peak", 0))
    except (RuntimeError, AttributeError):
        return None


def _child_main(argv: list[str]) -> int:
    what, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = child_build(spec) if what == "build" else child_variant(spec)
        result["error"] = None
    except BaseException as exc:  # reported in the table, not hidden
        import traceback

        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    Path(out_path).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the parent


def _run_child(what: str, spec: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    name = f"{what}-{spec.get('model')}-{spec.get('backend', '')}-{spec.get('variant', '')}"
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p)
    env.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if spec.get("device") == "cpu":
        # glibc returns blocks of 64 KiB and more to the system as soon as they are freed, so the RSS peak
        # follows the live tensors instead of the allocator's fragmentation (which differs run to run)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", what, str(spec_path), str(out_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - started}
    if out_path.exists():
        result: dict[str, Any] = json.loads(out_path.read_text())
    else:
        result = {"error": f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"}
    result["wall_s"] = time.perf_counter() - started
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _loss_diff(a: list[float] | None, b: list[float] | None) -> dict[str, float] | None:
    if not a or not b or len(a) != len(b):
        return None
    abs_d = [abs(x - y) for x, y in zip(a, b)]
    rel_d = [abs(x - y) / abs(y) if y else float("inf") for x, y in zip(a, b)]
    return {"max_abs": max(abs_d), "max_rel": max(rel_d), "first_abs": abs_d[0]}


def compare(runs: dict[str, dict[str, Any]]) -> None:
    """Add ratios to PEFT (and the chunked-head / offload vs default loss differences) in place."""
    for run in runs.values():
        peft_run = runs.get(f"{run['model']}/{run['backend']}/peft")
        default_run = runs.get(f"{run['model']}/{run['backend']}/default")
        base = peft_run if peft_run and not peft_run.get("error") else None
        if run.get("error"):
            continue
        run["vs_peft"] = (
            None
            if base is None
            else {
                "param_bytes_after": _ratio(run["param_bytes_after"], base["param_bytes_after"]),
                "peak_bytes": _ratio(run["peak_bytes"], base["peak_bytes"]),
                **(
                    {"peak_reserved_bytes": _ratio(run["peak_reserved_bytes"], base["peak_reserved_bytes"])}
                    if run.get("peak_reserved_bytes") and base.get("peak_reserved_bytes")
                    else {}
                ),
                "step_s_median": _ratio(run["step_s_median"], base["step_s_median"]),
                "prepare_s": _ratio(run["prepare_s"], base["prepare_s"]),
                "loss": _loss_diff(run["losses"], base["losses"]),
            }
        )
        if default_run and not default_run.get("error") and run["variant"] != "default":
            run["loss_vs_default"] = _loss_diff(run["losses"], default_run["losses"])


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables, one per model and backend."""
    meta = result["meta"]
    peak_label = "peak RSS (training)" if meta["device"] == "cpu" else "peak allocated"
    lines = [
        f"# kbitprep vs PEFT: `{meta['mode']}`",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- setup: LoRA r={LORA['r']} on all linear layers (attached after prepare), AdamW (lr {LEARNING_RATE}), "
        f"{meta.get('compute', 'bf16')} autocast, seed {SEED}, labels = inputs with the first {IGNORED_PREFIX} "
        "tokens of a row ignored; "
        "one process per variant, run one after another"
        if meta.get("jobs", 1) == 1
        else f"- setup: LoRA r={LORA['r']} on all linear layers (attached after prepare), AdamW (lr {LEARNING_RATE}), "
        f"{meta.get('compute', 'bf16')} autocast, seed {SEED}, labels = inputs with the first {IGNORED_PREFIX} "
        "tokens of a row ignored; "
        f"one process per variant, {meta['jobs']} at a time",
        f"- peak memory: {meta['peak']}",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in result["runs"].values():
        groups.setdefault((run["model"], run["backend"]), []).append(run)
    for (model, backend), runs in groups.items():
        info = result["models"].get(model, {})
        lines.append(f"## {model} ({info.get('params', 0) / 1e6:.1f} M parameters), {backend}")
        lines.append("")
        lines.append(
            f"{BACKENDS[backend]}; batch {info.get('batch')} x {info.get('seq')} tokens, {info.get('steps')} steps."
        )
        lines.append("")
        cuda = meta["device"] == "cuda"
        extra_head = " peak reserved | x PEFT | pinned host (peak) |" if cuda else ""
        lines.append(
            f"| variant | params after prepare | x PEFT | {peak_label} | x PEFT |{extra_head} step (median) | x PEFT "
            "| prepare() | max abs loss diff vs PEFT | max rel |"
        )
        lines.append("|---|---|---|---|---|" + ("---|---|---|" if cuda else "") + "---|---|---|---|---|")
        for run in runs:
            if run.get("error"):
                blanks = " |" * (12 if cuda else 9)
                lines.append(f"| {run['variant']} | error: {run['error'][:160]}{blanks}")
                continue
            vs = run.get("vs_peft") or {}
            loss = vs.get("loss") or {}
            extra = (
                " {} | {} | {} |".format(
                    _fmt_bytes(run.get("peak_reserved_bytes")),
                    _fmt_ratio(vs.get("peak_reserved_bytes")),
                    _fmt_bytes(run.get("pinned_host_bytes")),
                )
                if cuda
                else ""
            )
            lines.append(
                "| {v} | {pb} | {pbr} | {pk} | {pkr} |{extra} {st:.3f} s | {str_} | {pr:.1f} ms | {la} | {lr} |".format(
                    extra=extra,
                    v=run["variant"],
                    pb=_fmt_bytes(run["param_bytes_after"]),
                    pbr=_fmt_ratio(vs.get("param_bytes_after")),
                    pk=_fmt_bytes(run["peak_bytes"]),
                    pkr=_fmt_ratio(vs.get("peak_bytes")),
                    st=run["step_s_median"],
                    str_=_fmt_ratio(vs.get("step_s_median")),
                    pr=run["prepare_s"] * 1000,
                    la="-" if not loss else f"{loss['max_abs']:.2e}",
                    lr="-" if not loss else f"{loss['max_rel']:.2e}",
                )
            )
        lines.append("")
        for run in runs:
            d = run.get("loss_vs_default")
            if d and run["variant"] in ("chunked-head", "offload", "lowest"):
                lines.append(
                    f"- {run['variant']} vs default: max abs loss diff {d['max_abs']:.2e} "
                    f"(first step {d['first_abs']:.2e}); logits returned: "
                    f"{'None (chunked head)' if run.get('logits_none') else 'yes'}"
                )
        lines.append("")
    lines.append("Variants: " + "; ".join(f"`{k}` = {VARIANTS[k]['label']}" for k in result["variants"]))
    lines.append("")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kbitprep", "torch", "transformers", "peft", "bitsandbytes", "torchao"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def _machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {mem / 2**30:.0f} GiB RAM, Python {platform.python_version()}"
    if device == "cuda":
        try:
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            text += f", GPU: {gpu}"
        except (OSError, subprocess.SubprocessError):
            text += ", GPU: unknown"
    return text


def _model_conf(conf: dict[str, Any], model: str, overridden: set[str]) -> dict[str, Any]:
    """batch / seq / steps / variants for one model: the mode's, its per-model ones, then the command line's."""
    mc = {k: conf[k] for k in ("batch", "seq", "steps", "variants")}
    for key, value in conf.get("per_model", {}).get(model, {}).items():
        if key not in overridden:
            mc[key] = value
    if "peft" not in mc["variants"]:
        mc["variants"] = ["peft", *mc["variants"]]
    return mc


def _cuda_available() -> bool:
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "True"


def dry_run(mode: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Check a mode's setup without running it: configs on the meta device, sizes, the commands."""
    import torch
    from transformers import LlamaForCausalLM

    report: dict[str, Any] = {"mode": mode, "models": {}, "children": []}
    for model in conf["models"]:
        cfg = _config(model)
        with torch.device("meta"):
            m = LlamaForCausalLM(cfg)
        params = {id(p): p for p in m.parameters()}.values()
        n = sum(p.numel() for p in params)
        linear = sum(
            mod.weight.numel()
            for name, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
        )
        other = n - linear
        report["models"][model] = {
            "params": n,
            "bf16_bytes": 2 * n,
            # nf4: 0.5 byte a weight (+ absmax, not a parameter); PEFT upcasts the rest to fp32
            "nf4_param_bytes_no_upcast": linear // 2 + 2 * other,
            "nf4_param_bytes_peft_upcast": linear // 2 + 4 * other,
            "logits_bytes_fp32": conf["batch"] * conf["seq"] * cfg.vocab_size * 4,
        }
        for backend in conf["backends"]:
            for variant in conf["variants"]:
                report["children"].append(f"{model} / {backend} / {variant}: {VARIANTS[variant]['label']}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU, tiny model, two backends, four variants")
    mode.add_argument("--cpu", action="store_true", help="CPU, tiny and ~100M models (the default without a GPU)")
    mode.add_argument("--cuda", action="store_true", help="GPU: Llama-3.2-1B and Llama-3.1-8B architectures")
    mode.add_argument(
        "--trl", action="store_true", help="CPU, 128k vocabulary: plain loop and TRL's fused head side by side"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <mode>.json and <mode>.md")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--backends", help=f"comma-separated subset of {', '.join(BACKENDS)}")
    parser.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, help="training steps per variant")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--jobs", type=int, help="variants run at the same time (1 for clean timings)")
    parser.add_argument("--threads", type=int, help="torch threads per variant (0: torch's default)")
    parser.add_argument(
        "--compute",
        choices=("bf16", "fp16"),
        default="bf16",
        help="compute dtype: weights loaded in it, bnb compute dtype, autocast (fp16 with loss scaling)",
    )
    parser.add_argument("--force-backend", help="force this kbitprep backend (allow_mismatch=True); for testing")
    parser.add_argument("--dry-run", action="store_true", help="check the setup (no model is built or trained)")
    args = parser.parse_args(argv)

    name = "cpu-quick" if args.quick else "cuda" if args.cuda else "trl" if args.trl else "cpu"
    conf = dict(MODES[name])
    for key in ("models", "backends", "variants"):
        value = getattr(args, key)
        if value:
            chosen = [v.strip() for v in value.split(",") if v.strip()]
            known = list(KNOWN[key])
            bad = [v for v in chosen if v not in known]
            if bad:
                parser.error(f"unknown {key}: {', '.join(bad)} (known: {', '.join(known)})")
            conf[key] = chosen
    overridden: set[str] = set()
    for key in ("steps", "batch", "seq", "jobs", "threads"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
            overridden.add(key)
    if args.variants:
        overridden.add("variants")
    if "peft" not in conf["variants"]:
        conf["variants"] = ["peft", *conf["variants"]]

    if args.dry_run:
        print(json.dumps(dry_run(name, conf), indent=2))
        return 0
    if conf["device"] == "cuda" and not _cuda_available():
        print("CUDA mode needs a GPU; none is available here (use --dry-run to check the setup)", file=sys.stderr)
        return 2

    command = "python benchmarks/bench.py " + " ".join(argv)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {
            "mode": name,
            "device": conf["device"],
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": _machine(conf["device"]),
            "command": command.strip(),
            "versions": _versions(),
            "batch": conf["batch"],
            "seq": conf["seq"],
            "steps": conf["steps"],
            "lora": LORA,
            "lr": LEARNING_RATE,
            "seed": SEED,
            "jobs": conf["jobs"],
            "threads": conf["threads"],
            "compute": args.compute,
            "peak": "VmHWM of the variant's process, reset after load+prepare+LoRA (training only), "
            f"with MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', MMAP_THRESHOLD)}"
            if conf["device"] == "cpu"
            else "torch.cuda.max_memory_allocated over the training steps; beside it torch.cuda.max_memory_reserved "
            "(blocks an offload copy still reads are not reusable: allocated flatters offload) and the peak of "
            "torch's pinned host memory pool (torch.cuda.host_memory_stats), where offload keeps its copies",
            "forced_backend": args.force_backend,
        },
        "variants": conf["variants"],
        "models": {},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="kbitprep-bench-") as tmp:
        work = Path(tmp)
        for model in conf["models"]:
            path = work / model
            built = _run_child(
                "build", {"model": model, "device": conf["device"], "path": str(path)}, work, conf["timeout"]
            )
            result["models"][model] = {"config": MODELS[model], **{k: v for k, v in built.items() if k != "traceback"}}
            mc = _model_conf(conf, model, overridden)
            result["models"][model].update({k: mc[k] for k in ("batch", "seq", "steps")})
            jobs = []
            for backend in conf["backends"]:
                for variant in mc["variants"]:
                    spec = {
                        "model": model,
                        "backend": backend,
                        "variant": variant,
                        "path": str(path),
                        "device": conf["device"],
                        "batch": mc["batch"],
                        "seq": mc["seq"],
                        "steps": mc["steps"],
                        "compute": args.compute,
                        "threads": conf["threads"],
                        "force_backend": args.force_backend,
                    }
                    jobs.append(spec)
            if built.get("error"):
                for spec in jobs:
                    key = f"{model}/{spec['backend']}/{spec['variant']}"
                    result["runs"][key] = {
                        "model": model,
                        "backend": spec["backend"],
                        "variant": spec["variant"],
                        "error": f"model build failed: {built['error']}",
                    }
                continue

            def run_one(spec: dict[str, Any]) -> dict[str, Any]:
                out = _run_child("variant", spec, work, conf["timeout"])
                status = out.get("error") or f"peak {_fmt_bytes(out.get('peak_bytes'))}, loss {out['losses'][-1]:.4f}"
                print(
                    f"[{time.perf_counter() - started:7.1f} s] {spec['model']}/{spec['backend']}/{spec['variant']}: "
                    f"{status}",
                    file=sys.stderr,
                    flush=True,
                )
                return out

            with ThreadPoolExecutor(max_workers=max(1, conf["jobs"])) as pool:
                outs = list(pool.map(run_one, jobs))
            for spec, out in zip(jobs, outs):
                key = f"{model}/{spec['backend']}/{spec['variant']}"
                result["runs"][key] = {"model": model, "backend": spec["backend"], "variant": spec["variant"], **out}
    compare(result["runs"])
    result["meta"]["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = name if args.compute == "bf16" else f"{name}-{args.compute}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
