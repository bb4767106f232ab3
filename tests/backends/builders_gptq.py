"""A real GPTQ-quantized tiny Llama: a locally trained byte-level BPE tokenizer calibrates gptqmodel.

Quantizing costs 10-50 s on 2 cores, so it runs once per session; every model handed to a test
is a fresh ``from_pretrained`` of the saved checkpoint (well under a second).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..tiny import saved_tiny_llama

os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")  # skip a ~25 s C++ build on first use

#: Calibration text: a few plain sentences (GPTQ only needs activations that look like input).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in fewer bits.",
    "Low-rank adapters train a small number of parameters.",
    "A tiny model is enough to test the machinery.",
    "Gradient checkpointing trades compute for memory.",
    "Every layer keeps its packed integers untouched.",
    "Tests must fail when the code is wrong.",
    "Byte-level BPE can encode any string at all.",
)


@functools.cache
def tiny_tokenizer() -> object:
    """A byte-level BPE tokenizer (vocabulary 256) trained here on :data:`SENTENCES`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(SENTENCES) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@functools.cache
def saved_gptq_llama(bits: int = 4, group_size: int = 32) -> Path:
    """Quantize the fp16 tiny Llama with gptqmodel (once per session) and return the saved checkpoint."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    path = Path(tempfile.mkdtemp(prefix="kbitprep-gptq-")) / f"llama-gptq{bits}-g{group_size}"
    config = GPTQConfig(
        bits=bits, group_size=group_size, desc_act=False, dataset=list(SENTENCES), tokenizer=tiny_tokenizer()
    )
    model = AutoModelForCausalLM.from_pretrained(
        saved_tiny_llama(torch.float16), quantization_config=config, device_map="cpu", dtype=torch.float16
    )
    model.save_pretrained(path)
    return path


def gptq_llama(bits: int = 4, group_size: int = 32) -> nn.Module:
    """A fresh GPTQ tiny Llama (fp16 activations) loaded from the session's checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(saved_gptq_llama(bits, group_size), device_map="cpu")
