"""The one prompt-file reader: training prompts (GRPO), evaluation prompts, testbed splits, and
the images-plus-prompts files of ``diffalign score``.

Formats, chosen by suffix:

* ``.txt`` (or any other suffix): one prompt a line; blank lines and lines starting with ``#``
  are skipped; surrounding whitespace is stripped.
* ``.json``: a list of prompts (strings, or objects with a prompt key), or ``{"prompts": [...]}``;
  a file of one JSON value a line is read as ``.jsonl``.
* ``.jsonl``: one JSON value a line: a string, or an object with a prompt key (its other
  fields are kept as the row's metadata, e.g. for GRPO rewards that read them).
* ``.csv``: a header row with a prompt column; the other columns are kept as metadata.

The prompt key of an object or CSV header is the first of :data:`PROMPT_KEYS` present.
Bad input raises :class:`~diffalign.errors.UserError` with one line naming the file and the
line or key.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PROMPT_KEYS = ("prompt", "caption", "text", "Prompt")
PROMPT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")


@dataclass
class PromptFile:
    """A prompt file's prompts, and its rows when the format has fields (JSON objects, CSV)."""

    prompts: list[str]
    rows: list[dict] | None  # one dict per prompt (all of the row's fields); None for plain prompts


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` / ``.json`` / ``.jsonl`` / ``.csv`` prompt file (see the module doc)."""
    return read_prompt_file(path).prompts


def read_prompt_file(path: str | Path, required: tuple[str, ...] = ()) -> PromptFile:
    """Prompts and rows of a prompt file. ``required``: keys (columns) every row must have,
    spelled exactly (then a row without them is an error even when it has another prompt key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".csv":
        out = _read_csv(path, text, required)
    elif suffix == ".json":
        out = _read_json(path, text, required)
    elif suffix == ".jsonl":
        out = _read_jsonl(path, text, required)
    else:
        if required:
            raise UserError(f"prompt file '{path}': a plain text file has no {', '.join(required)} fields; "
                            "use a .csv or .jsonl file")
        out = PromptFile([ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")], None)
    if not out.prompts:
        raise UserError(f"prompt file '{path}' has no prompts")
    return out


def _prompt_of(path: Path, where: str, value, required: tuple[str, ...]) -> tuple[str, dict | None]:
    """One JSON value -> (prompt, row or None)."""
    if isinstance(value, str) and not required:
        return value, None
    if not isinstance(value, dict):
        need = ", ".join(required) if required else "a prompt key (" + ", ".join(PROMPT_KEYS) + ")"
        raise UserError(f"prompt file '{path}' {where}: expected {'an object' if required else 'a string or an object'} "
                        f"with {need}, got {type(value).__name__}")
    missing = [k for k in required if k not in value]
    if missing:
        raise UserError(f"prompt file '{path}' {where} needs key(s) {', '.join(missing)}")
    key = "prompt" if "prompt" in required else next((k for k in PROMPT_KEYS if k in value), None)
    if key is None:
        raise UserError(f"prompt file '{path}' {where} has no prompt key ({', '.join(PROMPT_KEYS)})")
    prompt = value[key]
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, (str, int, float)):
        raise UserError(f"prompt file '{path}' {where}: '{key}' is a {type(prompt).__name__}, not a string")
    return str(prompt), value


def _collect(path: Path, items: list[tuple[str, object]], required: tuple[str, ...]) -> PromptFile:
    prompts, rows = [], []
    for where, value in items:
        prompt, row = _prompt_of(path, where, value, required)
        prompts.append(prompt)
        rows.append(row)
    if all(r is None for r in rows):
        return PromptFile(prompts, None)
    return PromptFile(prompts, [r if r is not None else {"prompt": p} for p, r in zip(prompts, rows)])


def _read_jsonl(path: Path, text: str, required: tuple[str, ...]) -> PromptFile:
    items = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"prompt file '{path}' line {i} is not valid JSON ({e.msg})") from None
    return _collect(path, items, required)


def _read_json(path: Path, text: str, required: tuple[str, ...]) -> PromptFile:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value a line
            return _read_jsonl(path, text, required)
        raise UserError(f"prompt file '{path}' line {e.lineno} is not valid JSON ({e.msg})") from None
    if isinstance(doc, dict):
        if "prompts" not in doc:
            raise UserError(f"prompt file '{path}': a JSON object needs a 'prompts' key (a list); "
                            f"found keys: {', '.join(map(str, doc)) or 'none'}")
        doc = doc["prompts"]
        where = "prompts[{}]"
    else:
        where = "[{}]"
    if not isinstance(doc, list):
        raise UserError(f"prompt file '{path}': expected a list of prompts, got {type(doc).__name__}")
    return _collect(path, [(where.format(i), v) for i, v in enumerate(doc)], required)


def _read_csv(path: Path, text: str, required: tuple[str, ...]) -> PromptFile:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    key = "prompt" if "prompt" in required else next((k for k in PROMPT_KEYS if k in columns), None)
    missing = [c for c in required if c not in columns]
    if key is None or missing:
        need = missing or [f"a prompt column ({', '.join(PROMPT_KEYS)})"]
        raise UserError(f"prompt file '{path}' lacks column(s) {', '.join(need)} (found: {', '.join(columns) or 'none'})")
    rows = []
    for row in reader:
        if row.get(key) is None:
            raise UserError(f"prompt file '{path}' line {reader.line_num} has no value in column '{key}'")
        rows.append(row)
    return PromptFile([row[key] for row in rows], rows)
