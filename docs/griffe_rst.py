"""A griffe extension (mkdocs.yml: the mkdocstrings handler's ``extensions``): diffalign's docstrings
are reST-flavoured prose; this rewrites the three reST forms they use into Markdown before
mkdocstrings renders them, without changing the source:

* doctest blocks (``>>>`` lines and their output) -> fenced ``pycon`` code;
* literal blocks (a paragraph ending in ``::`` followed by an indented block) -> fenced code;
* cross-reference roles (``:func:`load_config```, ``:class:`~pathlib.Path```) -> code spans
  (``~`` keeps the last dotted part, as Sphinx shows it).
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const|type):`(~?)([^`]+)`")


def plain_roles(text: str) -> str:
    """``:func:`~a.b``` -> ```b```; ``:class:`x``` -> ```x```."""
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(lines: list[str], indent: str) -> list[str]:
    """``lines`` as a fenced block (blank lines around it), ``pycon`` when it is a doctest."""
    body = textwrap.dedent("\n".join(lines)).split("\n")
    lang = "pycon" if body and body[0].lstrip().startswith(">>>") else "python"
    return ["", f"{indent}```{lang}", *(indent + b if b else b for b in body), f"{indent}```", ""]


def rst_to_markdown(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        # a literal block: "...::", blank line(s), then lines indented deeper than the paragraph
        if stripped.endswith("::") and not stripped.startswith(".."):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j > i + 1 and j < len(lines) and _indent(lines[j]) > _indent(line):
                base = _indent(lines[j])
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= base):
                    k += 1
                while k > j and not lines[k - 1].strip():  # trailing blank lines stay outside
                    k -= 1
                head = plain_roles(line.rstrip()[:-2].rstrip())  # "from Python::" -> "from Python:"
                if head.strip():
                    out.append(head + ":")
                out += _fence(lines[j:k], " " * _indent(line))
                i = k
                continue
        # a doctest block: ">>>" lines and their output, up to a blank line
        if stripped.startswith(">>>"):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += _fence(lines[i:j], " " * _indent(line))
            i = j
            continue
        out.append(plain_roles(line))
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every loaded object's docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
