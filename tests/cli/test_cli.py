"""The ``kbitprep`` command line, run as a user runs it: ``python -m kbitprep ...`` in a subprocess.

Every command is launched once, up front, a few at a time (importing torch and transformers is
most of each run's cost); the tests then check what each printed and returned. Bad inputs must
exit non-zero with exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from tests.distributions import install

LLAMA_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
#: Peak RSS allowed for planning the 70B config: 70.6e9 parameters x 0.5 byte would be ~33 GiB.
META_RSS_LIMIT = 3 * 1024**3


@dataclass(frozen=True)
class Run:
    """A finished command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    max_rss: int = 0  # bytes, when measured

    def json(self) -> Any:
        return json.loads(self.stdout)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "KBITPREP_STRICT")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = [p for p in (extra.pop("PYTHONPATH", ""), env.get("PYTHONPATH", "")) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def _run(args: tuple[str, ...], env: dict[str, str], measure_rss: bool = False) -> Run:
    cmd = [sys.executable, "-m", "kbitprep", *args]
    if args == ("--version",):  # the installed console script, once
        cmd = [str(Path(sys.executable).with_name("kbitprep")), *args]
    if not measure_rss:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        return Run(args, p.returncode, p.stdout, p.stderr)
    # A fresh parent whose only child is the command: RUSAGE_CHILDREN then is that child's peak RSS.
    probe = textwrap.dedent(
        """
        import json, resource, subprocess, sys
        p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        print(json.dumps({"rc": p.returncode, "out": p.stdout, "err": p.stderr, "rss": rss}))
        """
    )
    p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    return Run(args, r["rc"], r["out"], r["err"], r["rss"])


def tiny_llama_checkpoint(root: Path) -> Path:
    """``root/tiny-llama``: a copy of the tests' tiny bf16 Llama checkpoint (:func:`tests.tiny.saved_tiny_llama`)."""
    from tests.tiny import saved_tiny_llama

    ckpt = root / "tiny-llama"
    shutil.copytree(saved_tiny_llama(), ckpt)
    return ckpt


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs for the commands: a tiny checkpoint, configs good and bad, an hqq blocker, plugin distributions."""
    root = tmp_path_factory.mktemp("cli")
    ckpt = tiny_llama_checkpoint(root)
    weightless = root / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((ckpt / "config.json").read_text())
    out = {"ckpt": ckpt, "weightless": weightless}
    for name, text in {
        "llama70b": json.dumps(LLAMA_70B),
        "bad_json": '{"model_type": "llama", "hidden_size": 8192,,}',
        "no_model_type": '{"hidden_size": 8192}',
        "unknown_type": '{"model_type": "no-such-model"}',
        "unbuildable": '{"model_type": "llama", "vocab_size": -5}',
        "quantized_config": json.dumps({**LLAMA_70B, "quantization_config": {"quant_method": "gptq", "bits": 4}}),
    }.items():
        path = root / f"{name}.json"
        path.write_text(text)
        out[name] = path
    # Make hqq unimportable in a child, the way a missing package is: sys.modules["hqq"] = None makes
    # importlib.util.find_spec("hqq") return None and `import hqq` raise ModuleNotFoundError.
    blocker = root / "no-hqq"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["hqq"] = None\n')
    out["no_hqq"] = blocker
    out["broken_dist"] = install("broken-import")
    out["good_dist"] = install("good-plugin")
    return out


# name -> (args, env builder, measure rss)
def _commands(f: dict[str, Path]) -> dict[str, tuple[tuple[str, ...], dict[str, str], bool]]:
    plain = _env()
    no_hqq = _env(PYTHONPATH=str(f["no_hqq"]))
    plugins = _env(PYTHONPATH=os.pathsep.join([str(f["no_hqq"]), str(f["broken_dist"]), str(f["good_dist"])]))
    c: dict[str, tuple[tuple[str, ...], dict[str, str], bool]] = {
        "demo_json": (("demo", "--steps", "12", "--json"), plain, False),
        "demo_text": (("demo", "--steps", "3", "--upcast", "norms"), plain, False),
        "backends_json": (("backends", "--json"), plugins, False),
        "backends_text": (("backends",), plugins, False),
        "plan_ckpt_json": (("plan", str(f["ckpt"]), "--quantization", "bnb-4bit", "--json"), plain, False),
        "plan_ckpt_text": (("plan", str(f["ckpt"]), "--quantization", "bnb-4bit"), plain, False),
        "plan_70b": (("plan", "--config", str(f["llama70b"]), "--quantization", "bnb-4bit", "--json"), plain, True),
        "plan_70b_text": (("plan", "--config", str(f["llama70b"]), "--quantization", "bnb-4bit"), plain, False),
        "debug_traceback": (("plan", str(f["ckpt"] / "missing"), "--debug"), plain, False),
        "console_script": (("--version",), plain, False),
    }
    for name, (args, env) in BAD_INPUTS.items():
        c[name] = (
            tuple(a.format(**{k: str(v) for k, v in f.items()}) for a in args),
            no_hqq if env == "no_hqq" else plain,
            False,
        )
    return c


#: Bad inputs run as subprocesses: name -> ((args with {file} placeholders), env); outcome in BAD_EXPECT.
BAD_INPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "missing_path": (("plan", "{ckpt}/no-such-folder"), "plain"),
    "no_weights": (("plan", "{weightless}"), "plain"),
    "malformed_config": (("plan", "--config", "{bad_json}"), "plain"),
    "unknown_model_type": (("plan", "--config", "{unknown_type}"), "plain"),
    "unknown_quantization": (("plan", "--config", "{llama70b}", "--quantization", "int3"), "plain"),
    "unknown_backend_plan": (("plan", "{ckpt}", "--backend", "no-such-backend"), "plain"),
    "unknown_backend_demo": (("demo", "--backend", "no-such-backend"), "plain"),
    "demo_backend_without_cpu": (("demo", "--backend", "eetq"), "plain"),
    "demo_packages_missing": (("demo", "--backend", "hqq"), "no_hqq"),
    "plan_packages_missing": (("plan", "{ckpt}", "--quantization", "hqq-4bit"), "no_hqq"),
    "bad_steps": (("demo", "--steps", "0"), "plain"),
}
BAD_EXPECT: dict[str, tuple[int, str]] = {
    "missing_path": (1, "no such file or directory"),
    "no_weights": (1, "has a config.json but no weights; to plan from the config alone"),
    "malformed_config": (1, "not valid JSON"),
    "unknown_model_type": (1, "'no-such-model' is not one transformers knows"),
    "unknown_quantization": (2, "invalid choice: 'int3'"),
    "unknown_backend_plan": (1, "no kbitprep backend is called 'no-such-backend'"),
    "unknown_backend_demo": (1, "unknown demo backend 'no-such-backend'"),
    "demo_backend_without_cpu": (1, "cannot build a 'eetq' model on a CPU"),
    "demo_packages_missing": (1, "install it with: pip install hqq"),
    "plan_packages_missing": (1, "install it with: pip install hqq"),
    "bad_steps": (2, "--steps must be between 1 and 100000"),
}
#: More bad inputs, checked in process through kbitprep.app.cli.main (cheap): args, exit code, message.
MORE_BAD_INPUTS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "path_is_config": (("plan", "{llama70b}"), 1, "is a file; to plan from a config without weights, pass --config"),
    "path_is_file": (("plan", "{ckpt}/model.safetensors"), 1, "is a file, not a checkpoint folder"),
    "no_config_json": (("plan", "{no_hqq}"), 1, "has no config.json"),
    "no_target": (("plan",), 1, "give a checkpoint folder"),
    "path_and_config": (("plan", "{ckpt}", "--config", "{llama70b}"), 1, "not both"),
    "backend_with_config": (("plan", "--config", "{llama70b}", "--backend", "hqq"), 1, "--backend applies to loaded"),
    "missing_config": (("plan", "--config", "{ckpt}/no-such.json"), 1, "config file not found"),
    "no_model_type": (("plan", "--config", "{no_model_type}"), 1, 'no "model_type"'),
    "unbuildable_config": (("plan", "--config", "{unbuildable}"), 1, "cannot build a llama model from this config"),
    "quantized_config": (("plan", "--config", "{quantized_config}"), 1, "carries a quantization_config"),
    "upcast_refused": (
        ("plan", "--config", "{llama70b}", "--quantization", "hqq-4bit", "--upcast", "all"),
        1,
        "not allowed for this backend",
    ),
    "bad_seed": (("demo", "--seed", "x"), 2, "expected a whole number"),
    "unknown_command": (("frobnicate",), 2, "invalid choice: 'frobnicate'"),
}


#: Which commands each (non-parametrized) test reads.
USES: dict[str, tuple[str, ...]] = {
    "test_debug_shows_the_traceback": ("debug_traceback",),
    "test_console_script": ("console_script",),
    "test_demo_json": ("demo_json",),
    "test_demo_text": ("demo_text",),
    "test_backends_json": ("backends_json",),
    "test_backends_text": ("backends_text",),
    "test_plan_checkpoint_json": ("plan_ckpt_json",),
    "test_plan_checkpoint_text": ("plan_ckpt_text",),
    "test_plan_70b_config_on_the_meta_device": ("plan_70b",),
    "test_plan_70b_text": ("plan_70b_text",),
}


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, files: dict[str, Path]) -> dict[str, Callable[[], Run]]:
    """Launch the commands the selected tests need, now, three at a time; each test waits for its own."""
    needed: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not sys.modules[__name__]:
            continue
        name = getattr(item, "originalname", "")
        if name == "test_bad_input_is_one_line_without_traceback":
            needed.add(item.callspec.params["name"])  # type: ignore[attr-defined]
        needed.update(USES.get(name, ()))
    commands = {n: c for n, c in _commands(files).items() if n in needed}
    pool = ThreadPoolExecutor(max_workers=3)
    # the slow ones first, so the quick error cases fill the gaps
    order = sorted(commands, key=lambda n: not n.startswith(("demo_json", "demo_text", "plan_70b", "plan_ckpt")))
    futures: dict[str, Future[Run]] = {n: pool.submit(_run, *commands[n]) for n in order}
    pool.shutdown(wait=False)
    return {n: (lambda fut=fut: fut.result()) for n, fut in futures.items()}


def _assert_clean_error(run: Run, code: int, text: str) -> None:
    err = run.stderr.strip()
    assert run.returncode == code, (run.args, run.returncode, run.stderr)
    assert "\n" not in err, f"stderr is not one line: {run.stderr!r}"
    assert err.startswith("kbitprep: error: "), err
    assert text in err, err
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_without_traceback(runs: dict[str, Callable[[], Run]], name: str) -> None:
    _assert_clean_error(runs[name](), *BAD_EXPECT[name])


@pytest.mark.parametrize("name", list(MORE_BAD_INPUTS))
def test_more_bad_inputs_in_process(files: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    from kbitprep.app.cli import main

    args, code, text = MORE_BAD_INPUTS[name]
    rc = main([a.format(**{k: str(v) for k, v in files.items()}) for a in args])
    out, err = capsys.readouterr()
    _assert_clean_error(Run(args, rc, out, err), code, text)


def test_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.app.cli import main

    assert main(["--version"]) == 0
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quantization" in out and "kbitprep" in out


class _Tty:
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    from kbitprep.app.cli import _Style

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert _Style(_Tty()).bold("x") == "\033[1mx\033[0m"  # type: ignore[arg-type]
    assert _Style(sys.stdout).bold("x") == "x"  # captured by pytest: not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert _Style(_Tty()).bold("x") == "x"  # type: ignore[arg-type]


def test_debug_shows_the_traceback(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["debug_traceback"]()
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("kbitprep: error: no such file or directory")


def test_console_script(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["console_script"]()
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"kbitprep {metadata.version('kbitprep')}"


# --------------------------------------------------------------------------- demo


def _demo_bf16_elements() -> tuple[int, int]:
    """(bf16 elements not quantized by bnb-4bit, LoRA'd linears) of the demo model, from its config."""
    from kbitprep.app.demo import LORA_TARGETS, demo_config

    c = demo_config()
    plain = 2 * c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    return plain, len(LORA_TARGETS) * c.num_hidden_layers


@pytest.mark.slow
def test_demo_json(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["demo_json"]()
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    d = run.json()  # stdout is exactly one JSON document: no banner, no progress bar
    assert (d["command"], d["backend"], d["quantization"]) == ("demo", "bnb-4bit", "bnb-4bit")
    assert any("Linear4bit" in e for e in d["evidence"])
    plain, linears = _demo_bf16_elements()
    t = d["training"]
    assert t["steps"] == 12 and len(t["losses"]) == 12
    assert t["first_loss"] == t["losses"][0] and t["last_loss"] == t["losses"][-1]
    assert t["first_loss"] > 0.8 * math.log(64), "an untrained model is near chance"
    assert t["last_loss"] < 0.5 * t["first_loss"], t["losses"]
    g = d["gradient_flow"]
    assert g["ok"] is True
    assert g["checked"] == g["with_grad"] == 2 * linears  # lora_A and lora_B of every targeted linear
    m = d["memory"]
    assert m["kbitprep_bytes"] == m["loaded_bytes"]  # default policy: nothing upcast
    assert m["peft_upcast"] == d["plan"]["totals"]["params"] - d["plan"]["totals"]["quantized"]
    assert m["peft_bytes"] - m["kbitprep_bytes"] == m["saved_bytes"] == 2 * plain  # bf16 -> fp32 copies
    assert m["lora_bytes"] == 4 * m["lora_params"] > 0
    p = d["prepared"]
    assert p["upcast"] == 0 and p["quantized"] == linears and p["checkpointing"] == "reentrant"
    assert p["hooks_added"], "reentrant checkpointing needs the input-require-grads hook"
    assert set(d["seconds"]) >= {"build", "prepare", "train", "total", "process"}


@pytest.mark.slow
def test_demo_text(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["demo_text"]()
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "\033[" not in out, "no colour when stdout is not a terminal"
    for expected in (
        "kbitprep plan for",
        "backend        : bnb-4bit",
        "Linear4bit",
        "loss           :",
        "gradient flow  : passed",
        "parameter memory (base model)",
        "PEFT's function",
        "kbitprep keeps",
        "LoRA adapters",
        # --upcast norms: the QLoRA recipe; fp32 norms beside a bf16 lm_head need autocast to run
        "upcast policy  : norms",
        "upcast to fp32 : 5 parameters (5 LlamaRMSNorm), policy norms",
        "autocast       : bfloat16",
    ):
        assert expected in out, expected
    assert "LoRA training" in run.stderr, "the progress bar is drawn on stderr"
    assert "GPT-QModel" not in out + run.stderr


# --------------------------------------------------------------------------- backends


def _builtin_names() -> set[str]:
    return {
        ep.name
        for ep in metadata.entry_points(group="kbitprep.backends")
        if ep.dist is not None and ep.dist.metadata["Name"] == "kbitprep"
    }


def test_backends_json(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["backends_json"]()
    assert run.returncode == 0, run.stderr
    d = run.json()
    by_name = {b["name"]: b for b in d["backends"]}
    assert _builtin_names() <= set(by_name)
    priorities = [b["priority"] for b in d["backends"]]
    assert priorities == sorted(priorities, reverse=True)
    assert by_name["bnb-4bit"]["distribution"] == "kbitprep"
    assert by_name["bnb-4bit"]["version"] == metadata.version("kbitprep")
    assert by_name["bnb-4bit"]["importable"] is True and by_name["bnb-4bit"]["missing"] == []
    hqq = by_name["hqq"]  # blocked in this child
    assert (hqq["importable"], hqq["missing"], hqq["install_hint"]) == (False, ["hqq"], "pip install hqq")
    good = by_name["scaled-linear"]
    assert (good["distribution"], good["version"], good["builtin"]) == ("kbitprep-goodplugin", "1.2.3", False)
    fails = {(f["name"], f["stage"]): f for f in d["failures"]}
    assert "kbitprep_no_such_quant_library" in fails[("broken-import", "load")]["reason"]
    assert fails[("unquantized", "conflict")]["distribution"] == "kbitprep-goodplugin"


def test_backends_text(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["backends_text"]()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name"))
    assert set(lines[header + 1]) <= {"-", " "}
    hqq = next(line for line in lines if line.startswith("hqq "))
    assert "no: needs hqq (pip install hqq)" in hqq
    assert any("plugins failed to load" in line for line in lines)
    assert any(line.startswith("broken-import") and "kbitprep_no_such_quant_library" in line for line in lines)
    assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------- plan


@pytest.mark.slow
def test_plan_checkpoint_json(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["plan_ckpt_json"]()
    assert run.returncode == 0, run.stderr
    d = run.json()
    assert d["source"]["mode"] == "checkpoint" and d["source"]["quantization"] == "bnb-4bit"
    plan = d["plan"]
    assert plan["backend"] == "bnb-4bit" and plan["checkpointing"] == "reentrant"
    kinds = plan["by_module_type"]
    hidden, inter, vocab, layers, kv = 64, 128, 256, 2, 2 * 16
    linear_elems = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter)
    assert kinds["Linear4bit"]["quantized"] == layers * 7
    assert kinds["Linear4bit"]["bytes_before"] == linear_elems // 2  # packed 4-bit data in the Params4bit
    plain = 2 * vocab * hidden + (2 * layers + 1) * hidden
    assert plan["totals"]["bytes_after"] == linear_elems // 2 + 2 * plain
    assert d["peft"]["upcast"] == plan["totals"]["params"] - plan["totals"]["quantized"]
    assert d["versus_peft"]["saved_bytes"] == 2 * plain
    assert d["quantization"] is None


@pytest.mark.slow
def test_plan_checkpoint_text(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["plan_ckpt_text"]()
    assert run.returncode == 0, run.stderr
    for expected in (
        "backend        : bnb-4bit",
        "module type",
        "Linear4bit",
        "checkpointing  : reentrant",
        "versus PEFT's prepare_model_for_kbit_training",
        "kbitprep keeps",
    ):
        assert expected in run.stdout, expected


def _nf4_bytes(out: int, inp: int) -> int:
    """bitsandbytes NF4 with double quantization, blocksize 64 (the formula in kbitprep.app.metaplan)."""
    n = out * inp
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 64 + 1024


@pytest.mark.slow
def test_plan_70b_config_on_the_meta_device(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["plan_70b"]()
    assert run.returncode == 0, run.stderr
    d = run.json()
    h, layers, heads, kv, inter, vocab = 8192, 80, 64, 8, 28672, 128256
    kv_dim = kv * h // heads
    per_layer = 2 * h * h + 2 * kv_dim * h + 3 * h * inter + 2 * h
    params = 2 * vocab * h + layers * per_layer + h
    assert d["parameters"] == params
    assert abs(params - 70.6e9) < 0.1e9
    linears = [(h, h), (kv_dim, h), (kv_dim, h), (h, h), (inter, h), (inter, h), (h, inter)]
    quantized = layers * sum(_nf4_bytes(o, i) for o, i in linears)
    q = d["quantization"]
    assert q["quantized_layers"] == layers * 7
    assert q["quantized_parameters"] == layers * sum(o * i for o, i in linears)
    assert q["weight_bytes"] + q["overhead_bytes"] == quantized
    plain = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, lm_head, norms: bf16
    assert d["plan"]["totals"]["bytes_before"] == d["plan"]["totals"]["bytes_after"] == quantized + 2 * plain
    assert d["plan"]["backend"] == "bnb-4bit"
    assert d["versus_peft"]["peft_bytes"] == quantized + 4 * plain
    assert d["source"] == {
        "mode": "config",
        "path": d["source"]["path"],
        "quantization": "bnb-4bit",
        "dtype": "bfloat16",
    }
    # No weight memory: the child's peak RSS stays far below even the quantized weights (~36 GiB).
    assert 0 < run.max_rss < META_RSS_LIMIT, run.max_rss


@pytest.mark.slow
def test_plan_70b_text(runs: dict[str, Callable[[], Run]]) -> None:
    run = runs["plan_70b_text"]()
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "on the meta device (no weights allocated)" in out
    assert "70,553,706,496 parameters" in out
    assert "Linear4bit" in out and "versus PEFT's" in out
    assert "UnsupportedModelError" in out  # the note: prepare would refuse this meta model
