"""Hub ids for ``kbitprep plan --config`` and ``kbitprep estimate --config`` (and ``kbitprep.estimate``).

A hub id is read as ``from_pretrained`` reads one, but only its ``config.json`` is fetched, through
``huggingface_hub``: its cache, ``HF_HUB_OFFLINE`` and token. Nothing here touches the network: each
test fills a hub cache of its own (the ``HF_HUB_CACHE`` layout: ``models--org--name/refs/main`` and
``snapshots/<commit>/config.json``), points ``HF_HUB_CACHE`` / ``HF_HOME`` at it after
huggingface_hub was imported (so kbitprep must read them when called, not at import), and makes every
socket connection fail.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig

import kbitprep
from kbitprep.app.cli import main
from kbitprep.app.metaplan import is_hub_id, load_config
from kbitprep.errors import ConfigError

from ..tiny import tiny_llama_config

REPO = "kbitprep-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _config() -> LlamaConfig:
    """The tests' tiny Llama config."""
    return tiny_llama_config()


def fill_hub_cache(cache: Path, repo: str, config: LlamaConfig) -> Path:
    """Put ``config`` in ``cache`` as huggingface_hub caches the ``config.json`` of ``repo``; return the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    config.to_json_file(snapshot / "config.json")
    return snapshot / "config.json"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every socket connection fails (and is recorded)."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError(f"kbitprep test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> Path:
    """An offline hub cache holding the config.json of :data:`REPO`; the environment points at it."""
    cache = tmp_path / "hf-home" / "hub"
    fill_hub_cache(cache, REPO, _config())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # no local folder of the repo's name
    return cache


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("meta-llama/Llama-3.1-8B", True),
        ("gpt2", True),
        ("llama-3.1-8b/config.json", False),
        ("config.json", False),
        ("./tiny-llama", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("~/models/x", False),
        ("bad id/with space", False),
    ],
)
def test_what_reads_as_a_hub_id(text: str, expected: bool) -> None:
    assert is_hub_id(text) is expected


def test_plan_config_takes_a_hub_id(hub: Path, capsys: pytest.CaptureFixture[str], no_network: list[Any]) -> None:
    assert main(["plan", "--config", REPO, "--quantization", "bnb-4bit", "--json"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["source"]["path"] == REPO and d["source"]["mode"] == "config"
    c = _config()
    h, i, v, kv = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_key_value_heads * c.head_dim
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h
    assert d["parameters"] == 2 * v * h + c.num_hidden_layers * per_layer + h
    assert d["quantization"]["quantized_layers"] == 7 * c.num_hidden_layers
    assert any(REPO in e for e in d["plan"]["evidence"]), d["plan"]["evidence"]
    assert not no_network and "error" not in err


def test_estimate_takes_a_hub_id(hub: Path, no_network: list[Any]) -> None:
    est = kbitprep.estimate(REPO, batch=1, seq=16, variants=["default"])
    assert est.model == "Llama" and est.layers == 2 and est.row("default").peak_bytes > 0
    assert not no_network


def test_estimate_command_takes_a_hub_id(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--config", REPO, "--batch", "1", "--seq", "16", "--memory", "lowest", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "Llama" and [r["variant"] for r in d["rows"]] == ["peft", "lowest"]


@pytest.mark.parametrize("command", ["plan", "estimate"])
def test_offline_without_a_cached_copy_says_exactly_that(
    hub: Path, capsys: pytest.CaptureFixture[str], command: str, no_network: list[Any]
) -> None:
    assert main([command, "--config", "kbitprep-test/not-cached"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("kbitprep: error: config file not found:"), err
    assert "'kbitprep-test/not-cached' is not a local file or folder" in err
    assert f"HF_HUB_OFFLINE is set while the hub cache ({hub}) holds no config.json of kbitprep-test/not-cached" in err
    assert "unset HF_HUB_OFFLINE to download it" in err
    assert not no_network


def test_online_with_the_hub_unreachable_uses_the_cached_copy(
    hub: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    # huggingface_hub retries a file it has no copy of with backoff (about 20 s of sleeps): the test skips
    # the sleeps, not the retries (its own module's reference to time only; sleep is all it uses)
    import types

    from huggingface_hub.utils import _http

    slept: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=slept.append))
    config = load_config(REPO)
    assert isinstance(config, LlamaConfig) and config.hidden_size == 64
    with pytest.raises(ConfigError, match="could not be reached .* holds no copy"):
        load_config("kbitprep-test/not-cached")
    assert slept, "huggingface_hub no longer retries here: drop the sleep patch"


def test_a_local_folder_wins_over_a_hub_id(hub: Path, tmp_path: Path) -> None:
    local = tmp_path / "kbitprep-test" / "tiny-llama"
    config = _config()
    config.hidden_size = 32
    config.save_pretrained(local)
    assert load_config(REPO).hidden_size == 32  # ./kbitprep-test/tiny-llama exists: it is the one read


def test_a_local_config_file_name_is_never_a_hub_id(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", "llama-3.1-8b/config.json"]) == 1
    assert "config file not found: llama-3.1-8b/config.json" in capsys.readouterr().err


def test_a_hub_id_as_plan_path_points_to_config(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", REPO]) == 1
    assert f"pass --config {REPO}" in capsys.readouterr().err


def _hub_error(cls: type[Exception], status: int) -> Exception:
    from httpx2 import Request, Response

    return cls("refused", response=Response(status, request=Request("GET", "https://huggingface.co")))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("GatedRepoError", "is a gated model on the Hugging Face Hub: accept its terms"),
        ("RepositoryNotFoundError", "the Hugging Face Hub has no model 'kbitprep-test/private'"),
        ("RemoteEntryNotFoundError", "has no config.json"),
    ],
)
def test_hub_errors_say_what_to_do(
    hub: Path, monkeypatch: pytest.MonkeyPatch, error: str, message: str, no_network: list[Any]
) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    def download(*args: Any, **kwargs: Any) -> str:
        assert kwargs["local_files_only"] is False and kwargs["cache_dir"] == str(hub)
        raise _hub_error(getattr(errors, error), 404)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(ConfigError, match=message):
        load_config("kbitprep-test/private")
