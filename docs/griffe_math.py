"""Griffe extension: render clipx docstrings (Google style with reST math) on the site.

clipx docstrings are Google style with reST math, which reads well in
``help()`` and in editors: inline ``:math:`x``` roles and ``.. math::`` blocks,
and a singular ``Example:`` section. Before mkdocstrings renders a docstring
this extension rewrites

* ``:math:`...``` and ``.. math::`` into the ``$...$`` and ``$$...$$``
  delimiters that ``pymdownx.arithmatex`` hands to MathJax;
* ``Example:`` into ``Examples:``, the title griffe's Google parser knows, so
  doctests render as code (otherwise ``[...]`` output lines read as Markdown
  links);
* a paragraph ending in ``::`` (a reST literal block) into one ending in ``:``.

Nothing in the package changes.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(
    r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:[ \t]*\n|(?P=indent)[ \t]+\S.*\n?)+)", re.M
)


def _block(match: re.Match) -> str:
    indent = match.group("indent")
    body = textwrap.dedent(match.group("body")).strip("\n")
    lines = [indent + "$$"] + [indent + line if line else "" for line in body.splitlines()] + [indent + "$$"]
    return "\n".join(lines) + "\n\n"


_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.M)
_LITERAL = re.compile(r"(\S)::[ \t]*\n(?=[ \t]*\n)")


def rewrite(text: str) -> str:
    """Returns ``text`` with reST math turned into arithmatex delimiters and ``Example:`` renamed."""
    text = _DIRECTIVE.sub(_block, text if text.endswith("\n") else text + "\n")
    text = _ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _EXAMPLE.sub(r"\1Examples:", text)
    return _LITERAL.sub(r"\1:\n", text).rstrip("\n")


class ReSTMath(griffe.Extension):
    """Rewrites ``:math:`` roles and ``.. math::`` blocks in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
