"""Worker for the 2-process tests, run by ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU).

Usage: ``dist_worker.py --model-dir DIR --out DIR --scenarios ddp,fsdp1,... [--steps N] [--device cuda]``
(``--device cuda``: NCCL, one GPU per rank; written for the ``gpu``-marked test, not run on CPU CI).

Every scenario loads a real bitsandbytes 4-bit tiny Llama from ``--model-dir``, prepares it with
kbitprep, attaches LoRA adapters (same seed on every rank) and trains ``--steps`` AdamW steps on
a global batch of 4 sequences split between the ranks. Before that, each rank trains the same
model without any distribution on the whole global batch: the reference the distributed run
must reproduce. Each rank writes ``<scenario>-rank<r>.json`` with the per-step losses (its own
and the global mean), the reference losses, a SHA-256 digest of the full adapter tensors after
training, their distance to the reference adapters, what kbitprep planned, the checkpointing
state, the warnings seen and any error. The pytest side (``test_distributed.py``) asserts on them.

Scenarios:
    ddp                  kbitprep defaults, ``DistributedDataParallel(find_unused_parameters=False)``
    ddp-trainer          transformers ``Trainer`` under torchrun (DDP via accelerate), arguments from
                         ``kbitprep.training_arguments_for`` with ``gradient_checkpointing=True``
    fsdp1                ``bnb_4bit_quant_storage=bf16``, ``prepare(fsdp=1)``, bf16 adapters,
                         ``FullyShardedDataParallel(use_orig_params=True)`` per decoder layer
    fsdp2                ``bnb_4bit_quant_storage=bf16``, FSDP detected from accelerate's environment
                         variables, fp32 adapters, ``fully_shard`` per decoder layer and the root
    fsdp2-uint8          as fsdp2 with the default uint8 storage (kbitprep warns; FSDP2 accepts it)
    fsdp1-peft-upcast    PEFT's rules (the drop-in, fp32 upcast) then FSDP1: expected to fail with
                         "Must flatten tensors with uniform dtype"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import kbitprep  # noqa: E402
from kbitprep import checkpointing_status, training_arguments_for  # noqa: E402
from tests.integrations.common import learnable_ids, load_bnb_4bit, lora_config  # noqa: E402

FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
LR = 1e-2
DEVICE = torch.device("cpu")


def global_batch() -> torch.Tensor:
    """4 sequences from 3 different patterns; rank r trains on rows 2r and 2r+1."""
    ids = learnable_ids()
    return torch.tensor([ids[0], ids[4], ids[8], ids[1]], device=DEVICE)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 copies of the LoRA tensors, names without FSDP/DDP wrapper prefixes."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor: a collective, same order on every rank
            t = t.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "").removeprefix("module.")] = t.float().cpu().clone()
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def build(
    storage: torch.dtype, prepare: Callable[[nn.Module], nn.Module], adapters_fp32: bool, model_dir: str
) -> tuple[nn.Module, nn.Module]:
    """(prepared base, PEFT model); adapters initialised from the same seed on every rank."""
    from peft import get_peft_model

    base = prepare(load_bnb_4bit(model_dir, storage, None if DEVICE.type == "cpu" else str(DEVICE)))
    torch.manual_seed(1234)
    peft_model = get_peft_model(base, lora_config(), autocast_adapter_dtype=adapters_fp32)
    return base, peft_model


def train(model: nn.Module, batch: torch.Tensor, steps: int, all_reduce: bool) -> tuple[list[float], list[float]]:
    """AdamW steps; returns (local losses, global mean losses)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    local, glob = [], []
    for _ in range(steps):
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.detach().float().clone()
        local.append(float(loss))
        if all_reduce:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        glob.append(float(loss))
    return local, glob


def plan_summary(base: nn.Module) -> dict[str, Any]:
    plan = kbitprep.report(base).plan
    return {
        "backend": plan.backend,
        "upcast_policy": plan.upcast_policy,
        "upcast": len(plan.to_upcast),
        "checkpointing": plan.checkpointing.value,
        "checkpointing_note": plan.checkpointing_note,
        "fsdp": dict(plan.extras.get("fsdp", {})),
        "notes": list(plan.notes),
    }


SPECS: dict[str, dict[str, Any]] = {
    "ddp": {"storage": torch.uint8, "prepare": {}, "adapters_fp32": True},
    "fsdp1": {"storage": torch.bfloat16, "prepare": {"fsdp": 1}, "adapters_fp32": False},
    "fsdp2": {"storage": torch.bfloat16, "prepare": {}, "env": FSDP_ENV, "adapters_fp32": True},
    "fsdp2-uint8": {"storage": torch.uint8, "prepare": {}, "env": FSDP_ENV, "adapters_fp32": True},
}


def wrap(scenario: str, model: nn.Module) -> nn.Module:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if scenario == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = None if DEVICE.type == "cpu" else [DEVICE.index]
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    if scenario.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            use_orig_params=True,
            device_id=DEVICE,
        )
    from torch.distributed.fsdp import fully_shard

    for mod in model.modules():
        if isinstance(mod, LlamaDecoderLayer):
            fully_shard(mod)
    fully_shard(model)
    return model


def full_adapters(scenario: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if scenario.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return lora_tensors(model)
    return lora_tensors(model)


def run_training_scenario(scenario: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    spec = SPECS[scenario]
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch()
    shard = batch[rank * 2 : rank * 2 + 2]

    def prepare(m: nn.Module) -> nn.Module:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            kbitprep.prepare(m, **spec["prepare"])
        result["prepare_warnings"] = [
            f"{w.category.__name__}: {w.message}" for w in seen if issubclass(w.category, kbitprep.KbitprepWarning)
        ]
        return m

    with environment(spec.get("env", {})):
        ref_base, ref_model = build(spec["storage"], prepare, spec["adapters_fp32"], args.model_dir)
        result["plan"] = plan_summary(ref_base)
        result["adapter_dtypes"] = sorted({str(p.dtype) for n, p in ref_model.named_parameters() if "lora_" in n})
        start = lora_tensors(ref_model)
        ref_model.train()
        _, result["ref_losses"] = train(ref_model, batch, args.steps, all_reduce=False)
        ref = lora_tensors(ref_model)
        del ref_model, ref_base

        _base, model = build(spec["storage"], prepare, spec["adapters_fp32"], args.model_dir)
    assert digest(lora_tensors(model)) == digest(start), "adapter init differs from the reference run"
    model.train()
    wrapped = wrap(scenario, model)
    result["wrapped"] = type(wrapped).__name__
    result["local_losses"], result["global_losses"] = train(wrapped, shard, args.steps, all_reduce=True)
    trained = full_adapters(scenario, wrapped)
    result["adapter_digest"] = digest(trained)
    result["adapters"] = len(trained)
    result["adapters_changed"] = sum(not torch.equal(trained[n], start[n]) for n in trained)
    result["max_update_ref"] = max(float((ref[n] - start[n]).abs().max()) for n in ref)
    result["max_diff_vs_ref"] = max(float((trained[n] - ref[n]).abs().max()) for n in ref)
    moved = torch.cat([(ref[n] - start[n]).flatten() for n in sorted(ref)])
    off = torch.cat([(trained[n] - ref[n]).flatten() for n in sorted(ref)])
    result["rel_diff_vs_ref"] = float(off.norm() / moved.norm())
    result["checkpointing"] = checkpointing_status(model).to_dict()
    result["world"] = world


def run_trainer_scenario(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    base, model = build(torch.uint8, kbitprep.prepare, True, args.model_dir)
    start = lora_tensors(model)
    ids = learnable_ids()
    requested = TrainingArguments(
        output_dir=str(Path(args.out) / f"trainer-{dist.get_rank()}"),
        per_device_train_batch_size=2,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=DEVICE.type == "cpu",
        bf16=False,
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=True,
        dataloader_num_workers=0,
    )
    targs = training_arguments_for(model, requested)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    wrapped = trainer.model_wrapped
    result["wrapped"] = type(wrapped).__name__
    result["find_unused_parameters"] = getattr(wrapped, "find_unused_parameters", None)
    result["global_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trained = lora_tensors(model)
    result["adapter_digest"] = digest(trained)
    result["adapters"] = len(trained)
    result["adapters_changed"] = sum(not torch.equal(trained[n], start[n]) for n in trained)
    result["checkpointing"] = checkpointing_status(model).to_dict()
    result["plan"] = plan_summary(base)
    result["world"] = dist.get_world_size()


def run_peft_upcast_scenario(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from peft import get_peft_model

    where = None if DEVICE.type == "cpu" else str(DEVICE)
    base = kbitprep.prepare_model_for_kbit_training(load_bnb_4bit(args.model_dir, torch.bfloat16, where))
    result["plan"] = plan_summary(base)
    model = get_peft_model(base, lora_config(), autocast_adapter_dtype=False)
    wrap("fsdp1", model)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    global DEVICE
    if args.device == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    for scenario in args.scenarios.split(","):
        result: dict[str, Any] = {"scenario": scenario, "rank": rank, "ok": False, "error": None}
        started = time.perf_counter()
        try:
            if scenario == "ddp-trainer":
                run_trainer_scenario(args, result)
            elif scenario == "fsdp1-peft-upcast":
                run_peft_upcast_scenario(args, result)
            else:
                run_training_scenario(scenario, args, result)
            result["ok"] = True
        except Exception as exc:  # recorded for the test to assert on
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-4000:]
        result["seconds"] = round(time.perf_counter() - started, 2)
        Path(args.out, f"{scenario}-rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
