"""Shared pieces of the integration tests: tiny quantized models, a tiny tokenizer, learnable data.

Imported both by the pytest modules and by ``dist_worker.py`` (run by torchrun), so it only
imports torch/transformers at module level and the quantization libraries inside the loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Repeating patterns over a few tokens: a LoRA on the tiny random model learns them within a few steps.
PATTERNS: tuple[tuple[int, ...], ...] = ((10, 20, 30, 40), (50, 60, 70), (80, 90))
SEQ_LEN = 16


def learnable_ids(copies: int = 4) -> list[list[int]]:
    """``len(PATTERNS) * copies`` sequences of ``SEQ_LEN`` tokens, each a rotation of one pattern."""
    return [[p[(j + s) % len(p)] for j in range(SEQ_LEN)] for p in PATTERNS for s in range(copies)]


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level tokenizer over the tiny model's 256 ids (``t3`` ... ``t255``), built locally (no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, 256)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def load_bnb_4bit(path: str | Path, storage: torch.dtype = torch.uint8, device: str | None = None) -> nn.Module:
    """NF4, double quantization, bf16 compute; ``storage`` is ``bnb_4bit_quant_storage`` (bf16 for FSDP).

    ``device`` (e.g. ``"cuda:1"``) loads onto that device; ``None`` stays on the CPU.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
    )
    where = {"device_map": {"": device}} if device else {}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16, **where)


def load_torchao_int8(path: str | Path) -> nn.Module:
    """TorchAO int8 weight-only (``Int8Tensor`` weights that report bf16)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.bfloat16
    )


def load_quanto_int8(path: str | Path) -> nn.Module:
    """optimum-quanto int8 weights (``QLinear`` / ``WeightQBytesTensor``)."""
    from transformers import AutoModelForCausalLM, QuantoConfig

    qc = QuantoConfig(weights="int8")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16)


#: backend row id -> (kbitprep backend name, importable module it needs, loader(path))
LOADERS: Mapping[str, tuple[str, str, Callable[[str | Path], nn.Module]]] = {
    "bnb-4bit": ("bnb-4bit", "bitsandbytes", load_bnb_4bit),
    "torchao-int8": ("torchao", "torchao", load_torchao_int8),
    "quanto-int8": ("quanto", "optimum.quanto", load_quanto_int8),
}


def lora_config(**overrides: object):  # type: ignore[no-untyped-def]
    """LoRA on every linear layer of the decoder (r=8)."""
    from peft import LoraConfig

    kw: dict[str, object] = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    kw.update(overrides)
    return LoraConfig(**kw)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LoRA tensors (name -> fp32 tensor)."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def full_loss(model: nn.Module, ids: list[list[int]]) -> float:
    """The causal-LM loss over all of ``ids`` (eval mode, no grad), then back to train mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.tensor(ids)
            return float(model(input_ids=x, labels=x).loss)
    finally:
        model.train(was)


def training_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` / ``SFTConfig`` / TRL config keywords for a short, quiet, deterministic CPU run."""
    kw: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return kw
