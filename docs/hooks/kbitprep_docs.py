"""Build helpers for kbitprep's documentation site (no network, no import of kbitprep itself).

* :class:`SphinxRoles`, a griffe extension (listed in mkdocs.yml under mkdocstrings' python
  handler): kbitprep's docstrings use Sphinx roles (``:class:`~kbitprep.Plan```). Each one that
  names a documented object becomes a cross-reference (so ``mkdocs build --strict`` fails if it
  is broken), one that names a private or third-party object becomes code, and one that names
  nothing at all is left as a cross-reference to fail the build. Code in docstrings becomes fenced
  code before griffe parses them: doctest examples (``>>>`` lines with their output, which
  Markdown would render as nested blockquotes, ``__name__`` turned bold) become ``pycon`` blocks,
  and RST literal blocks (a paragraph ending ``::`` and the indented lines after it) ``python``
  blocks; the ``::`` becomes ``:``.
* ``on_page_markdown``, an MkDocs hook (listed under ``hooks:``): expands ``<!-- kbitprep-api -->``
  on the API reference page into a mkdocstrings block listing every name ``kbitprep`` exports,
  except those documented with :mod:`kbitprep.plugin` and :mod:`kbitprep.errors`; when the site
  has no ``repo_url``, it ends every page with the path of its source file (the edit link then).
* ``on_config``: with a ``repo_url`` (``KBITPREP_REPO_URL``) and no ``KBITPREP_EDIT_URI``, the edit
  links point to ``edit/main/docs/``.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]
#: The modules the API reference renders; objects defined elsewhere are documented through them.
REFERENCE_MODULES = ("kbitprep.plugin", "kbitprep.errors", "kbitprep.testing")
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
LITERAL_BLOCK = re.compile(r"(\S)::\n")
DOCTEST_FLAGS = re.compile(r"\s*#\s*doctest:\s*[+-]\w+(?:\s*,\s*[+-]\w+)*\s*$")
#: A line griffe's Google parser reads as a section or admonition title (``Example:``), written with
#: RST's ``::``: the code goes inside that section, right below the title (griffe refuses a blank line there).
SECTION_TITLE = re.compile(r"^[ \t]*\w[\s\w-]*::$")


def _exports(module: Any) -> list[str]:
    return [str(name) for name in (module.exports or [])]


def _canonical(obj: Any) -> str | None:
    try:
        return str(obj.canonical_path)
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


@functools.cache
def _top_level_api() -> tuple[str, ...]:
    """Names exported by ``kbitprep`` that are defined outside the reference modules."""
    pkg = griffe.load("kbitprep", search_paths=[str(ROOT)], resolve_aliases=True)
    names = []
    for name in _exports(pkg):
        if name.startswith("__") or name == "errors":
            continue
        canonical = _canonical(pkg[name]) or ""
        if canonical.rsplit(".", 1)[0] not in REFERENCE_MODULES:
            names.append(name)
    return tuple(names)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_code(text: str) -> str:
    """Turn a docstring's doctest examples and RST literal blocks into fenced Markdown code blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            out.append(line)
            i += 1
            continue
        if in_fence:
            out.append(line)
            i += 1
            continue
        if stripped == ">>>" or stripped.startswith(">>> "):
            # a doctest example: the prompts and their output, up to a blank or less indented line
            pad = line[: _indent(line)]
            j = i
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) >= len(pad):
                j += 1
            body = [pad + DOCTEST_FLAGS.sub("", raw[len(pad) :]) for raw in lines[i:j]]
            out += [f"{pad}```pycon", *body, f"{pad}```"]
            i = j
            continue
        if stripped.endswith("::") and stripped != "::":
            # an RST literal block: the indented lines after a paragraph ending "::"
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > base:
                end = j
                while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
                    end += 1
                while end > j and not lines[end - 1].strip():
                    end -= 1
                block = lines[j:end]
                content = min(_indent(b) for b in block if b.strip())
                title = bool(SECTION_TITLE.match(line))
                pad = " " * (content if title else base)
                body = [pad + b[content:] if b.strip() else "" for b in block]
                out += [line[:-1], *([] if title else [""]), f"{pad}```python", *body, f"{pad}```"]
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def on_config(config: Any, **kwargs: Any) -> Any:
    """MkDocs hook: default edit links (``edit/main/docs/``) when a repository URL is configured."""
    if config.get("repo_url") and not os.environ.get("KBITPREP_EDIT_URI"):
        config["edit_uri"] = "edit/main/docs/"
    return config


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, **kwargs: Any) -> str:
    """MkDocs hook: expand ``<!-- kbitprep-api -->``; name the page's source file when there is no repo link."""
    if "<!-- kbitprep-api -->" in markdown:
        members = "\n".join(f"        - {name}" for name in _top_level_api())
        block = f"::: kbitprep\n    options:\n      members:\n{members}\n"
        markdown = markdown.replace("<!-- kbitprep-api -->", block)
    if page is not None and config is not None and not config.get("repo_url"):
        source = f"docs/{page.file.src_uri}"
        markdown += f"\n\n---\n\n<small>Source of this page: `{source}` in kbitprep's repository.</small>\n"
    return markdown


class SphinxRoles(griffe.Extension):
    """Turn Sphinx roles in kbitprep's docstrings into autorefs cross-references (see the module doc)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "kbitprep":
            return
        self.collection = loader.modules_collection
        self.rendered = self._rendered_paths(pkg)
        for obj in self._walk(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(lambda m, o=obj: self._replace(m, o), fence_code(obj.docstring.value))
                obj.docstring.value = LITERAL_BLOCK.sub(r"\1:\n", text)

    # -------------------------------------------------------------- what the site renders
    def _rendered_paths(self, pkg: griffe.Module) -> dict[str, str]:
        """canonical path -> the path under which the site renders the object."""
        rendered: dict[str, str] = {}

        def add(obj: Any, path: str) -> None:
            canonical = _canonical(obj)
            if canonical is None or canonical in rendered:
                return
            rendered[canonical] = path
            target = obj.final_target if obj.is_alias else obj
            if target.is_class:
                for name, member in target.members.items():
                    if not name.startswith("_") and member.has_docstring:  # undocumented members are not rendered
                        add(member, f"{path}.{name}")

        for modname in REFERENCE_MODULES:
            module = pkg[modname.split(".", 1)[1]]
            rendered[modname] = modname
            for name in _exports(module):
                add(module[name], f"{modname}.{name}")
        rendered["kbitprep"] = "kbitprep"
        for name in _exports(pkg):
            if name in pkg.members and not name.startswith("__"):
                add(pkg[name], f"kbitprep.{name}")
        return rendered

    def _walk(self, obj: Any) -> list[Any]:
        found = [obj]
        for member in obj.members.values():
            if not member.is_alias:
                found.extend(self._walk(member))
        return found

    # -------------------------------------------------------------- one role
    def _lookup(self, target: str, scope: Any) -> Any | None:
        scopes: list[str] = []
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        for candidate in (target, *(f"{s}.{target}" for s in scopes)):
            try:
                return self.collection[candidate]
            except (KeyError, ValueError, griffe.AliasResolutionError):
                continue
        return None

    def _replace(self, match: re.Match[str], obj: Any) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        shown = f"`{target.rsplit('.', 1)[-1] if short else target}`"
        found = self._lookup(target, obj)
        if found is None:
            if target.split(".")[0] != "kbitprep" and "." in target:
                return shown  # a third-party name (torch, unittest ...): plain code
            return f"[{shown}][{target}]"  # names nothing: left to fail the strict build
        canonical = _canonical(found)
        if canonical is not None and canonical in self.rendered:
            return f"[{shown}][{self.rendered[canonical]}]"
        return shown  # private or external: code, not a link
