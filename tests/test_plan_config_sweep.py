"""``kbitprep plan --config`` on every model type transformers knows: a plan or a clear error, never a raw one.

For each model type of transformers' ``CONFIG_MAPPING``, its default config is shrunk to 2 layers
(:func:`shrink`: ``num_hidden_layers`` of the text config, and the per-layer lists the estimate cuts
with it) and planned by :func:`kbitprep.app.metaplan.plan_from_config` (bnb-4bit) on the meta device.
Each must end in a plan or a :class:`kbitprep.KbitprepError`; anything else is a "raw" error (a
traceback for the user). A missing optional package (timm ...) must be a ``BackendUnavailableError``
that names it; a config left inconsistent by the shrink (Gemma 3n keeps per-layer lists of its own)
a ``ConfigError``. The sweep runs in a child process (it imports every model of transformers, about
a minute of CPU) and also runs on its own, printing the counts::

    .venv/bin/python -m tests.test_plan_config_sweep [--verbose]

The quick tests at the end check the same on one case each, whatever packages are installed, and
a ``config.json`` that transformers' own validators reject (``kbitprep plan --config``'s path).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: Shrunk depth of every swept config.
LAYERS = 2


@dataclass
class Sweep:
    """The outcome of every model type: ``plan``, ``clear`` (a KbitprepError) or ``raw`` (anything else)."""

    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # model type -> (kind, message)
    seconds: float = 0.0

    def count(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.outcomes.values())

    def of(self, kind: str) -> dict[str, str]:
        return {mt: msg for mt, (k, msg) in self.outcomes.items() if k == kind}


def shrink(config: Any, layers: int = LAYERS) -> Any:
    """A copy of ``config`` whose text config (the config itself for a plain model) has ``layers``
    layers, cut as the estimate cuts it (:func:`kbitprep.app.estimate.truncated_config`: the per-layer
    lists of ``PER_LAYER_KEYS`` cut to as many entries, every other attribute left as it is; some models
    keep more per-layer lists: their config is then inconsistent, as a hand-edited one can be, and must
    fail clearly). A config that refuses the change (a depth set by other keys) keeps its default depth."""
    from kbitprep._anatomy import text_config
    from kbitprep.app.estimate import truncated_config

    depth = getattr(text_config(config), "num_hidden_layers", 0)
    if isinstance(depth, int) and depth > layers:
        try:
            return truncated_config(config, layers)
        except Exception:  # Funnel, ProphetNet: set by other keys; planned at their default depth
            pass
    return copy.deepcopy(config)


def run_sweep(model_types: list[str] | None = None) -> Sweep:
    """Plan every model type (or those given) from its default config shrunk to :data:`LAYERS` layers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.errors import KbitprepError

    hf_logging.set_verbosity_error()
    sweep = Sweep()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in model_types if model_types is not None else sorted(CONFIG_MAPPING.keys()):
            try:
                config = shrink(CONFIG_MAPPING[model_type]())
            except Exception as exc:  # transformers cannot make its own default: not kbitprep's to judge
                sweep.outcomes[model_type] = ("skip", f"{type(exc).__name__}: {exc}")
                continue
            try:
                plan_from_config(config, "bnb-4bit")
            except KbitprepError as exc:
                sweep.outcomes[model_type] = ("clear", f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                sweep.outcomes[model_type] = ("raw", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            else:
                sweep.outcomes[model_type] = ("plan", "")
    sweep.seconds = time.perf_counter() - start
    return sweep


def _summary(sweep: Sweep) -> str:
    c = sweep.count()
    return (
        f"{len(sweep.outcomes)} model types: {c['plan']} plans, {c['clear']} clear errors, {c['raw']} raw errors"
        + (f", {c['skip']} without a default config" if c["skip"] else "")
        + f" ({sweep.seconds:.1f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the counts (``--verbose``: every raw error; ``--json``: the outcomes as JSON)."""
    args = sys.argv[1:] if argv is None else argv
    sweep = run_sweep()
    if "--json" in args:
        print(json.dumps({"seconds": sweep.seconds, "outcomes": sweep.outcomes}))
        return 0
    print(_summary(sweep))
    if "--verbose" in args:
        for model_type, message in sorted(sweep.of("raw").items()):
            print(f"  raw   {model_type}: {message}")
    return 0


@pytest.fixture(scope="module")
def sweep() -> Sweep:
    """The sweep of every model type, in a child process (it imports every model class of transformers)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_plan_config_sweep", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout.strip().splitlines()[-1])
    result = Sweep({k: (v[0], v[1]) for k, v in data["outcomes"].items()}, data["seconds"])
    print(_summary(result))
    return result


@pytest.mark.slow
def test_every_model_type_plans_or_fails_clearly(sweep: Sweep) -> None:
    raw = sweep.of("raw")
    assert not raw, "raw errors from plan --config:\n" + "\n".join(f"{k}: {v}" for k, v in sorted(raw.items()))
    # the sweep is a real one: most model types plan, and some are refused clearly
    c = sweep.count()
    assert c["plan"] > 400 and c["clear"] > 50, c


@pytest.mark.slow
def test_a_missing_optional_package_is_named_with_its_install_command(sweep: Sweep) -> None:
    needs = {mt: msg for mt, msg in sweep.of("clear").items() if msg.startswith("BackendUnavailableError")}
    if not needs:
        pytest.skip("every optional package the models need is installed here (the quick tests check the message)")
    for model_type, message in needs.items():
        # the package, and how to install it: a pip command, or the page transformers points to
        assert re.search(
            r"needs [\w.-]+, which cannot be imported here; install it (with: pip install |as http)", message
        ), (
            model_type,
            message,
        )


# --------------------------------------------------------------------------- the same, one case at a time (quick)


def _tiny_llama_config() -> Any:
    from kbitprep.testing import tiny_llama_config

    return tiny_llama_config()


def test_a_model_whose_code_needs_a_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own ``requires_backends`` message, as a model without timm raises it."""
    import transformers
    from transformers.utils.import_utils import BACKENDS_MAPPING

    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.errors import BackendUnavailableError

    def needs_timm(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ImportError(BACKENDS_MAPPING["timm"][1].format(type(self).__name__))

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", needs_timm)
    with pytest.raises(BackendUnavailableError) as info:
        plan_from_config(_tiny_llama_config(), "bnb-4bit")
    assert str(info.value) == (
        "cannot build a llama model from this config: its transformers code (LlamaForCausalLM) needs timm, "
        "which cannot be imported here; install it with: pip install timm"
    )
    assert isinstance(info.value, ImportError)


def test_a_missing_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers

    from kbitprep.app.metaplan import build_meta_model
    from kbitprep.errors import BackendUnavailableError

    def no_natten(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ModuleNotFoundError("No module named 'natten.functional'", name="natten.functional")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", no_natten)
    with pytest.raises(BackendUnavailableError, match="needs natten, which .*install it with: pip install natten$"):
        build_meta_model(_tiny_llama_config(), torch.bfloat16)


def test_an_error_inside_the_model_code_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An IndexError from per-layer settings that do not match the depth (as Gemma 3n's text model raises)."""
    import transformers

    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.errors import ConfigError

    def per_layer(self: Any, *args: Any, **kwargs: Any) -> None:
        [][2]

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", per_layer)
    with pytest.raises(ConfigError, match="looks inconsistent .*IndexError: list index out of range"):
        plan_from_config(_tiny_llama_config(), "bnb-4bit")


def test_gemma3n_text_with_its_depth_changed_alone_is_a_clear_error() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from kbitprep.app.metaplan import plan_from_config
    from kbitprep.errors import ConfigError

    if "gemma3n_text" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no Gemma 3n")
    config = CONFIG_MAPPING["gemma3n_text"]()
    config.num_hidden_layers = LAYERS  # its per-layer lists keep their length
    with pytest.raises(ConfigError, match="cannot build a gemma3n_text model from this config"):
        plan_from_config(config, "bnb-4bit")


def test_an_inconsistent_config_json_is_a_config_error(tmp_path: Path) -> None:
    """transformers' config validators raise their own exception classes (not ValueError)."""
    from transformers import Qwen2Config

    from kbitprep.app.metaplan import load_config
    from kbitprep.errors import ConfigError

    data = Qwen2Config(num_hidden_layers=4).to_dict()
    data["num_hidden_layers"] = LAYERS  # layer_types still lists 4 layers
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"inconsistent config .*config\.json: .*num_hidden_layers"):
        load_config(path)


if __name__ == "__main__":
    raise SystemExit(main())
