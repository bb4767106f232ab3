"""The gradient-flow check: where the autograd chain breaks, task heads it probes (speech and vision models
included, every checkpointed stack), config left as it was, bad input, no warnings of its own."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from kbitprep._mutation import prepared_state

from ..families import FAMILIES
from ..state import config_snapshot, model_state
from ..tiny import tiny_llama

# --------------------------------------------------------------------------- where the chain breaks


def _torchao_dynamic(kind: str) -> nn.Module:
    pytest.importorskip("torchao")
    from ..backends.cases.torchao import quantized_tiny_llama

    return quantized_tiny_llama(kind)


@pytest.mark.parametrize(
    ("kind", "mode", "weight"),
    [
        ("dyn-int8", True, "Int8Tensor"),
        ("dyn-int8", False, "Int8Tensor"),
        ("dyn-intx", True, "IntxUnpackedToInt8Tensor"),
    ],
    ids=["int8-reentrant", "int8-non-reentrant", "intx-reentrant"],
)
def test_names_the_quantized_layer_that_cuts_the_chain_not_the_hook(kind: str, mode: bool, weight: str) -> None:
    """Regression: on a torchao dynamic-activation model whose input-require-grads hook IS present, the check
    used to blame the missing hook. It must name the first layer whose output stops requiring grad."""
    model = _torchao_dynamic(kind)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
    assert len(model.get_input_embeddings()._forward_hooks) >= 1  # transformers added the hook
    with pytest.raises(kbitprep.GradientFlowError) as caught:
        kbitprep.verify_gradient_flow(model)
    message = str(caught.value)
    assert "breaks at model.layers.0.self_attn.q_proj (torch.nn.modules.linear.Linear, weight " + weight in message
    assert "input-require-grads hook" not in message
    assert "weight-only" in message  # what to do about it


def test_with_adapters_attached_a_cut_base_path_still_fails() -> None:
    """Every LoRA tensor gets a (zero at step 0) gradient through its own branch, yet the base path is cut:
    the check fails and names the first cut base layer, instead of passing a model that trains wrongly."""
    from peft import LoraConfig, get_peft_model

    model = _torchao_dynamic("dyn-int8")
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with pytest.raises(kbitprep.GradientFlowError, match=r"only through side branches.*\.base_layer .*Int8Tensor"):
        kbitprep.verify_gradient_flow(peft_model)


class _Detach(nn.Module):
    """No parameters; cuts the chain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


class _DetachingBlock(nn.Module):
    """A linear whose output is detached: the chain is cut inside a module that holds weights."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x)).detach()


class _Net(nn.Module):
    def __init__(self, cut: nn.Module, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.layers = nn.ModuleList([nn.Linear(width, width), cut, nn.Linear(width, width)])
        self.head = nn.Linear(width, 32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


@pytest.mark.parametrize(
    ("cut", "cls"),
    [(lambda: _DetachingBlock(16), "_DetachingBlock"), (_Detach, "_Detach")],
    ids=["block-with-weights", "parameter-free"],
)
def test_names_a_hand_made_module_that_detaches(cut: Callable[[], nn.Module], cls: str) -> None:
    model = _Net(cut())
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("layers.0."))  # an "adapter" before the cut
    before = model_state(model)
    with pytest.raises(kbitprep.GradientFlowError) as caught:
        kbitprep.verify_gradient_flow(model, {"input_ids": torch.arange(8).view(1, 8)})
    message = str(caught.value)
    assert "2 of 2 trainable parameters got no gradient (layers.0.weight, layers.0.bias)" in message
    assert f"breaks at layers.1 ({__name__}.{cls})" in message
    assert ".detach()" in message
    assert model_state(model) == before


# an op registered without an autograd kernel: torch's fallback gives its output a grad_fn
# (torch::autograd::WarnNotImplemented) whose backward returns no gradient - the CPU bitsandbytes 4-bit trap
_LIB = torch.library.Library("kbitprep_gradflow_test", "DEF")
_LIB.define("double(Tensor x) -> Tensor")


def _double_kernel(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return x * 2


_LIB.impl("double", _double_kernel, "CPU")


class _NoAutogradLinear(nn.Linear):
    """A linear whose kernel has no autograd formula: the output requires grad, the input gets none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kbitprep_gradflow_test.double(super().forward(x))


def test_names_a_module_whose_kernel_has_no_backward() -> None:
    model = _Net(_NoAutogradLinear(16, 16))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("layers.0."))
    with pytest.raises(kbitprep.GradientFlowError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "autograd kernel was not registered" warning
        kbitprep.verify_gradient_flow(model, {"input_ids": torch.arange(8).view(1, 8)})
    message = str(caught.value)
    assert f"breaks at layers.1 ({__name__}._NoAutogradLinear)" in message
    assert "torch::autograd::WarnNotImplemented" in message


def _frozen_flow_error(model: nn.Module) -> kbitprep.GradientFlowError:
    """The error the check raises on ``model`` with every parameter frozen (warnings silenced)."""
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(kbitprep.GradientFlowError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kbitprep.verify_gradient_flow(model)
    return caught.value


def test_names_bitsandbytes_layers_repacked_for_inference() -> None:
    """On a CPU with AVX512-BF16 one eval forward repacks Linear4bit weights for gemv_4bit, which has no
    autograd: without kbitprep's fix-up, the check names the first Linear4bit and the op."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("no AVX512-BF16: Linear4bit never repacks here (test_names_a_module_whose_kernel_has_no_backward)")
    from ..backends.cases.bnb import load_bnb_4bit
    from ..tiny import batch

    model = load_bnb_4bit()
    with torch.no_grad():
        model(**batch())
    message = str(_frozen_flow_error(model))
    assert "breaks at model.layers.0.self_attn.q_proj (bitsandbytes.nn.modules.Linear4bit)" in message
    assert "WarnNotImplemented" in message and "input-require-grads hook" not in message


def test_a_backward_that_fails_is_a_gradient_flow_error_naming_the_layer() -> None:
    """CPU int4 (Int4OpaqueTensor): the matmul's derivative is not implemented, so backward raises; the check
    turns that into a GradientFlowError that names the first such layer and keeps torch's error as the cause."""
    pytest.importorskip("torchao")
    from ..backends.cases.torchao import load_torchao

    error = _frozen_flow_error(load_torchao("int4-opaque"))
    message = str(error)
    assert "backward failed (derivative for aten::_weight_int4pack_mm" in message
    assert (
        "breaks at model.layers.0.self_attn.q_proj (torch.nn.modules.linear.Linear, weight Int4OpaqueTensor)" in message
    )
    assert isinstance(error.__cause__, RuntimeError)


def test_a_healthy_model_has_no_breaks() -> None:
    """Rotary embeddings (cos/sin from positions, input requires grad, output does not) are not breaks."""
    model = tiny_llama()
    kbitprep.prepare(model)
    result = kbitprep.verify_gradient_flow(model)
    assert result.ok and result.breaks == ()


def test_a_missing_hook_is_still_blamed_on_the_hook() -> None:
    model = tiny_llama()
    kbitprep.prepare(model, checkpointing="reentrant")
    model.get_input_embeddings()._forward_hooks.clear()
    with pytest.raises(kbitprep.GradientFlowError, match="input embeddings' output does not require grad.*hook"):
        kbitprep.verify_gradient_flow(model)


# --------------------------------------------------------------------------- task heads


def _bert_config(**extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **extra,
    )


def _seq_cls() -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(_bert_config(num_labels=3))


def _token_cls() -> nn.Module:
    from transformers import BertForTokenClassification

    return BertForTokenClassification(_bert_config(num_labels=3))


def _question_answering() -> nn.Module:
    from transformers import BertForQuestionAnswering

    return BertForQuestionAnswering(_bert_config())


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


def _llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=100))


HEADS: dict[str, Callable[[], nn.Module]] = {
    "sequence-classification": _seq_cls,
    "token-classification": _token_cls,
    "question-answering": _question_answering,
    "seq2seq": _t5,
    "causal-lm": tiny_llama,
    "llava": _llava,
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_prepare_verify_probes_the_heads_transformers_ships(head: str) -> None:
    """Regression: BertForSequenceClassification raised a raw ValueError (token-id labels fed to a
    classifier) and kept ``problem_type``; token classification raised IndexError; LLaVA had no vocab size.
    Every head is probed now, and the config (and everything else) is as prepare left it."""
    model = HEADS[head]()
    torch.manual_seed(0)
    kbitprep.prepare(model)
    configs, state = config_snapshot(model), model_state(model)
    result = kbitprep.verify_gradient_flow(model)
    assert result.ok and result.checked == result.with_grad >= 1
    assert config_snapshot(model) == configs
    assert model_state(model) == state
    kbitprep.undo(model)
    fresh = HEADS[head]()
    configs = config_snapshot(fresh)
    kbitprep.prepare(fresh, verify=True)
    kbitprep.undo(fresh)
    assert config_snapshot(fresh) == configs


def test_the_probe_restores_a_config_the_forward_changed() -> None:
    """BERT's forward writes ``config.problem_type`` when it first sees labels; the probe puts it back."""
    model = _seq_cls()
    kbitprep.prepare(model)
    assert model.config.problem_type is None
    ids = torch.arange(8).view(1, 8)
    kbitprep.verify_gradient_flow(model, {"input_ids": ids, "labels": torch.tensor([1])})
    assert model.config.problem_type is None


def test_a_head_the_default_probe_cannot_feed_is_a_clear_error_and_prepare_rolls_back() -> None:
    """Multiple choice needs (batch, choices, tokens) ids: the default probe cannot feed it. A kbitprep error
    says so and how to probe it; prepare(verify=True) leaves model and config exactly as they were."""
    from transformers import BertForMultipleChoice

    model = BertForMultipleChoice(_bert_config())
    configs, before = config_snapshot(model), model_state(model)
    with pytest.raises(kbitprep.InvalidModelError, match=r"cannot probe BertForMultipleChoice.*inputs=") as caught:
        kbitprep.prepare(model, verify=True)
    assert caught.value.__cause__ is not None
    assert model_state(model) == before and config_snapshot(model) == configs
    assert prepared_state(model) is None
    kbitprep.prepare(model)  # with a batch it accepts, the check runs
    ids = torch.arange(16).view(1, 2, 8)
    assert kbitprep.verify_gradient_flow(model, {"input_ids": ids}).ok


# --------------------------------------------------------------------------- bad input, LLaVA, noise


@pytest.mark.parametrize("bad", [None, {"weight": torch.zeros(2)}, "model"], ids=["None", "state-dict", "str"])
def test_not_a_module_is_rejected(bad: object) -> None:
    with pytest.raises(kbitprep.NotAModuleError, match="expects a torch.nn.Module"):
        kbitprep.verify_gradient_flow(bad)  # type: ignore[arg-type]


def test_llava_vocab_comes_from_the_text_config_and_image_tokens_are_avoided() -> None:
    """The text tokens come from the text config's vocabulary and avoid the image token; the probe's image
    brings one placeholder per patch (LLaVA's "default" strategy drops the CLS token)."""
    model = _llava()
    assert not hasattr(model.config, "vocab_size") or not isinstance(model.config.vocab_size, int)
    from kbitprep._gradflow import _default_inputs

    feed = _default_inputs(model)
    ids, image = feed["input_ids"], model.config.image_token_index
    text = ids[ids != image]
    assert len(text) == 8 and int(text.max()) < model.config.text_config.vocab_size
    vision = model.config.vision_config
    assert int((ids == image).sum()) == (vision.image_size // vision.patch_size) ** 2
    assert feed["pixel_values"].shape == (1, vision.num_channels, vision.image_size, vision.image_size)
    kbitprep.prepare(model)
    assert kbitprep.verify_gradient_flow(model).ok


def test_the_check_raises_no_user_warning() -> None:
    """Regression: ``float(loss)`` on a tensor that requires grad made torch warn at every check."""
    model = tiny_llama()
    kbitprep.prepare(model, checkpointing="non_reentrant")
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise: an earlier test would hide it
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = kbitprep.verify_gradient_flow(model)
    finally:
        torch.set_warn_always(was)
    assert result.ok
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


def test_a_detached_parameter_free_side_branch_is_reported_but_passes_consistently() -> None:
    """A weightless module that detaches a side branch cuts no trainable path: the check passes, and
    ``ok`` agrees with it (no raise, ``ok`` True), while ``breaks`` names the module."""

    class Detach(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.detach()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.d = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), Detach()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.d(y) + self.b(y)

    model = Net()
    result = kbitprep.verify_gradient_flow(model, {"x": torch.randn(2, 4)})
    assert result.ok and result.breaks == ("d",)


# --------------------------------------------------------------------------- speech and vision models


def _stacks(model: nn.Module) -> set[str]:
    """The containers of transformers' checkpointed layers (each one a stack: an encoder, a tower ...)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {n.rpartition(".")[0] for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}


FAMILY = {f.id: f for f in FAMILIES}


@pytest.mark.parametrize("family_id", ["whisper-speech", "clip-gpt2-img2txt", "wav2vec2-ctc", "qwen2-vl", "llava-vlm"])
def test_prepare_verify_probes_speech_and_vision_models_in_every_stack(family_id: str) -> None:
    """Regression (issue 17): the default probe fed token ids only. Whisper's, the image-to-text model's and
    wav2vec2's forwards rejected it (prepare(verify=True) raised InvalidModelError), and a vision-language
    model's tower never ran, so the probe checked the language model alone. The probe now builds log-mel
    features, waveforms and images (placeholder tokens, Qwen2-VL's patch grid) from the config, and stands a
    parameter in for an adapter in every checkpointed stack."""
    model = FAMILY[family_id].build()
    kbitprep.prepare(model, checkpointing="reentrant", verify=True)
    result = kbitprep.verify_gradient_flow(model)
    assert result.ok and result.checked == result.with_grad == len(_stacks(model)) >= 2


def test_the_check_names_a_stack_whose_input_does_not_require_grad() -> None:
    """Regression (issue 17): without an input-require-grads hook of its own, Whisper's encoder is checkpointed
    reentrantly on features that do not require grad, so nothing in it trains; the check (with the caller's
    batch) used to pass on the decoder alone. It now fails and names the encoder's layer."""
    family = FAMILY["whisper-speech"]
    model = family.build()
    kbitprep.prepare(model, checkpointing="reentrant")
    for layer in model.model.encoder.layers:  # as prepared without the stack hooks
        layer._forward_pre_hooks.clear()
    pattern = r"checkpointed layer model\.encoder\.layers\.0 \(WhisperEncoderLayer\).*does not require grad"
    with pytest.raises(kbitprep.GradientFlowError, match=pattern):
        kbitprep.verify_gradient_flow(model, inputs=family.batch(model.config))


def test_an_image_the_model_rejects_falls_back_to_the_text_probe() -> None:
    """A vision-language model whose image the probe gets wrong (its config says 48-pixel images, the tower was
    built for 32) is probed text-only, as before, rather than refused: the language model's stack is checked,
    the vision tower (not run) is not."""
    model = FAMILY["llava-vlm"].build()
    kbitprep.prepare(model)
    model.config.vision_config.image_size = 48
    try:
        result = kbitprep.verify_gradient_flow(model)
    finally:
        model.config.vision_config.image_size = 32
    assert result.ok and result.checked == 1


def test_the_probe_is_not_a_training_step_for_master_weights() -> None:
    """Prepare's fp32 master-weights hook upcasts half-precision parameters that become trainable after prepare, at
    their first training forward. The probe is not one: its stand-ins (here a q_proj weight whose bias stays
    frozen, which in fp32 could not even run) and the parameters trained for real keep their dtype through it, and
    the real ones still get master weights at the first training forward after it."""
    family = FAMILY["qwen2-untied"]
    model = family.build()
    kbitprep.prepare(model, checkpointing="reentrant")
    assert kbitprep.report(model).plan.master_weights
    assert kbitprep.verify_gradient_flow(model).ok  # stand-ins only
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)  # trained in full, unfrozen after prepare
    state = model_state(model)
    assert kbitprep.verify_gradient_flow(model).ok
    assert model_state(model) == state and head.dtype is torch.bfloat16
    model.train()
    model(**family.batch(model.config)).loss.backward()
    assert head.dtype is torch.float32  # the first training forward gave it master weights
