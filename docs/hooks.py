"""MkDocs hook: writes the API reference from ``clipx.__all__`` at build time.

``docs/api.md`` holds the marker ``<!-- clipx-api -->``; this hook replaces it
with a summary table and one mkdocstrings block per public name, in the
order of ``__all__``. A name added to ``__all__`` appears on the
next build with no edit to the docs. A public function that shares its name
with a submodule (``clipx.agc`` the function, ``clipx/agc.py`` the module) is
documented by its defining path, which is what static analysis resolves
unambiguously.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

MARKER = "<!-- clipx-api -->"


def _identifier(package: Any, name: str) -> str:
    """The identifier mkdocstrings should render for ``package.name``."""
    obj = getattr(package, name)
    shadowed = importlib.util.find_spec(f"{package.__name__}.{name}") is not None and not inspect.ismodule(
        obj
    )
    if shadowed:
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{package.__name__}.{name}"


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].replace("|", "\\|") if doc.strip() else ""


def api_markdown(package_name: str = "clipx") -> str:
    """Markdown for every name of ``package.__all__``: a summary table, then one ``:::`` block each."""
    package = importlib.import_module(package_name)
    names = list(package.__all__)
    lines = ["| Name | What it is |", "|---|---|"]
    for name in names:
        anchor = _identifier(package, name)
        lines.append(f"| [`{name}`](#{anchor}) | {_summary(getattr(package, name))} |")
    lines.append("")
    for name in names:
        lines += [f"::: {_identifier(package, name)}", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, api_markdown())
    return markdown
