"""The ``kbitprep`` command line (also ``python -m kbitprep``).

Commands::

    kbitprep demo      [--backend NAME] [--upcast none|norms|all] [--steps N] [--seed N] [--json]
    kbitprep backends  [--json]
    kbitprep plan PATH [--quantization SCHEME] [--backend NAME [--allow-mismatch]] [--upcast ...]
                       [--checkpointing on|off|reentrant|non_reentrant] [--json]
    kbitprep plan --config config.json|HUB_ID [--quantization SCHEME] [--dtype ...] [--json]
    kbitprep estimate --config config.json|HUB_ID [--gpu-memory 24GiB] [...] [--json]

``--debug`` and ``--json`` may come before or after the command. Without ``--debug`` the command
prints only kbitprep's own words: what libraries print on stdout (gptqmodel's banner) is discarded,
their log records (bitsandbytes' "Failed to load CPU gemm_4bit_forward ...") and warnings are
switched off, and kbitprep's own warnings are one line each, ``kbitprep: warning: ...``.
``--debug`` shows tracebacks and all library output (on stderr with ``--json``). ``--json`` prints
one JSON object on stdout and nothing else there. Tables are aligned plain text; colour is used only
when the stream is a terminal and ``NO_COLOR`` is not set. ``--checkpointing`` takes the values of
:func:`kbitprep.prepare`'s ``checkpointing=``: ``on`` (``True``: the backend's default mode),
``off`` (``False``), ``reentrant``, ``non_reentrant``. Error messages name options, not keyword
arguments (``--allow-mismatch`` for ``allow_mismatch=True``).

Exit codes: 0 success; 1 a user error (missing path, unknown backend or quantization, malformed
config, backend packages missing ...), reported as one line on stderr, ``kbitprep: error: ...``;
2 a usage error (unknown option or command, invalid choice), also one line; 3 an internal error
(one line; ``--debug`` shows the traceback); 130 interrupted.

JSON output (stable keys; new keys may be added, none removed or renamed within a major version).
Every object has ``"command"`` and ``"kbitprep_version"``. Byte figures are integers (parameter
bytes, each tied parameter once); a "plan" object is :meth:`kbitprep.Plan.to_dict` with
``params=False``: ``model_type, backend, backends, distributions, evidence, forced, trainable,
not_trainable_reason, upcast_policy, checkpointing, checkpointing_note, checkpointing_kwargs,
hooks, fixups, notes, warnings, use_cache_off, totals{params, frozen, upcast, quantized, bytes_before,
bytes_after, byte_delta}, by_module_type{<class>: {params, frozen, upcast, quantized, bytes_before,
bytes_after}}, extras``.

``--config`` takes a ``config.json``, its folder, or a Hugging Face Hub model id, of which only
``config.json`` is fetched (through ``huggingface_hub``: its cache, ``HF_HUB_OFFLINE`` and token). ``-v``
logs what ``plan`` decided (INFO), ``-vv`` the backend choice too (DEBUG).

``demo``:
    ``backend, distribution, evidence[], quantization`` (scheme name);
    ``model{class, parameters, dtype, config{...}}``; ``plan`` (as above);
    ``prepared{frozen, upcast, quantized, upcast_policy, checkpointing, hooks_added[], fixups[], steps[]}``;
    ``memory{loaded_bytes, kbitprep_bytes, peft_bytes, saved_bytes, saved_fraction, peft_upcast,
    peft_upcast_policy, peft_checkpointing, lora_params, lora_bytes}`` (``peft_bytes``: the base
    model's parameter bytes after PEFT's ``prepare_model_for_kbit_training``; ``saved_fraction`` =
    saved / peft);
    ``gradient_flow{ok, checked, with_grad, zero_grad, output_requires_grad, loss}``;
    ``training{task, steps, seed, batch_size, seq_len, lr, lora{r, alpha, target_modules}, losses[],
    first_loss, last_loss, accuracy, autocast (null, or the dtype the forward autocasts to when the
    upcast policy leaves fp32 and half-precision parameters side by side), sample{prompt[], expected[],
    generated[]}}``;
    ``seconds{build, prepare, train, total, process}`` (wall time; ``process`` counts from the
    interpreter's start where the OS tells it, else it equals ``total``).

``backends``:
    ``backends[]{name, distribution, version, entry_point, priority, builtin, description,
    requires[], importable, missing[], install_hint}``, highest priority first;
    ``failures[]{name, distribution, stage, reason}``.

``plan``:
    ``source{mode ("checkpoint" | "config"), path, quantization, dtype}``; ``parameters``;
    ``plan``; ``peft{upcast_policy, checkpointing, upcast, bytes_after, by_module_type}``;
    ``versus_peft{kbitprep_bytes, peft_bytes, saved_bytes, saved_fraction}``;
    ``quantization`` (``--config`` only, else ``null``): ``{name, backend, summary, formula,
    module_class, quantized_layers, quantized_parameters, weight_bytes, overhead_bytes,
    bytes_per_quantized_parameter}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .output import emit_json

__all__ = ["EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "EXIT_USER", "UserError", "main"]

EXIT_OK = 0
EXIT_USER = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "GPTQMODEL_DISABLE_PACK_EXT": "1"}


class UserError(Exception):
    """A problem with what the user asked for; reported as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (``kbitprep: error: ...``), exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # "--debu" must not silently mean --debug
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kbitprep: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- output helpers


class _Style:
    """ANSI styling, on only for terminals and never with ``NO_COLOR``."""

    def __init__(self, stream: TextIO) -> None:
        isatty = getattr(stream, "isatty", None)
        self.on = bool(
            callable(isatty) and isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        )

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)


def _one_line(text: object, limit: int = 600) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 4] + " ..."


def _percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _process_seconds() -> float | None:
    """Wall seconds since this process started (Linux), else ``None``."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@contextlib.contextmanager
def _own_stdout(to_stderr: bool) -> Iterator[TextIO]:
    """Keep stdout for kbitprep's own output: yield a stream to the real stdout, and send everything
    else written there (by Python code, and by C code when stdout is file descriptor 1) to stderr
    (``to_stderr``) or nowhere. Libraries print banners on stdout (gptqmodel) that would otherwise
    mix with kbitprep's tables or break the one JSON document."""
    sys.stdout.flush()
    sink: TextIO = sys.stderr if to_stderr else io.StringIO()
    try:
        fd: int | None = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd != 1:  # stdout replaced in process (tests, notebooks): redirect at the Python level only
        real = sys.stdout
        with contextlib.redirect_stdout(sink):
            yield real
        return
    saved = os.dup(1)
    real_stream = open(saved, "w", encoding="utf-8", closefd=True)  # noqa: SIM115 - closed below
    target = 2 if to_stderr else os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(target, 1)
        with contextlib.redirect_stdout(sink):
            yield real_stream
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        if target != 2:
            os.close(target)
        real_stream.flush()
        real_stream.close()


@contextlib.contextmanager
def _kbitprep_log(verbosity: int) -> Iterator[None]:
    """``-v``: kbitprep's INFO records (what prepare did and why) on stderr; ``-vv``: DEBUG too."""
    if verbosity <= 0:
        yield
        return
    logger = logging.getLogger("kbitprep")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kbitprep: %(levelname)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def _quiet_libraries(debug: bool, quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """Outside ``--debug``: no third-party warnings, no log records (every library's Python logging is
    switched off, bitsandbytes' "Failed to load CPU gemm_4bit_forward" among them) and no loading bars;
    kbitprep's own warnings as one line each. Everything is restored afterwards, so ``main()`` can be
    called in process."""
    from ..errors import KbitprepWarning

    shown: set[str] = set()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = _one_line(message).removeprefix("kbitprep: ")
        if text not in shown:  # once, though the plan and PEFT's plan each raise it
            shown.add(text)
            print(f"kbitprep: warning: {text}", file=sys.stderr)

    if debug:
        yield
        return
    env = {k: os.environ.get(k) for k in _QUIET_ENV}
    disabled = logging.root.manager.disable
    root_level = logging.root.level
    with warnings.catch_warnings():
        # before anything imports a library: some log or warn at import time
        warnings.simplefilter("ignore")
        if not quiet:
            warnings.simplefilter("default", KbitprepWarning)
        warnings.showwarning = show
        if verbose:  # kbitprep's logger stays on: silence the libraries through the root logger instead
            logging.root.setLevel(logging.CRITICAL + 1)
        else:
            logging.disable(logging.CRITICAL)
        for k, v in _QUIET_ENV.items():
            os.environ.setdefault(k, v)
        hf_logging: Any = None
        with contextlib.suppress(ImportError):  # transformers is a dependency; be safe anyway
            from transformers.utils import logging as hf_logging
        hf_state = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) if hf_logging else None
        if hf_logging is not None:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.disable(disabled)
            logging.root.setLevel(root_level)
            for k, old in env.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
            if hf_logging is not None and hf_state is not None:
                hf_logging.set_verbosity(hf_state[0])
                if hf_state[1]:
                    hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- demo


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be a whole number, got {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"--steps must be between 1 and 100000, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _threads(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads must be at least 1, got {value}")
    return value


def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    from .._render import format_bytes, table
    from .demo import run_demo

    style = _Style(out)
    torch.set_num_threads(args.threads)
    progress: TextIO | None = sys.stderr
    if args.json and not sys.stderr.isatty():
        progress = None

    def show_plan(plan: Any) -> None:
        if args.json:
            return
        out.write(
            f"{style.bold('kbitprep demo')}: a tiny Llama (2 layers, hidden 128), random weights, "
            f"saved and loaded back with {plan.backend} on the CPU\n\n{plan}\n\n"
        )
        out.flush()

    result = run_demo(
        args.backend,
        upcast=args.upcast,
        steps=args.steps,
        seed=args.seed,
        on_plan=show_plan,
        progress=progress,
        quiet=not args.debug,
    )
    summary = result.to_dict()
    process = _process_seconds()
    summary["seconds"]["process"] = process if process is not None else summary["seconds"]["total"]
    if args.json:
        emit_json({"command": "demo", **summary}, out)
        return EXIT_OK

    plan, peft, report, flow = result.plan, result.peft, result.report, result.gradient_flow
    train = summary["training"]
    lines: list[str] = []
    first, last = train["first_loss"], train["last_loss"]
    lines.append(
        f"{style.bold('training')}: {train['task']} ({result.steps} steps, batches of "
        f"{train['batch_size']} x {train['seq_len']} tokens, LoRA r={train['lora']['r']} on every linear)"
    )
    lines.append(f"  loss           : {first:.3f} (step 1) -> {last:.3f} (step {result.steps})")
    if result.autocast is not None:
        lines.append(
            f"  autocast       : {train['autocast']} "
            f"(the upcast left fp32 and {train['autocast']} parameters side by side)"
        )
    lines.append(f"  accuracy       : {100 * result.accuracy:.1f}% of next tokens right on 32 new sequences")
    gen_ok = result.generated == result.expected
    lines.append(
        f"  sample         : {' '.join(map(str, result.prompt))} -> {' '.join(map(str, result.generated))}"
        + ("  (correct)" if gen_ok else f"  (expected {' '.join(map(str, result.expected))})")
    )
    lines.append("")
    head = "report"
    lines += [style.bold(head), "=" * len(head)]
    dist = ", ".join(dict.fromkeys(plan.distributions))
    lines.append(f"backend        : {plan.backend} (from {dist})")
    for e in plan.evidence:
        lines.append(f"  evidence     : {e}")
    if plan.to_freeze:
        lines.append(f"frozen         : {len(plan.to_freeze)} parameters ({_count_by_kind(plan.to_freeze)})")
    else:
        lines.append("frozen         : nothing to do (every parameter was loaded frozen)")
    if plan.to_upcast:
        lines.append(
            f"upcast to fp32 : {len(plan.to_upcast)} parameters ({_count_by_kind(plan.to_upcast)}), "
            f"policy {plan.upcast_policy}"
        )
    else:
        lines.append(f"upcast to fp32 : nothing (policy {plan.upcast_policy})")
    if plan.quantized:
        lines.append(
            f"quantized      : {len(plan.quantized)} tensors ({_count_by_kind(plan.quantized)}) left as stored"
        )
    lines.append(f"checkpointing  : {plan.checkpointing.value}")
    for h in report.hooks_added or ("none added",):
        lines.append(f"hooks          : {h}")
    for f in plan.fixups:
        lines.append(f"fix-up         : {f.name}")
    status = style.green("passed") if flow.ok else style.red("FAILED")
    zero = (
        f"; {len(flow.zero_grad)} are exactly zero at step 0 (lora_A: lora_B starts at zero)" if flow.zero_grad else ""
    )
    lines.append(
        f"gradient flow  : {status} - {flow.with_grad} of {flow.checked} LoRA parameters got a gradient" + zero
    )
    lines.append("")
    mem = summary["memory"]
    rows: list[list[object]] = [
        ["loaded", format_bytes(plan.bytes_before), format_bytes(peft.bytes_before)],
        ["after prepare", format_bytes(plan.bytes_after), format_bytes(peft.bytes_after)],
        ["parameters upcast to fp32", len(plan.to_upcast), len(peft.to_upcast)],
        ["checkpointing", plan.checkpointing.value, peft.checkpointing.value],
    ]
    lines.append(table(["parameter memory (base model)", "kbitprep.prepare", "PEFT's function"], rows, right=(1, 2)))
    saved = mem["saved_bytes"]
    if saved > 0:
        lines.append(
            f"kbitprep keeps {style.bold(format_bytes(saved))} less than PEFT's "
            f"prepare_model_for_kbit_training ({_percent(saved, peft.bytes_after)} less parameter memory)"
        )
    elif saved == 0:
        lines.append("the same parameter memory as PEFT's prepare_model_for_kbit_training")
    else:
        lines.append(
            f"{format_bytes(-saved)} more than PEFT's prepare_model_for_kbit_training (policy {plan.upcast_policy})"
        )
    if result.scheme.peft_note:
        lines.append(f"note: {result.scheme.peft_note}")
    lines.append(
        f"LoRA adapters  : {result.lora_params:,} parameters, {format_bytes(result.lora_bytes)} (the same either way)"
    )
    secs = summary["seconds"]
    lines.append("")
    lines.append(
        f"done in {secs['process']:.1f} s (build {secs['build']:.1f} s, prepare + LoRA + check "
        f"{secs['prepare']:.1f} s, training {secs['train']:.1f} s; {args.threads} torch thread"
        f"{'s' if args.threads > 1 else ''})"
    )
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK if flow.ok else EXIT_USER


def _count_by_kind(params: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for p in params:
        counts[p.module_type] = counts.get(p.module_type, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------- backends


def _cmd_backends(args: argparse.Namespace, out: TextIO) -> int:
    from .._registry import default_registry
    from .._render import table

    style = _Style(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failures are listed below
        reg = default_registry()
        infos = [reg.get(n) for n in reg.names()]
        failures = reg.failures()
    entries: list[dict[str, Any]] = []
    for info in infos:
        missing = info.missing()
        b = info.backend
        entries.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "entry_point": info.entry_point,
                "priority": b.priority,
                "builtin": info.builtin,
                "description": _one_line(getattr(b, "description", "") or ""),
                "requires": list(b.requires),
                "importable": not missing,
                "missing": missing,
                "install_hint": b.install_hint or (f"pip install {' '.join(missing)}" if missing else ""),
            }
        )
    fails = [
        {"name": f.name, "distribution": f.distribution, "stage": f.stage, "reason": _one_line(f.reason)}
        for f in failures
    ]
    if args.json:
        emit_json({"command": "backends", "backends": entries, "failures": fails}, out)
        return EXIT_OK
    rows = []
    for e in entries:
        dist = f"{e['distribution']} {e['version']}".strip()
        ok = "yes" if e["importable"] else f"no: needs {', '.join(e['missing'])} ({e['install_hint']})"
        rows.append([e["name"], e["priority"], dist, ok, e["description"]])
    out.write(style.bold(f"{len(entries)} registered backends") + " (highest priority first)\n")
    out.write(table(["name", "priority", "from", "importable", "description"], rows, right=(1,)) + "\n")
    if fails:
        out.write("\n" + style.red(f"{len(fails)} plugins failed to load") + "\n")
        out.write(
            table(
                ["name", "from", "stage", "reason"],
                [[f["name"], f["distribution"], f["stage"], f["reason"]] for f in fails],
            )
            + "\n"
        )
    else:
        out.write("\nno plugin failed to load\n")
    return EXIT_OK


# --------------------------------------------------------------------------- plan


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        from .metaplan import is_hub_id

        hint = ""
        if "/" in str(path) and is_hub_id(str(path)):  # org/name: a plain missing name is more likely a typo
            hint = (
                f"; PATH is a local checkpoint: to plan the hub model {path} from its config alone (no weights), "
                f"pass --config {path}"
            )
        raise UserError(f"no such file or directory: {path}{hint}")
    if path.is_file():
        if path.suffix == ".json":
            raise UserError(f"{path} is a file; to plan from a config without weights, pass --config {path}")
        raise UserError(f"{path} is a file, not a checkpoint folder (expected a folder with config.json and weights)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a transformers checkpoint folder")
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise UserError(
            f"{path} has a config.json but no weights; to plan from the config alone on the meta "
            f"device, pass --config {path / 'config.json'}"
        )
    return path


def _dtype(text: str) -> Any:
    import torch

    if text == "auto":
        return None
    return {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }[text]


#: ``--checkpointing`` choices and the ``checkpointing=`` value of the API each one stands for.
CHECKPOINTING_CHOICES: dict[str, bool | str] = {
    "on": True,
    "off": False,
    "reentrant": "reentrant",
    "non_reentrant": "non_reentrant",
}


def _checkpointing(text: str) -> bool | str:
    return CHECKPOINTING_CHOICES[text]


def _cli_words(message: str) -> str:
    """An API error message in the command line's words: keyword arguments become options
    (``allow_mismatch=True`` -> ``--allow-mismatch``, ``backend='hqq'`` -> ``--backend hqq``)."""
    message = message.replace("allow_mismatch=True", "--allow-mismatch")
    message = re.sub(r"\b(backend|upcast|checkpointing)='([^']*)'", r"--\1 \2", message)
    return re.sub(r"\b(backend|upcast|checkpointing)=(?=[\s,.;]|$)", r"--\1", message)


def _versus_peft(plan: Any, peft: Any) -> dict[str, Any]:
    saved = peft.bytes_after - plan.bytes_after
    return {
        "kbitprep_bytes": plan.bytes_after,
        "peft_bytes": peft.bytes_after,
        "saved_bytes": saved,
        "saved_fraction": saved / peft.bytes_after if peft.bytes_after else 0.0,
    }


def _log_plan(plan: Any, peft: Any, source: dict[str, Any]) -> None:
    """What the plan decided, at INFO on the ``kbitprep`` logger (``-v``), as prepare logs what it did."""
    from .._render import format_bytes

    log = logging.getLogger("kbitprep.plan")
    if not log.isEnabledFor(logging.INFO):
        return
    model = plan.model_type.rsplit(".", 1)[-1]
    log.info(
        "plan for %s (%s %s): backend %s%s; upcast policy %s (%d parameters to fp32); checkpointing %s (%s); "
        "%d parameters to freeze, %d quantized",
        model,
        source["mode"],
        source["path"],
        plan.backend,
        " (forced)" if plan.forced else "",
        plan.upcast_policy,
        len(plan.to_upcast),
        plan.checkpointing.value,
        plan.checkpointing_note,
        len(plan.to_freeze),
        len(plan.quantized),
    )
    log.info(
        "parameter bytes after prepare: kbitprep %s, PEFT's prepare_model_for_kbit_training %s",
        format_bytes(plan.bytes_after),
        format_bytes(peft.bytes_after),
    )


def _cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    from .._api import plan as kbit_plan
    from .._render import format_bytes, table
    from ..errors import KbitprepError
    from .metaplan import SCHEMES, load_config, peft_plan, plan_from_config

    style = _Style(out)
    if args.path is None and args.config is None:
        raise UserError(
            "give a checkpoint folder (kbitprep plan PATH) or a config (kbitprep plan --config config.json)"
        )
    if args.path is not None and args.config is not None:
        raise UserError("give either a checkpoint folder or --config, not both")
    if args.allow_mismatch and args.backend is None:
        raise UserError("--allow-mismatch applies to a backend chosen with --backend")
    scheme_name = args.quantization or "none"
    quantization: dict[str, Any] | None = None
    if args.config is not None:
        if args.backend is not None:
            raise UserError("--backend applies to loaded checkpoints; with --config the backend follows --quantization")
        config = load_config(args.config)
        cfg_q = getattr(config, "quantization_config", None)
        if args.quantization is None and cfg_q:
            raise UserError(
                f"{args.config} carries a quantization_config; choose the matching --quantization "
                f"({', '.join(SCHEMES)})"
            )
        meta = plan_from_config(
            config,
            scheme_name,
            upcast=args.upcast,
            checkpointing=_checkpointing(args.checkpointing),
            dtype=_dtype(args.dtype),
            source=str(args.config),
        )
        plan, peft, parameters = meta.plan, meta.peft, meta.parameters
        quantization = meta.quantization_dict()
        source = {
            "mode": "config",
            "path": str(args.config),
            "quantization": scheme_name,
            "dtype": str(meta.dtype).removeprefix("torch."),
        }
    else:
        from .demo import check_scheme_available, load_checkpoint

        path = _checkpoint_dir(Path(args.path))
        scheme = SCHEMES[scheme_name]
        check_scheme_available(scheme)
        if args.backend is not None:
            from .._registry import default_registry

            default_registry().get(args.backend)  # UnknownBackendError before the (slow) load
        from .demo import quiet_stdout

        try:
            with quiet_stdout(not args.debug):
                model = load_checkpoint(path, scheme, _dtype(args.dtype))
        except KbitprepError:
            raise
        except Exception as exc:  # whatever the files hold (a corrupt .safetensors, a bad pickle ...)
            raise UserError(
                f"cannot load {path} with quantization {scheme_name}: {type(exc).__name__}: {_one_line(exc)}"
            ) from exc
        plan = kbit_plan(
            model,
            backend=args.backend,
            allow_mismatch=args.allow_mismatch,
            upcast=args.upcast,
            checkpointing=_checkpointing(args.checkpointing),
        )
        peft = peft_plan(model)
        parameters = sum(p.numel() for p in model.parameters())
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype.is_floating_point})
        source = {"mode": "checkpoint", "path": str(path), "quantization": scheme_name, "dtype": ",".join(dtypes)}
    vs = _versus_peft(plan, peft)
    _log_plan(plan, peft, source)
    if args.json:
        emit_json(
            {
                "command": "plan",
                "source": source,
                "parameters": parameters,
                "plan": plan.to_dict(params=False),
                "peft": {
                    "upcast_policy": peft.upcast_policy,
                    "checkpointing": peft.checkpointing.value,
                    "upcast": len(peft.to_upcast),
                    "bytes_after": peft.bytes_after,
                    "by_module_type": peft.by_module_type(),
                },
                "versus_peft": vs,
                "quantization": quantization,
            },
            out,
        )
        return EXIT_OK
    lines = [str(plan)]
    if quantization is not None and quantization["quantized_layers"]:
        q = quantization
        lines.append(
            f"quantized      : {q['quantized_layers']} linears, {q['quantized_parameters']:,} of {parameters:,} "
            f"parameters -> {format_bytes(q['weight_bytes'])} data + {format_bytes(q['overhead_bytes'])} "
            f"scales/state ({q['bytes_per_quantized_parameter']:.4f} byte per parameter)"
        )
    lines.append("")
    lines.append(style.bold("versus PEFT's prepare_model_for_kbit_training"))
    rows: list[list[object]] = [
        ["upcast policy", plan.upcast_policy, peft.upcast_policy],
        ["parameters upcast to fp32", len(plan.to_upcast), len(peft.to_upcast)],
        ["checkpointing", plan.checkpointing.value, peft.checkpointing.value],
        ["parameter bytes after", format_bytes(plan.bytes_after), format_bytes(peft.bytes_after)],
    ]
    lines.append(table(["", "kbitprep", "PEFT"], rows, right=(1, 2)))
    saved = vs["saved_bytes"]
    if saved > 0:
        lines.append(
            f"kbitprep keeps {style.bold(format_bytes(saved))} less ({_percent(saved, peft.bytes_after)} less than "
            "PEFT's)"
        )
    elif saved < 0:
        lines.append(f"kbitprep keeps {format_bytes(-saved)} more (upcast policy {plan.upcast_policy})")
    else:
        lines.append("the same parameter memory as PEFT")
    scheme = SCHEMES[scheme_name]
    note = scheme.peft_note if plan.backend == scheme.backend else ""
    if note:
        lines.append(f"note: {note}")
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------- parser and main


def _scheme_type(debug: bool) -> Callable[[str], str]:
    """``--quantization``'s type: reading the schemes loads the plugins, whose imports may be noisy;
    outside ``--debug`` they are as quiet during parsing as during the command."""
    from .metaplan import scheme_name

    def checked(value: str) -> str:
        if debug:
            return scheme_name(value)
        with _quiet_libraries(False), _own_stdout(to_stderr=False):
            return scheme_name(value)

    return checked


def build_parser(debug: bool = False) -> argparse.ArgumentParser:
    """The argument parser of the ``kbitprep`` command (``debug``: the command line has ``--debug``,
    so loading plugins while parsing may print)."""
    from .._policies import UPCAST_POLICIES

    json_help = "print one JSON object on stdout (keys: see docs/cli.md)"
    debug_help = "show tracebacks and library output (warnings, logs, banners)"
    parser = _Parser(prog="kbitprep", description="Prepare quantized transformers models for LoRA/QLoRA training.")
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    verbose_help = "-v: log what kbitprep does and why (INFO) on stderr; -vv: diagnosis too (DEBUG)"
    quiet_help = "print only the result: no kbitprep warnings"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    # The same flags after the command. SUPPRESS: a subcommand that is not given them must not reset
    # what was given before it (argparse copies a subparser's defaults over the namespace).
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"kbitprep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    upcast_help = "upcast policy: " + "; ".join(f"{k}: {v}" for k, v in UPCAST_POLICIES.items())
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="quantize, plan, prepare and LoRA-train a tiny built-in model",
        description="The main job on a built-in tiny Llama: quantize on the CPU, plan, prepare, "
        "attach LoRA, train on a counting task, report. Downloads nothing.",
    )
    demo.add_argument(
        "--backend", default="bnb-4bit", help="bnb-4bit (default), bnb-8bit, hqq, torchao, quanto or unquantized"
    )
    demo.add_argument(
        "--upcast", choices=list(UPCAST_POLICIES), default=None, help=upcast_help + " (default: the backend's, none)"
    )
    demo.add_argument("--steps", type=_steps, default=40, help="training steps (default 40)")
    demo.add_argument("--seed", type=_int, default=0, help="seed for weights, data and LoRA (default 0)")
    demo.add_argument(
        "--threads",
        type=_threads,
        default=1,
        help="torch CPU threads (default 1: the model is too small to gain from more)",
    )

    sub.add_parser(
        "backends",
        parents=[common],
        help="list registered backends and plugins that failed to load",
        description="Every registered backend with its distribution, version, priority and whether "
        "its packages import; then every plugin that failed to load.",
    )

    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="plan a local checkpoint, or a config on the meta device",
        description="Print what kbitprep.prepare would do to a local checkpoint (loaded, "
        "optionally quantized), or to the model a config.json describes (built on the "
        "meta device: no weights are allocated), against PEFT's function.",
    )
    plan.add_argument("path", nargs="?", help="a local checkpoint folder (config.json and weights)")
    plan.add_argument(
        "--config",
        help="plan from this config.json (or its folder, or a Hugging Face Hub model id: only its config.json is "
        "fetched) on the meta device instead of loading weights",
    )
    plan.add_argument(
        "--quantization",
        type=_scheme_type(debug),
        default=None,
        metavar="SCHEME",
        help="load (or size) the model with this quantization (default: none, as saved)",
    )
    plan.add_argument("--backend", default=None, help="force this backend instead of detecting it")
    plan.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="with --backend: use that backend even if it does not recognise the model",
    )
    plan.add_argument("--upcast", choices=list(UPCAST_POLICIES), default=None, help=upcast_help)
    plan.add_argument(
        "--checkpointing",
        choices=list(CHECKPOINTING_CHOICES),
        default="on",
        help="on: the backend's default mode (default); off: none; reentrant or non_reentrant: that mode "
        "(the values of kbitprep.prepare's checkpointing=: True, False, 'reentrant', 'non_reentrant')",
    )
    plan.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="float dtype to load or plan in (default: the checkpoint's / config's)",
    )
    from .estimate import add_estimate_parser

    add_estimate_parser(sub, parents=[common], scheme_type=_scheme_type(debug))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kbitprep`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser(debug="--debug" in (sys.argv[1:] if argv is None else list(argv)))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = bool(args.debug)
    verbosity = 0 if args.quiet else int(args.verbose)
    from .estimate import run_estimate

    commands = {"demo": _cmd_demo, "backends": _cmd_backends, "plan": _cmd_plan, "estimate": run_estimate}
    from ..errors import KbitprepError

    try:
        with _quiet_libraries(debug, quiet=bool(args.quiet), verbose=verbosity > 0), _kbitprep_log(verbosity):
            if debug and not args.json:
                return commands[args.command](args, sys.stdout)
            with _own_stdout(to_stderr=debug) as out:
                return commands[args.command](args, out)
    except KeyboardInterrupt:
        print("kbitprep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, KbitprepError) as exc:
        if debug:
            traceback.print_exc()
        print(f"kbitprep: error: {_cli_words(_one_line(exc))}", file=sys.stderr)
        return EXIT_USER
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"kbitprep: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
