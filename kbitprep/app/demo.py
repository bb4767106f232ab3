"""The demo behind ``kbitprep demo``: a tiny Llama, quantized on the CPU, prepared, LoRA-trained.

Everything is built in process; nothing is downloaded. The model is a 2-layer Llama-style network
with random weights (0.31 M parameters), saved with ``save_pretrained`` to a temporary folder
and loaded back quantized by the chosen backend, exactly as a user loads a real checkpoint. Its
initialiser range is 0.1 rather than Llama's 0.02: with frozen random embeddings and ``lm_head``,
the final RMSNorm caps what LoRA can do to the logits at about ``range * hidden_size``, and at 0.02
the loss of this task could not fall below ~1.8.

The task: every sequence counts upward modulo 32 from a random start (``7 8 9 ... 31 0 1``), so
each next token is determined by the current one. An untrained model is at chance
(loss ~ ln 64); LoRA on every linear layer learns it in a few dozen steps, and greedy decoding of
a prompt then continues the count.

The same loading recipes serve ``kbitprep plan PATH --quantization ...`` (:func:`load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .._api import plan as kbit_plan
from .._api import prepare as kbit_prepare
from .._gradflow import GradientFlowResult, verify_gradient_flow
from .._mutation import Report
from .._plan_types import Plan
from .._policies import UpcastPolicy
from .._registry import Registry, default_registry
from ..errors import BackendUnavailableError, NotAModuleError, UnknownBackendError
from ..plugin import missing_packages
from .metaplan import SCHEMES, PlannedScheme, model_class, peft_plan

__all__ = [
    "DEMO_BACKENDS",
    "DemoBackend",
    "DemoResult",
    "counting_batch",
    "demo_config",
    "load_checkpoint",
    "run_demo",
]

#: Tokens the counting task uses (0 .. MODULUS-1); the vocabulary is twice as large.
MODULUS = 32
VOCAB = 64
SEQ_LEN = 16
BATCH = 8
LORA_RANK = 8
LORA_ALPHA = 16
#: Every linear layer of the Llama blocks (named, since PEFT's "all-linear" misses e.g. HQQLinear).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-2


@dataclass(frozen=True)
class DemoBackend:
    """How the demo makes a model for one backend.

    Attributes:
        name: the kbitprep backend name.
        scheme: the quantization recipe (:data:`kbitprep.app.metaplan.SCHEMES`).
        dtype: the float dtype to load in.
        note: why that dtype (shown in the report).
    """

    name: str
    scheme: str
    dtype: torch.dtype
    note: str = ""


#: The backends the demo can build on a CPU, by backend name.
DEMO_BACKENDS: dict[str, DemoBackend] = {
    b.name: b
    for b in (
        DemoBackend("bnb-4bit", "bnb-4bit", torch.bfloat16),
        DemoBackend(
            "bnb-8bit", "bnb-8bit", torch.float16, "loaded in fp16: Linear8bitLt casts bf16 inputs to fp16 anyway"
        ),
        DemoBackend("hqq", "hqq-4bit", torch.bfloat16),
        DemoBackend("torchao", "torchao-int8", torch.bfloat16),
        DemoBackend("quanto", "quanto-int8", torch.bfloat16),
        DemoBackend("unquantized", "none", torch.bfloat16),
    )
}

#: Registered backends the demo cannot build here, and why.
NOT_ON_CPU: dict[str, str] = {
    "eetq": "EETQ has no CPU build",
    "gptq": "GPTQ quantization needs a calibration run (tens of seconds on a CPU); try bnb-4bit",
    "aqlm": "AQLM models cannot be quantized by transformers (they need a calibrated codebook search)",
    "compressed-tensors": "compressed-tensors checkpoints are produced by llm-compressor, not at load time",
    "hf-quantizer": "the fallback backend has no quantization of its own",
}


def demo_config() -> Any:
    """The demo model's ``LlamaConfig`` (2 layers, hidden 128, vocabulary 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=2 * SEQ_LEN,
        initializer_range=0.1,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def _model_class(path: Path) -> Any:
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(path))


def check_scheme_available(scheme: PlannedScheme, registry: Registry | None = None) -> None:
    """Raise :class:`~kbitprep.errors.BackendUnavailableError` (with the install hint) if the
    packages to load ``scheme`` are missing."""
    reg = registry or default_registry()
    if scheme.backend in reg:
        reg.ensure_available(reg.get(scheme.backend))
    missing = missing_packages(scheme.requires)
    if missing:
        raise BackendUnavailableError(
            f"quantization {scheme.name!r} needs {', '.join(missing)}, which cannot be imported here; "
            f"install it with: {scheme.install_hint}"
        )


def load_checkpoint(
    path: str | Path, scheme: PlannedScheme | str = "none", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a local transformers checkpoint, quantized with ``scheme`` (``"none"``: as saved).

    A checkpoint saved already quantized (its config has a ``quantization_config``) loads with it
    when ``scheme`` is ``"none"``. ``dtype`` is the float dtype (default: the checkpoint's).

    Raises:
        NotAModuleError: the checkpoint's class does not load as a ``torch.nn.Module``.
    """
    if isinstance(scheme, str):
        scheme = SCHEMES[scheme]
    path = Path(path)
    cls = _model_class(path)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    build = scheme.quantization_config
    qconfig = build(dtype or torch.bfloat16) if build is not None else None
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = "cpu"
    model = cls.from_pretrained(path, **kwargs)
    if scheme.quantize is not None:  # a scheme transformers cannot load: quantize the loaded model
        model = scheme.quantize(model, dtype or torch.bfloat16)
    if not isinstance(model, nn.Module):
        raise NotAModuleError(
            f"loading {path} gave a {type(model).__name__}, not a torch.nn.Module: its config.json does not describe "
            "a model class kbitprep can prepare"
        )
    return model


def build_demo_model(backend: DemoBackend, seed: int, workdir: Path) -> tuple[nn.Module, int]:
    """The demo model with random weights (from ``seed``), saved to ``workdir`` and loaded back
    quantized; with its parameter count before quantization."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    fresh: nn.Module = LlamaForCausalLM(demo_config())
    fresh = fresh.to(backend.dtype)
    count = sum(p.numel() for p in fresh.parameters())
    fresh.save_pretrained(workdir)  # type: ignore[operator]
    del fresh
    return load_checkpoint(workdir, backend.scheme, backend.dtype), count


def counting_batch(gen: torch.Generator, batch: int = BATCH, length: int = SEQ_LEN) -> torch.Tensor:
    """``batch`` sequences that count upward modulo :data:`MODULUS` from random starts."""
    start = torch.randint(0, MODULUS, (batch, 1), generator=gen)
    return (start + torch.arange(length)) % MODULUS


@contextlib.contextmanager
def quiet_stdout(enabled: bool = True) -> Iterator[None]:
    """Discard what libraries print on stdout inside the block (gptqmodel prints a banner there when
    peft imports it); file descriptor 1 included, so output from C code is caught too."""
    if not enabled:
        yield
        return
    import os
    import sys

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _attach_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0)
    wrapped = get_peft_model(model, config)  # type: ignore[arg-type]
    assert isinstance(wrapped, nn.Module)
    return wrapped


@torch.no_grad()
def _continue(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return [int(t) for t in ids[0, len(prompt) :]]


@torch.no_grad()
def _accuracy(model: nn.Module, gen: torch.Generator) -> float:
    ids = counting_batch(gen, 32)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return float((pred == ids[:, 1:]).float().mean())


@dataclass
class DemoResult:
    """Everything the demo did, for the text report and ``--json``."""

    backend: DemoBackend
    scheme: PlannedScheme
    model_class: str
    parameters: int
    plan: Plan
    peft: Plan
    report: Report
    gradient_flow: GradientFlowResult
    lora_params: int
    lora_bytes: int
    steps: int
    seed: int
    losses: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    prompt: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    autocast: torch.dtype | None = None

    @property
    def expected(self) -> list[int]:
        """What the counting task continues the prompt with."""
        last = self.prompt[-1]
        return [(last + 1 + i) % MODULUS for i in range(len(self.generated))]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` summary (keys documented in :mod:`kbitprep.app.cli`)."""
        plan, peft = self.plan, self.peft
        saved = peft.bytes_after - plan.bytes_after
        return {
            "backend": plan.backend,
            "distribution": plan.distributions[0] if plan.distributions else "",
            "evidence": list(plan.evidence),
            "quantization": self.scheme.name,
            "model": {
                "class": self.model_class,
                "parameters": self.parameters,
                "dtype": str(self.backend.dtype).removeprefix("torch."),
                "config": {
                    k: getattr(demo_config(), k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "vocab_size",
                    )
                },
            },
            "plan": plan.to_dict(params=False),
            "prepared": {
                "frozen": len(plan.to_freeze),
                "upcast": len(plan.to_upcast),
                "quantized": len(plan.quantized),
                "upcast_policy": plan.upcast_policy,
                "checkpointing": plan.checkpointing.value,
                "hooks_added": list(self.report.hooks_added),
                "fixups": [f.name for f in plan.fixups],
                "steps": list(self.report.steps),
            },
            "memory": {
                "loaded_bytes": plan.bytes_before,
                "kbitprep_bytes": plan.bytes_after,
                "peft_bytes": peft.bytes_after,
                "saved_bytes": saved,
                "saved_fraction": saved / peft.bytes_after if peft.bytes_after else 0.0,
                "peft_upcast": len(peft.to_upcast),
                "peft_upcast_policy": peft.upcast_policy,
                "peft_checkpointing": peft.checkpointing.value,
                "lora_params": self.lora_params,
                "lora_bytes": self.lora_bytes,
            },
            "gradient_flow": {
                "ok": self.gradient_flow.ok,
                "checked": self.gradient_flow.checked,
                "with_grad": self.gradient_flow.with_grad,
                "zero_grad": len(self.gradient_flow.zero_grad),
                "output_requires_grad": self.gradient_flow.output_requires_grad,
                "loss": self.gradient_flow.loss,
            },
            "training": {
                "task": f"count upward modulo {MODULUS} from a random start",
                "steps": self.steps,
                "seed": self.seed,
                "batch_size": BATCH,
                "seq_len": SEQ_LEN,
                "lr": LEARNING_RATE,
                "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "target_modules": list(LORA_TARGETS)},
                "losses": self.losses,
                "first_loss": self.losses[0] if self.losses else math.nan,
                "last_loss": self.losses[-1] if self.losses else math.nan,
                "accuracy": self.accuracy,
                "autocast": str(self.autocast).removeprefix("torch.") if self.autocast is not None else None,
                "sample": {"prompt": self.prompt, "expected": self.expected, "generated": self.generated},
            },
            "seconds": dict(self.seconds),
        }


def resolve_backend(name: str, registry: Registry | None = None) -> DemoBackend:
    """The demo recipe for backend ``name``, checking it is registered and its packages import.

    Raises:
        UnknownBackendError: no such backend, or one the demo cannot build on a CPU (says why).
        BackendUnavailableError: its packages are missing (with the install hint).
    """
    reg = registry or default_registry()
    choices = ", ".join(DEMO_BACKENDS)
    if name not in DEMO_BACKENDS:
        if name in NOT_ON_CPU and name in reg:
            raise UnknownBackendError(
                f"the demo cannot build a {name!r} model on a CPU: {NOT_ON_CPU[name]}; demo backends: {choices}"
            )
        raise UnknownBackendError(f"unknown demo backend {name!r}; choices: {choices}")
    reg.get(name)  # UnknownBackendError if its plugin failed to load
    backend = DEMO_BACKENDS[name]
    check_scheme_available(SCHEMES[backend.scheme], reg)
    if missing_packages(("peft",)):
        raise BackendUnavailableError(
            "the demo attaches LoRA with peft, which cannot be imported here; "
            "install it with: pip install 'kbitprep[peft]'"
        )
    return backend


def _autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype to autocast to when prepare left the plain float parameters in mixed dtypes.

    With ``upcast="norms"`` the final norm returns fp32 into a bf16 ``lm_head``, which a plain
    forward rejects (``expected m1 and m2 to have the same dtype``); training then needs autocast,
    as the QLoRA recipe and a ``Trainer`` with ``bf16=True`` use.
    """
    dtypes = {p.dtype for p in model.parameters() if type(p.data) is torch.Tensor and p.dtype.is_floating_point}
    half = dtypes & {torch.bfloat16, torch.float16}
    if torch.float32 in dtypes and len(half) == 1:
        return next(iter(half))
    return None


def _maybe_autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _batches(seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield counting_batch(gen)


def run_demo(
    backend: str = "bnb-4bit",
    *,
    upcast: UpcastPolicy = None,
    steps: int = 40,
    seed: int = 0,
    on_plan: Callable[[Plan], None] | None = None,
    progress: TextIO | None = None,
    registry: Registry | None = None,
    quiet: bool = False,
) -> DemoResult:
    """Build, quantize, plan, prepare, attach LoRA, check gradients, train; return what happened.

    Args:
        backend: a :data:`DEMO_BACKENDS` name.
        upcast: the upcast policy for :func:`kbitprep.prepare` (``None``: the backend's default).
        steps: training steps (AdamW, lr 1e-2, batches of 8 x 16 tokens).
        seed: seeds the weights, the batches and the LoRA initialisation.
        on_plan: called with the plan before anything changes (the CLI prints it).
        progress: where to draw a tqdm progress bar (``None``: no bar).
        registry: the backend registry.
        quiet: discard what the quantization libraries and peft print on stdout.
    """
    started = time.perf_counter()
    choice = resolve_backend(backend, registry)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kbitprep-demo-") as tmp, quiet_stdout(quiet):
        model, parameters = build_demo_model(choice, seed, Path(tmp))
    seconds["build"] = time.perf_counter() - started
    t = time.perf_counter()
    the_plan = kbit_plan(model, upcast=upcast, registry=registry)
    peft = peft_plan(model, registry=registry)
    if on_plan is not None:
        on_plan(the_plan)
    kbit_prepare(model, plan=the_plan)
    from .._api import report as kbit_report

    report = kbit_report(model)
    model_class = type(model).__name__
    torch.manual_seed(seed)
    autocast = _autocast_dtype(model)  # before LoRA adds its fp32 adapters
    with quiet_stdout(quiet):
        wrapped = _attach_lora(model)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed + 1)
    probe = counting_batch(gen, 2)
    with _maybe_autocast(autocast):
        flow = verify_gradient_flow(wrapped, {"input_ids": probe, "labels": probe})
    seconds["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    wrapped.train()
    losses: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        desc="LoRA training",
        unit="step",
        file=progress,
        disable=progress is None,
        dynamic_ncols=True,
        leave=True,
    )
    batches = _batches(seed)
    try:
        for _ in range(steps):
            ids = next(batches)
            with _maybe_autocast(autocast):
                loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    finally:
        bar.close()
    seconds["train"] = time.perf_counter() - t

    wrapped.eval()
    gen = torch.Generator().manual_seed(seed + 2)
    with _maybe_autocast(autocast):
        accuracy = _accuracy(wrapped, gen)
    prompt = [int(x) for x in counting_batch(gen, 1, 4)[0]]
    with _maybe_autocast(autocast):
        generated = _continue(wrapped, prompt, 8)
    seconds["total"] = time.perf_counter() - started
    return DemoResult(
        backend=choice,
        scheme=SCHEMES[choice.scheme],
        model_class=model_class,
        parameters=parameters,
        plan=the_plan,
        peft=peft,
        report=report,
        gradient_flow=flow,
        lora_params=sum(p.numel() for p in trainable),
        lora_bytes=sum(p.numel() * p.element_size() for p in trainable),
        steps=steps,
        seed=seed,
        losses=losses,
        accuracy=accuracy,
        prompt=prompt,
        generated=generated,
        seconds=seconds,
        autocast=autocast,
    )
