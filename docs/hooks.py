"""MkDocs hooks (``hooks:`` in mkdocs.yml): the pages generated at build time, so they cannot go stale.

* ``reference/config.md``: its marker line is replaced by one Markdown table per trainer config
  dataclass, read from the dataclasses themselves (:func:`diffalign.config.config_keys`: key, type,
  default and the field's ``metadata["help"]``), with the ``method`` values each class serves.
* the API reference's docstrings go through ``docs/griffe_rst.py`` (a griffe extension that
  :func:`on_config` makes importable);
* ``testbed_design.md``: ``diffalign/testbed/README.md`` (the testbed's design, kept beside its
  code) as a page of the site. Links to it from the docs pages, and its own links back into
  ``docs/``, are rewritten to site pages; the files themselves are not changed.

Nothing here imports diffalign at module level: ``tests/test_docs.py`` reads
:data:`GENERATED_PAGES` without mkdocs or torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import posixpath
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the line of reference/config.md that the generated tables replace
CONFIG_MARKER = "<!-- diffalign:config-reference -->"

# site page (under docs/) -> the repository file it is generated from
GENERATED_PAGES = {"testbed_design.md": "diffalign/testbed/README.md"}
_PAGE_OF_SOURCE = {source: page for page, source in GENERATED_PAGES.items()}

# a Markdown inline link or image target: ](target) with an optional "title"
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
# a Sphinx cross-reference role, as some help strings use: :mod:`.ema`, :class:`~a.B`
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const|type):`(~?)([^`]+)`")
# a code span: a run of backticks, its text, the same run (CommonMark's rule)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


# --------------------------------------------------------------------------------------------
# mkdocs events
# --------------------------------------------------------------------------------------------


def on_config(config):
    """Make ``docs/griffe_rst.py`` importable as ``griffe_rst``: the mkdocstrings handler's
    ``extensions`` option takes a module name (a file path there would depend on the working directory)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return config


def on_files(files, config):
    """Add the pages of :data:`GENERATED_PAGES`, their content read from the repository."""
    from mkdocs.structure.files import File

    for page, source in GENERATED_PAGES.items():
        text = (ROOT / source).read_text(encoding="utf-8")
        files.append(File.generated(config, page, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    src_uri = page.file.src_uri
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference_markdown())
    # where the text's relative links start from: the source file for a generated page
    origin = posixpath.dirname(GENERATED_PAGES.get(src_uri, "docs/" + src_uri))
    return rewrite_links(markdown, origin, posixpath.dirname(src_uri))


# --------------------------------------------------------------------------------------------
# links between the docs and the repository files shown as pages
# --------------------------------------------------------------------------------------------


def rewrite_links(markdown: str, origin: str, page_dir: str) -> str:
    """Relative links of a page whose text lives in the repository folder ``origin`` (``docs`` for a
    docs page), on the site at ``page_dir`` (relative to docs/): a target in ``docs/`` or one of
    :data:`GENERATED_PAGES`' sources becomes that page, relative to ``page_dir``; others stay."""

    def fix(m: re.Match) -> str:
        target = m.group("target")
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return m.group(0)
        path, hash_, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(origin, path))
        if repo_path in _PAGE_OF_SOURCE:
            site_path = _PAGE_OF_SOURCE[repo_path]
        elif repo_path.startswith("docs/"):
            site_path = repo_path[len("docs/"):]
        else:
            return m.group(0)
        new = posixpath.relpath(site_path, page_dir or ".") + hash_ + anchor
        return f"]({new}{m.group('title') or ''})"

    return _LINK.sub(fix, markdown)


# --------------------------------------------------------------------------------------------
# the config reference
# --------------------------------------------------------------------------------------------


def config_reference_markdown() -> str:
    """One section per registered trainer config dataclass: the methods it serves, its docstring's
    first paragraph, and a table of every key (dotted as in overrides), type, default and help."""
    import diffalign.trainers  # noqa: F401  (registers every trainer's config class)
    from diffalign.config import CONFIG_CLASSES, config_keys

    methods_of: dict[type, list[str]] = {}
    for method, cls in CONFIG_CLASSES.items():
        methods_of.setdefault(cls, []).append(method)
    if not methods_of:
        raise RuntimeError("no trainer config is registered (diffalign.config.CONFIG_CLASSES is empty)")
    from diffalign.eval.benchmarks import BenchmarkConfig
    from diffalign.eval.generate import EvalConfig
    from diffalign.trainers.reward_model import RewardTrainConfig

    # the configs of the other commands: what they are for, in place of the methods they serve
    other = {EvalConfig: "the keys of `diffalign eval` (its flags) and `diffalign.evaluate`",
             RewardTrainConfig: "the config of `diffalign train-reward` (YAML + `key=value` overrides)",
             BenchmarkConfig: "the keys of `diffalign benchmark` (its flags)"}
    out = []
    for cls, methods in [*methods_of.items(), *other.items()]:
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        serves = methods if isinstance(methods, str) else "the config of " + ", ".join(f"`method: {m}`" for m in methods)
        out += [
            f"## {cls.__name__}",
            "",
            f"`{cls.__module__}.{cls.__qualname__}`, {serves}.",
            "",
        ]
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | help |", "| --- | --- | --- | --- |"]
        for row in config_keys(cls):
            out.append(f"| {code(row.key)} | {code(row.type)} | {code(format_value(row.default))} | {cell(row.help)} |")
        out.append("")
    return "\n".join(out)


def format_value(value) -> str:
    """A default as it would be written in the YAML config (``null``, ``true``, ``[1, 2]``)."""
    import yaml

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return plain(dataclasses.asdict(v))
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    try:
        text = yaml.safe_dump(plain(value), default_flow_style=True, width=10**6, sort_keys=False)
    except yaml.YAMLError:
        return repr(value)
    text = text.strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def code(text: str) -> str:
    """``text`` as one code span (a fence longer than any backtick run in it); ``|`` may stay
    inside: Python-Markdown's tables do not split a row inside a code span."""
    text = " ".join(str(text).split())
    if not text:
        return ""
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: str) -> str:
    """Help text safe in a table cell: one line; Sphinx roles as code spans; outside code spans
    ``\\``, ``|``, ``*``, ``_``, ``[``, ``]`` and a lone backtick escaped and ``<`` written as
    ``&lt;`` (raw HTML never opens)."""
    text = " ".join(str(text).split())
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    parts, last = [], 0
    for m in _CODE_SPAN.finditer(text):
        parts += [_escape(text[last:m.start()]), m.group(0)]
        last = m.end()
    parts.append(_escape(text[last:]))
    return "".join(parts)


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\")
    for ch in "|*[]`_":
        text = text.replace(ch, "\\" + ch)
    return text.replace("<", "&lt;")
