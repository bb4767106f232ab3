"""QLoRA from load to saved adapter: bitsandbytes 4-bit + kbitprep + LoRA + TRL's SFTTrainer, then reload and generate.

Runs on a CPU in under a minute with its default tiny model (a 2-layer Llama with random weights
and a word-level tokenizer over the script's own data, both built here: nothing is downloaded).
Copy it and pass your own model directory (a local path or a Hub id) to train a real one:

    python examples/qlora_end_to_end.py                          # tiny model, CPU
    python examples/qlora_end_to_end.py --model path/to/model --steps 200 --output out

Steps: load the model quantized to 4-bit NF4 with bitsandbytes; ``kbitprep.prepare(model,
memory="lowest")`` (frozen base, nothing upcast, reentrant checkpointing, chunked output head,
offloaded activations); LoRA on every linear layer (``kbitprep.lora_config``); ``SFTTrainer``
for a few steps (it calls the model with TRL's ``fused_lm_head=True``: on the CPU kbitprep's chunked
head serves those calls, on CUDA TRL's own; the offload runs under either, and the script prints
which ran); save the adapter; load a fresh 4-bit base, attach the saved adapter with
``PeftModel.from_pretrained`` and generate a few tokens (the tiny model learns to count on:
"two three four" -> "five six seven eight").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from trl import SFTConfig, SFTTrainer

import kbitprep

#: A small dataset: the model learns to continue counting in words.
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TEXTS = [" ".join(NUMBERS[i : i + 6]) for i in range(len(NUMBERS) - 5)] * 4
PROMPT = "two three four"


def make_tiny_model(path: Path) -> None:
    """Save a tiny random Llama and a word-level tokenizer over the words of TEXTS to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *NUMBERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,  # random weights large enough for a LoRA to steer in a few steps
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def load_4bit(path: str | Path) -> PreTrainedModel:
    """The model quantized to NF4 by bitsandbytes on load (bf16 compute)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    device = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.bfloat16, **device
    )
    return model


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run every step, printing what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory or Hub id (default: build a tiny random model)")
    parser.add_argument("--output", default="qlora-out", help="where the base (if built), adapter and logs go")
    parser.add_argument("--steps", type=int, default=8, help="training steps")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    start = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    # 1. a model: yours, or a tiny one built here
    model_path: str | Path = args.model or out / "tiny-base"
    if args.model is None:
        make_tiny_model(out / "tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 2. quantize on load, 3. prepare with kbitprep (print(kbitprep.plan(model, memory="lowest")) shows it first)
    model = load_4bit(model_path)
    kbitprep.prepare(model, memory="lowest")
    plan = kbitprep.report(model).plan
    upcast, mode = len(plan.to_upcast), plan.checkpointing.value
    print(f"prepared: backend {plan.backend}, {upcast} parameters upcast, checkpointing {mode}")

    # 4. LoRA + TRL's SFTTrainer on a dataset built here
    on_cpu = not torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=on_cpu,
        bf16=not on_cpu,
        max_length=32,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=kbitprep.training_arguments_for(model, config),  # kbitprep already enabled checkpointing
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        # LoRA on every quantized and plain linear layer but the output head, for any backend
        # (for bitsandbytes the same layers as PEFT's LoraConfig(target_modules="all-linear"))
        peft_config=kbitprep.lora_config(model, r=8, lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    trainer.train()
    losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    print(f"trained {len(losses)} steps: loss {losses[0]} -> {losses[-1]}")
    # SFTTrainer calls the model with fused_lm_head=True: which head served those calls, and which offload ran
    stats = kbitprep.memory_modes(trainer.model)
    calls = ", ".join(f"{k} {v}" for k, v in stats["head_calls"].items())
    print(f"memory modes: head calls {calls}; offload by {stats['offload_by'] or 'nothing'}")

    # 5. save the adapter (only the LoRA weights and their config)
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    print(f"adapter saved: {', '.join(sorted(p.name for p in adapter_dir.glob('adapter_*')))}")

    # 6. reload: a fresh 4-bit base + the saved adapter, and generate
    base = load_4bit(model_path)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    reloaded.eval()
    inputs = tokenizer(PROMPT, return_tensors="pt").to(base.device)
    with torch.no_grad():
        ids = reloaded.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = ids[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(f"generated {len(new_tokens)} tokens: {PROMPT!r} -> {text!r}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
