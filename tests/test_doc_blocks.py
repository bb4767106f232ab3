"""Every code block of the documentation runs as printed, offline, on the CPU.

Each page under ``docs/`` is one test. Its fenced blocks are read in order and each one is:

* **run**: ``python`` blocks are executed in one namespace per page (a block may use what an
  earlier block of the same page made); ``pycon`` blocks are run as doctests in that namespace;
  ``bash`` blocks made only of ``kbitprep ...`` commands call the console script's function
  (``kbitprep.app.cli.main``) in this process (no second interpreter importing torch), which must
  return 0. Any other ``bash`` block must be marked: the test never runs an install. Snippet
  includes (``--8<-- "path"``) are expanded first, as the site renders them.
* **marked**: preceded by ``<!-- no-run: reason -->`` (an install command, a fragment): counted
  and listed with its reason, never run.
* **a sample**: a ``text``, ``console``, ``json``, ``toml`` or ``yaml`` fence shows output or a
  file, and is counted as such. A sample preceded by ``<!-- output -->`` must be exactly what the
  python block before it printed (a ``fix-up : bnb-cpu-unpack`` line is expected only on CPUs
  with AVX512-BF16, where bitsandbytes repacks 4-bit weights).

A block in any other language, a ``no-run`` marker without a reason, or a page whose runnable
block is neither run nor marked fails. Every page runs in one shared working folder in which
``getting-started.md``'s "tiny model" block has made ``tiny-llama`` (a 2-layer random Llama and
a locally trained tokenizer), once per session, so the pages' ``"tiny-llama"`` paths work as
printed. ``HF_HUB_OFFLINE=1`` is set: a block that would download fails. The per-page counts and
times are printed at the end of the run (and with ``-s`` as each page finishes).
"""

from __future__ import annotations

import contextlib
import doctest
import gc
import importlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))

PYTHON = {"python", "py"}
PYCON = {"pycon"}
SHELL = {"bash", "sh", "shell"}
SAMPLES = {"text", "console", "json", "toml", "yaml", "yml", "ini"}
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:(?P<reason>.*?)-->\s*$")
OUTPUT = re.compile(r"^\s*<!--\s*output\s*-->\s*$")
#: Printed only on CPUs with AVX512-BF16 (bitsandbytes repacks 4-bit weights there; see backends/bnb-4bit.md).
AVX512_BF16_ONLY = re.compile(r"^fix-up +: bnb-cpu-unpack\b")
SNIPPET = re.compile(r"^(?P<indent>[ \t]*)-{1,}8<-{1,}[ \t]+\"(?P<path>[^\"]+)\"[ \t]*$")
#: The getting-started block that makes the shared model folder.
TINY_MODEL = "tiny-llama"


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    no_run: str | None  # the reason, when marked
    output: bool = False  # a sample marked <!-- output -->: what the previous python block printed

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


@dataclass
class PageResult:
    page: str
    ran: list[Block] = field(default_factory=list)
    marked: list[Block] = field(default_factory=list)
    samples: list[Block] = field(default_factory=list)
    checked: list[Block] = field(default_factory=list)  # samples compared with what was printed
    seconds: float = 0.0
    block_seconds: dict[int, float] = field(default_factory=dict)  # opening line -> seconds


def read_blocks(page: str, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``docs/<page>`` (or of ``text``), dedented, snippet includes expanded."""
    lines = (DOCS / page).read_text().splitlines() if text is None else text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"docs/{page}:{i + 1}: the fence is never closed")
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = NO_RUN.match(prev)
        reason = marker["reason"].strip() if marker else None
        source = "\n".join(_expand(body)) + "\n"
        blocks.append(Block(page, i + 1, lang, source, reason, output=bool(OUTPUT.match(prev))))
        i = j + 1
    return blocks


def _expand(body: list[str]) -> list[str]:
    out: list[str] = []
    for line in body:
        m = SNIPPET.match(line)
        if m:
            out.extend(m["indent"] + text for text in (ROOT / m["path"]).read_text().splitlines())
        else:
            out.append(line)
    return out


# ---------------------------------------------------------------------------------------- running
def _run_python(block: Block, ns: dict[str, Any]) -> str:
    """Run the block in ``ns``; return what it printed (also passed on to the current stdout)."""
    # Pad with blank lines so a traceback's line numbers are the page's own.
    code = compile("\n" * block.line + block.source, block.where, "exec")
    printed = io.StringIO()
    outer = sys.stdout
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, ns)
    finally:
        outer.write(printed.getvalue())
    return printed.getvalue()


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    if not _has_avx512_bf16():
        lines = [line for line in lines if not AVX512_BF16_ONLY.match(line)]
    return lines


def _has_avx512_bf16() -> bool:
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return False
    return bool(getattr(bnbf, "has_avx512bf16", lambda: False)())


def _check_output(block: Block, printed: str | None) -> None:
    assert printed is not None, f"{block.where}: an <!-- output --> sample must follow a python block"
    shown, real = _lines(block.source), [line.rstrip() for line in printed.strip("\n").splitlines()]
    if shown != real:
        import difflib

        diff = "\n".join(difflib.unified_diff(shown, real, "the page shows", "the block printed", lineterm=""))
        raise AssertionError(f"{block.where}: the sample is not what the block above prints\n{diff}")


def _run_pycon(block: Block, ns: dict[str, Any]) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.source, ns, block.where, block.where, block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    runner.run(test, out=out.write, clear_globs=False)
    assert runner.failures == 0, f"{block.where}: the pycon block does not print what it shows\n{out.getvalue()}"


def _run_shell(block: Block, cwd: Path) -> None:
    commands = [line for line in block.source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if commands and all(shlex.split(line, comments=True)[0] == "kbitprep" for line in commands):
        # The console script is kbitprep.app.cli:main: call it in this process (no second torch import).
        from kbitprep.app.cli import main

        for line in commands:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(shlex.split(line, comments=True)[1:])
            assert code == 0, f"{block.where}: `{line}` exited with {code}\n{err.getvalue()[-3000:]}"
        return
    raise AssertionError(
        f"{block.where}: a bash block runs only when it is made of `kbitprep ...` commands;"
        " mark this one <!-- no-run: reason --> (an install, a command for another machine)"
    )


def run_page(page: str, cwd: Path) -> PageResult:
    """Run every block of ``docs/<page>`` in ``cwd``; raise at the first one that fails."""
    result = PageResult(page)
    ns: dict[str, Any] = {"__name__": "__main__"}
    start = time.perf_counter()
    printed: str | None = None
    old = Path.cwd()
    os.chdir(cwd)
    try:
        for block in read_blocks(page):
            t0 = time.perf_counter()
            if block.no_run is not None:
                assert block.no_run, f"{block.where}: a no-run marker must say why"
                result.marked.append(block)
            elif block.lang in SAMPLES:
                result.samples.append(block)
                if block.output:
                    _check_output(block, printed)
                    result.checked.append(block)
            elif block.lang in PYTHON:
                printed = _run_python(block, ns)
                result.ran.append(block)
            elif block.lang in PYCON:
                _run_pycon(block, ns)
                result.ran.append(block)
            elif block.lang in SHELL:
                _run_shell(block, cwd)
                result.ran.append(block)
            else:
                raise AssertionError(
                    f"{block.where}: a {block.lang or 'plain'!r} fence is neither runnable"
                    f" ({sorted(PYTHON | PYCON | SHELL)}), a sample ({sorted(SAMPLES)})"
                    " nor marked <!-- no-run: reason -->"
                )
            result.block_seconds[block.line] = time.perf_counter() - t0
    finally:
        os.chdir(old)
        _cleanup(ns)
    result.seconds = time.perf_counter() - start
    return result


def _cleanup(ns: dict[str, Any]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if len(ns) > 1:  # something ran: free its models now
        ns.clear()
        gc.collect()


# ---------------------------------------------------------------------------------------- fixtures
class _Summary:
    """Prints the per-page table at the end of the run."""

    def __init__(self) -> None:
        self.pages: dict[str, PageResult] = {}
        self.failed: dict[str, str] = {}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.pages and not self.failed:
            return
        tr = terminalreporter
        tr.section("documentation code blocks (run / marked no-run / samples)")
        width = max(len(p) for p in [*self.pages, *self.failed]) + 2
        tr.write_line("page".ljust(width) + "run  marked  samples (checked)  seconds")
        for page in PAGES:
            if page in self.pages:
                r = self.pages[page]
                counts = f"{len(r.ran):>3}  {len(r.marked):>6}  {len(r.samples):>7} ({len(r.checked):>7})"
                tr.write_line(page.ljust(width) + f"{counts}  {r.seconds:>7.1f}")
            elif page in self.failed:
                tr.write_line(page.ljust(width) + f"FAILED: {self.failed[page]}")
        ran = sum(len(r.ran) for r in self.pages.values())
        marked = sum(len(r.marked) for r in self.pages.values())
        samples = sum(len(r.samples) for r in self.pages.values())
        checked = sum(len(r.checked) for r in self.pages.values())
        seconds = sum(r.seconds for r in self.pages.values())
        tr.write_line(
            "TOTAL".ljust(width) + f"{ran:>3}  {marked:>6}  {samples:>7} ({checked:>7})  {seconds:>7.1f}"
            f"   ({len(self.pages)} pages passed, {len(self.failed)} failed)"
        )
        for r in self.pages.values():
            for b in r.marked:
                tr.write_line(f"  no-run {b.where}: {b.no_run}")


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> _Summary:
    table = _Summary()
    request.config.pluginmanager.register(table, "kbitprep-doc-blocks")
    return table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``tiny-llama``, made by getting-started.md's own block (once per session)."""
    cwd = tmp_path_factory.mktemp("docs-run")
    makers = [
        b
        for b in read_blocks("getting-started.md")
        if b.lang in PYTHON and b.no_run is None and f'save_pretrained("{TINY_MODEL}")' in b.source
    ]
    assert makers, f'getting-started.md has no python block that calls save_pretrained("{TINY_MODEL}")'
    if importlib.util.find_spec("gptqmodel") is not None:
        # PEFT imports gptqmodel lazily (in get_peft_model) and its import prints a banner on stdout:
        # import it here, quietly, so no page's checked output depends on which page ran first
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module("gptqmodel")
    old = Path.cwd()
    os.chdir(cwd)
    ns: dict[str, Any] = {"__name__": "__main__"}
    try:
        _run_python(makers[0], ns)
    finally:
        os.chdir(old)
        _cleanup(ns)
    assert (cwd / TINY_MODEL / "config.json").is_file() and (cwd / TINY_MODEL / "tokenizer.json").is_file()
    return cwd


@pytest.fixture
def docs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, CPU, and what a launcher (torchrun) would set for a single process."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in list(os.environ):
        if name.startswith("FSDP_") or name in {"ACCELERATE_USE_FSDP", "KBITPREP_STRICT"}:
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------------------- tests
def test_the_reader_finds_fences_markers_and_snippets() -> None:
    """The block reader on a page made here: indented fences, markers, samples, snippet includes."""
    text = (
        "# t\n\n```python\nx = 1\n```\n\n<!-- no-run: installs -->\n```bash\npip install x\n```\n\n"
        "- item\n\n    ```python\n    y = x + 1\n    ```\n\n```text\nout\n```\n\n"
        '```python\n--8<-- "constraints.txt"\n```\n'
    )
    blocks = read_blocks("probe.md", text)
    assert [(b.line, b.lang, b.no_run) for b in blocks] == [
        (3, "python", None),
        (8, "bash", "installs"),
        (14, "python", None),
        (18, "text", None),
        (22, "python", None),
    ]
    assert blocks[2].source == "y = x + 1\n"
    assert blocks[4].source == (ROOT / "constraints.txt").read_text().rstrip("\n") + "\n"


def test_an_output_sample_that_differs_from_the_print_fails() -> None:
    text = '```python\nprint("a")\nprint("b")\n```\n\n<!-- output -->\n```text\na\nc\n```\n'
    python, sample = read_blocks("probe.md", text)
    assert sample.output and not python.output
    printed = _run_python(python, {})
    with pytest.raises(AssertionError, match=r"(?s)-c.*\+b"):
        _check_output(sample, printed)
    _check_output(Block("probe.md", 6, "text", "a\nb\n\n", None, output=True), printed)


@pytest.mark.parametrize("page", PAGES)
def test_page_blocks_run_as_printed(page: str, workdir: Path, docs_env: None, summary: _Summary) -> None:
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            result = run_page(page, workdir)
    except BaseException as exc:
        summary.failed[page] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        exc.add_note(f"the page's blocks printed (last 3000 characters):\n{printed.getvalue()[-3000:]}")
        raise
    summary.pages[page] = result
    print(
        f"docs/{page}: {len(result.ran)} run, {len(result.marked)} marked no-run,"
        f" {len(result.samples)} samples ({len(result.checked)} checked against the output), {result.seconds:.1f} s"
        f" (per block: {', '.join(f'line {k} {v:.1f} s' for k, v in result.block_seconds.items())})"
    )


# ---------------------------------------------------------------------------------------- the site
def _hook() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kbitprep_docs_hook", DOCS / "hooks" / "kbitprep_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_hook_fences_doctests_and_literal_blocks() -> None:
    fence_code = _hook().fence_code
    doc = (
        "The pipeline is plan -> prepare::\n\n    x = 1\n\n    y = 2\n\nText.\n\n"
        "Example:\n    >>> type(x).__name__  # doctest: +ELLIPSIS\n    'int'\n\n"
        "Example::\n\n    f(x)\n\n```python\n>>> kept\n```"
    )
    assert fence_code(doc) == (
        "The pipeline is plan -> prepare:\n\n```python\nx = 1\n\ny = 2\n```\n\nText.\n\n"
        "Example:\n    ```pycon\n    >>> type(x).__name__\n    'int'\n    ```\n\n"
        "Example:\n    ```python\n    f(x)\n    ```\n\n```python\n>>> kept\n```"
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``mkdocs build`` makes it (not strict: ``test_quality.py`` checks strictness)."""
    out = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBITPREP_")}
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--no-strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_api_reference_renders_examples_and_signatures_as_code(site: Path) -> None:
    pages = {name: (site / "reference" / name / "index.html").read_text() for name in ("kbitprep", "testing")}
    for name, html in pages.items():
        assert "<blockquote>" not in html, f"reference/{name}: a doctest rendered as nested blockquotes"
        assert '<span class="gp">&gt;&gt;&gt; </span>' in html, f"reference/{name}: no pycon prompt"
    # a dunder in an example stays code (it rendered as <strong>name</strong>)
    assert "<strong>name</strong>" not in pages["testing"] and "__name__" in pages["testing"]
    # signatures are formatted over several lines (mkdocstrings needs black or ruff for that)
    prepare = re.search(
        r'id="kbitprep.prepare".*?<div class="doc-signature highlight"><pre>(.*?)</pre>', pages["kbitprep"], re.S
    )
    assert prepare is not None
    signature = re.sub(r"<[^>]+>", "", prepare.group(1))
    assert signature.startswith("prepare(\n    model"), signature[:200]


def test_site_has_a_theme_toggle_no_web_fonts_and_names_each_page_source(site: Path) -> None:
    html = (site / "getting-started" / "index.html").read_text()
    assert html.count('data-md-color-scheme="slate"') >= 1 and "Switch to dark mode" in html
    assert "fonts.googleapis.com" not in html
    assert "Source of this page: <code>docs/getting-started.md</code>" in html
    assert (site / "assets" / "api-prepare.png").is_file() and 'src="../assets/api-prepare.png"' in html


def test_repository_url_gives_repo_and_edit_links(monkeypatch: pytest.MonkeyPatch) -> None:
    from mkdocs.config import load_config

    monkeypatch.setenv("KBITPREP_REPO_URL", "https://example.org/kbitprep")
    monkeypatch.delenv("KBITPREP_EDIT_URI", raising=False)
    config = _hook().on_config(load_config(str(ROOT / "mkdocs.yml")))
    assert config["repo_url"] == "https://example.org/kbitprep"
    assert config["edit_uri"] == "edit/main/docs/"
    assert {"content.action.edit", "content.action.view"} <= set(config["theme"]["features"])
    monkeypatch.delenv("KBITPREP_REPO_URL")
    config = _hook().on_config(load_config(str(ROOT / "mkdocs.yml")))
    assert config["repo_url"] is None and not config["edit_uri"]
