"""Tiny random models of each architecture family transformers ships, for the bnb 4-bit family test.

Each :class:`Family` builds a freshly initialised bf16 model from a tiny config (1-2 layers, hidden
32-64, vocabulary 256), which the test saves once and reloads with bitsandbytes 4-bit; ``batch``
gives the inputs of one training step for the family's head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kbitprep.testing import tiny_llama_config

__all__ = ["FAMILIES", "Family"]

VOCAB = 256
SEQ = 24


@dataclass(frozen=True)
class Family:
    """One architecture family of the test.

    Attributes:
        id: the row label.
        model_class: the transformers class name (the model is built from it and reloaded with it).
        make_config: returns the tiny config.
        task_type: PEFT's ``task_type`` fitting the model's head.
        batch: returns the keyword arguments of one training forward (with labels) for a config.
        skip_modules: modules bitsandbytes must leave unquantized (``llm_int8_skip_modules``), for
            heads transformers would otherwise quantize although PEFT must train them in full.
        text_only_probe: kbitprep's default gradient probe (token ids only) cannot reach every adapter
            (a vision tower needs pixel values): the probe must then say so rather than pass.
    """

    id: str
    model_class: str
    make_config: Callable[[], Any]
    task_type: str
    batch: Callable[[Any], dict[str, torch.Tensor]]
    skip_modules: tuple[str, ...] = ()
    text_only_probe: bool = False

    def cls(self) -> type[nn.Module]:
        """The transformers model class."""
        import transformers

        cls: type[nn.Module] = getattr(transformers, self.model_class)
        return cls

    def build(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model in bf16 (random weights, seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.cls()(self.make_config())
        return nn.Module.to(model, torch.bfloat16)


def _ids(seed: int, shape: tuple[int, ...], high: int = VOCAB, low: int = 0) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def _causal_batch(config: Any) -> dict[str, torch.Tensor]:
    ids = _ids(0, (2, SEQ))
    return {"input_ids": ids, "labels": ids.clone()}


def _seq2seq_batch(config: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(0, (2, SEQ)), "labels": _ids(1, (2, SEQ // 2))}


def _classification_batch(config: Any) -> dict[str, torch.Tensor]:
    # token ids above the pad id, so every row is "full length" for the pooled heads that look for padding
    ids = _ids(0, (2, SEQ), low=4)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2])}


def _llava_batch(config: Any) -> dict[str, torch.Tensor]:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2  # "default" strategy drops the CLS token
    text = _ids(0, (2, SEQ), high=config.image_token_id)  # text tokens never collide with the image token
    image = torch.full((2, patches), config.image_token_id)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    labels = ids.clone()
    labels[ids == config.image_token_id] = -100
    pixels = torch.randn(
        2, vision.num_channels, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(2)
    )
    return {"input_ids": ids, "pixel_values": pixels.to(torch.bfloat16), "labels": labels}


def _llama_tied() -> Any:
    return tiny_llama_config(tie_word_embeddings=True)


def _qwen2_untied() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )


def _t5() -> Any:
    from transformers import T5Config

    cls: Any = T5Config  # its signature hides the PretrainedConfig keywords
    return cls(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )


def _bert_cls() -> Any:
    from transformers import BertConfig

    cls: Any = BertConfig  # its signature hides the PretrainedConfig keywords
    return cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
    )


def _llama_cls() -> Any:
    return tiny_llama_config(num_labels=3, pad_token_id=0)


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        # hidden 64, not 32: bitsandbytes' CPU repack (an eval forward on AVX512-BF16) needs in_features >= its
        # block size (64); smaller layers crash in bitsandbytes.functional._convert_weight_packed_for_cpu
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    # vision_feature_layer=-1: with LLaVA's default (-2) the last vision layer's output is never used,
    # so LoRA on it gets no gradient by design; -1 puts every vision layer on the loss path
    return LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(),
        image_token_index=VOCAB - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
    )


FAMILIES: tuple[Family, ...] = (
    Family("llama-tied", "LlamaForCausalLM", _llama_tied, "CAUSAL_LM", _causal_batch),
    Family("qwen2-untied", "Qwen2ForCausalLM", _qwen2_untied, "CAUSAL_LM", _causal_batch),
    Family("gpt2-conv1d", "GPT2LMHeadModel", _gpt2, "CAUSAL_LM", _causal_batch),
    Family("mixtral-moe", "MixtralForCausalLM", _mixtral, "CAUSAL_LM", _causal_batch),
    Family("t5-enc-dec", "T5ForConditionalGeneration", _t5, "SEQ_2_SEQ_LM", _seq2seq_batch),
    # transformers 5.24 quantizes Bert's `classifier` (its "last module" exclusion strips only ".weight" and
    # misses "classifier.bias"), and PEFT's SEQ_CLS modules_to_save then cannot make a Params4bit trainable:
    # keep the head unquantized, as transformers' docs advise for classification heads
    Family(
        "bert-seq-cls",
        "BertForSequenceClassification",
        _bert_cls,
        "SEQ_CLS",
        _classification_batch,
        skip_modules=("classifier",),
    ),
    Family("llama-seq-cls", "LlamaForSequenceClassification", _llama_cls, "SEQ_CLS", _classification_batch),
    Family("llava-vlm", "LlavaForConditionalGeneration", _llava, "CAUSAL_LM", _llava_batch, text_only_probe=True),
)
"""Every family the test runs, in table order."""
