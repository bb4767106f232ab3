"""Tiny random models of each architecture family transformers ships, for the bnb 4-bit family test.

Each :class:`Family` builds a freshly initialised bf16 model from a tiny config (1-2 layers, hidden
32-64, vocabulary 256), which the test saves once and reloads with bitsandbytes 4-bit; ``batch``
gives the inputs of one training step for the family's head. Besides decoder-only, encoder-decoder and
classification models, the families include models whose checkpointed stacks do not start from the
token embeddings (a speech encoder, a wav2vec2 feature encoder, vision towers), where reentrant
checkpointing needs an input-require-grads hook of its own on each stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from kbitprep.testing import tiny_llama_config

from .reporting import Cell, ResultTable, outcome
from .tiny_configs import TINY_DECODER, TINY_EXPERTS, TINY_STACK, tiny_moe_config

__all__ = ["FAMILIES", "Family"]

VOCAB = TINY_DECODER["vocab_size"]
SEQ = 24


@dataclass(frozen=True)
class Family:
    """One architecture family of the test.

    Attributes:
        id: the row label.
        model_class: the transformers class name (the model is built from it and reloaded with it).
        make_config: returns the tiny config.
        task_type: PEFT's ``task_type`` fitting the model's head (``None``: PEFT's plain ``PeftModel``).
        batch: returns the keyword arguments of one training forward (with labels) for a config.
        skip_modules: modules bitsandbytes must leave unquantized (``llm_int8_skip_modules``), for
            heads transformers would otherwise quantize although PEFT must train them in full.
    """

    id: str
    model_class: str
    make_config: Callable[[], Any]
    task_type: str | None
    batch: Callable[[Any], dict[str, torch.Tensor]]
    skip_modules: tuple[str, ...] = ()

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


def _qwen2_vl_batch(config: Any) -> dict[str, torch.Tensor]:
    """One image as Qwen2-VL's processor gives it: flattened patches, the (t, h, w) patch grid, one image token
    per merged 2x2 patch group between the vision start/end tokens, and ``mm_token_type_ids`` marking them."""
    vision = config.vision_config
    side = 2 * vision.spatial_merge_size
    tokens = side * side // vision.spatial_merge_size**2
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(side * side, width, generator=torch.Generator().manual_seed(2))
    text = _ids(0, (1, SEQ), high=VOCAB - 4)  # the last four ids are the vision tokens
    image = torch.full((1, tokens), config.image_token_id)
    ids = torch.cat(
        [
            text[:, :2],
            torch.tensor([[config.vision_start_token_id]]),
            image,
            torch.tensor([[config.vision_end_token_id]]),
            text[:, 2:],
        ],
        dim=1,
    )
    labels = ids.masked_fill(ids >= VOCAB - 4, -100)
    return {
        "input_ids": ids,
        "mm_token_type_ids": (ids == config.image_token_id).long(),
        "pixel_values": pixels.to(torch.bfloat16),
        "image_grid_thw": torch.tensor([[1, side, side]]),
        "labels": labels,
    }


def _speech_batch(config: Any) -> dict[str, torch.Tensor]:
    """Whisper: log-mel features of the exact length the encoder checks (2 x max_source_positions frames)."""
    frames = 2 * config.max_source_positions
    features = torch.randn(2, config.num_mel_bins, frames, generator=torch.Generator().manual_seed(2))
    return {"input_features": features.to(torch.bfloat16), "labels": _ids(1, (2, SEQ // 2), low=3)}


def _image_to_text_batch(config: Any) -> dict[str, torch.Tensor]:
    vision = config.encoder
    pixels = torch.randn(
        2, vision.num_channels, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(2)
    )
    return {"pixel_values": pixels.to(torch.bfloat16), "labels": _ids(1, (2, SEQ // 2), low=3)}


def _ctc_batch(config: Any) -> dict[str, torch.Tensor]:
    """wav2vec2 CTC: 400 samples of raw audio (48 frames after the feature encoder), 6 characters a row."""
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(2))
    return {"input_values": audio.to(torch.bfloat16), "labels": _ids(1, (2, 6), high=config.vocab_size, low=1)}


def _llama_tied() -> Any:
    return tiny_llama_config(tie_word_embeddings=True)


def _qwen2_untied() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**TINY_DECODER, max_position_embeddings=128, tie_word_embeddings=False)


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)


def _mixtral() -> Any:
    return tiny_moe_config("mixtral", max_position_embeddings=128, tie_word_embeddings=False)


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
    return cls(**TINY_STACK, vocab_size=VOCAB, max_position_embeddings=128, num_labels=3)


def _llama_cls() -> Any:
    return tiny_llama_config(num_labels=3, pad_token_id=0)


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    # hidden 64, not 32: bitsandbytes' CPU repack (an eval forward on AVX512-BF16) needs in_features >= its
    # block size (64); smaller layers crash in bitsandbytes.functional._convert_weight_packed_for_cpu
    vision = CLIPVisionConfig(**TINY_STACK, image_size=32, patch_size=8, projection_dim=64)
    # vision_feature_layer=-1: with LLaVA's default (-2) the last vision layer's output is never used,
    # so LoRA on it gets no gradient by design; -1 puts every vision layer on the loss path
    return LlavaConfig(
        vision_config=vision,
        text_config=tiny_llama_config(),
        image_token_index=VOCAB - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
    )


def _qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    # the routed experts are fused 3-D parameters (not nn.Linear, so neither quantized nor given LoRA); the
    # shared expert and its gate are plain linear layers, quantized and adapted like attention
    return Qwen2MoeConfig(
        **TINY_DECODER,
        **TINY_EXPERTS,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _qwen2_vl() -> Any:
    from transformers import Qwen2VLConfig

    text = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # multimodal rope: the (temporal, height, width) sections of the 8 rotary frequencies of a 16-wide head
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    }
    vision = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4,
    )


def _whisper() -> Any:
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def _clip_gpt2() -> Any:
    from transformers import CLIPVisionConfig, GPT2Config, VisionEncoderDecoderConfig

    # a CLIP vision encoder rather than ViT: ViTModel's pooler (a linear layer the decoder never reads) would
    # carry LoRA tensors that get no gradient by design
    encoder = CLIPVisionConfig(**TINY_STACK, image_size=32, patch_size=8)
    decoder = GPT2Config(
        n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = 1
    config.pad_token_id = 0
    return config


def _wav2vec2() -> Any:
    from transformers import Wav2Vec2Config

    cls: Any = Wav2Vec2Config  # its signature hides the PretrainedConfig keywords
    return cls(
        **TINY_STACK,
        vocab_size=32,
        conv_dim=(64, 64),  # 64 wide: the feature projection is a quantized linear layer (bnb's CPU block size)
        conv_stride=(4, 2),
        conv_kernel=(8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        layerdrop=0.0,  # LayerDrop skips random layers in training: their adapters would miss gradients at random
        mask_time_prob=0.0,
        pad_token_id=0,
        ctc_loss_reduction="mean",
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
    Family("llava-vlm", "LlavaForConditionalGeneration", _llava, "CAUSAL_LM", _llava_batch),
    # bitsandbytes' CPU repack (an eval forward on AVX512-BF16) cannot repack a 1-wide output ("N must be divisible
    # by block_n"), and the eval-first check runs one: the shared expert's 1-wide gate stays unquantized (a skip
    # list replaces transformers' default one, so lm_head is named too)
    Family(
        "qwen2-moe",
        "Qwen2MoeForCausalLM",
        _qwen2_moe,
        "CAUSAL_LM",
        _causal_batch,
        skip_modules=("shared_expert_gate", "lm_head"),
    ),
    Family("qwen2-vl", "Qwen2VLForConditionalGeneration", _qwen2_vl, "CAUSAL_LM", _qwen2_vl_batch),
    # task_type None: PEFT's SEQ_2_SEQ_LM wrapper passes input_ids, which Whisper's forward does not take
    Family("whisper-speech", "WhisperForConditionalGeneration", _whisper, None, _speech_batch),
    Family("clip-gpt2-img2txt", "VisionEncoderDecoderModel", _clip_gpt2, None, _image_to_text_batch),
    Family("wav2vec2-ctc", "Wav2Vec2ForCTC", _wav2vec2, None, _ctc_batch),
)
"""Every family the test runs, in table order."""


# ---------------------------------------------------------------------------------------------- the table

#: The checks of ``tests/test_architecture_families.py`` every family goes through: test -> column.
CHECKS: dict[str, str] = {
    "test_backend_is_bnb_4bit": "backend",
    "test_every_lora_tensor_gets_a_gradient": "lora-grads",
    "test_every_lora_tensor_gets_a_gradient_non_reentrant": "grads-non-re",
    "test_every_stack_gets_inputs_that_require_grad": "stack-inputs",
    "test_quantized_storage_bit_exact": "storage",
    "test_undo_exact": "undo",
    "test_dropin_parity_with_peft": "peft-parity",
    "test_prepare_verify": "verify",
    "test_verify_gradient_flow_with_adapters": "verify-lora",
    "test_use_cache_off_everywhere": "use-cache",
    "test_eval_forward_before_prepare": "eval-first",
}


def _family_cell(report: pytest.TestReport) -> tuple[str, str, Cell] | None:
    """The family x check cell a report of ``tests/test_architecture_families.py`` fills, from its id."""
    if "test_architecture_families.py::" not in report.nodeid:
        return None
    name, _, param = report.nodeid.rpartition("::")[2].partition("[")
    cell = outcome(report, limit=160)
    if name not in CHECKS or not param or cell is None:
        return None
    return param.rstrip("]"), CHECKS[name], cell


def family_table() -> ResultTable:
    """The families x checks table printed at the end of a run (registered by ``tests/conftest.py``)."""
    table = ResultTable(
        title="architecture families x check (bitsandbytes 4-bit NF4 on the CPU)",
        row_header="family",
        columns=list(CHECKS.values()),
        col_width=13,
        rows=[f.id for f in FAMILIES],
        explain={"FAIL": "", "skip": ""},
        cell_of=_family_cell,
    )
    table.footer = lambda: f"(the checks took {table.seconds:.1f} s, summed over the workers)"
    return table
