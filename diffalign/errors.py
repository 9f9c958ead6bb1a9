"""Errors shown to users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a config key, a file, a column. The message names it."""


class ConfigError(UserError, ValueError):
    """A config problem, always naming the offending key (``diffalign.config`` re-exports it)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying where the run stopped and how to go on (CLI exit code 130).
    A ``KeyboardInterrupt`` so that code catching Ctrl-C still sees it as one."""


def require_dir_path(path: str | Path, what: str) -> None:
    """``path`` names a directory to write into: it, and every existing parent, must not be a file
    (else mkdir fails deep inside with FileExistsError / NotADirectoryError)."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                where = "is an existing file" if q == p else f"lies under '{q}', which is a file"
                raise UserError(f"{what} '{path}' {where}; give a directory path")
            return
