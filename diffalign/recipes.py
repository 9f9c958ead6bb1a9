"""Packaged configs: real recipes, tiny CPU configs, reward and accelerate configs.

They live inside the package (``diffalign/configs/``) so a wheel carries them: ``diffalign train
sd15-dpo`` and ``diffalign train tiny/dpo.yaml`` behave the same from a clone and from ``pip install``.
They are read through ``importlib.resources`` (never a path relative to a source checkout).

A config argument resolves, in order, as
  1. an existing file (so a user's own YAML always wins),
  2. a packaged config path: ``tiny/dpo.yaml``, ``tiny/dpo``, or the pre-0.2 clone paths
     ``configs/tiny/dpo.yaml`` / ``configs/sd15_dpo_pickapic.yaml`` / ``configs/testbed/job.yaml``,
  3. a recipe name: ``sd15-dpo-pickapic`` (from ``recipes/sd15_dpo_pickapic.yaml``) or an
     unambiguous shorter alias such as ``sd15-dpo``.
"""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import ConfigError

# (folder under diffalign/configs, heading, how to use it) in the order ``diffalign recipes`` lists them
KINDS = (
    ("recipes", "recipes", "diffalign train NAME [key=value ...]; multi-GPU: accelerate launch -m diffalign.cli train NAME"),
    ("tiny", "tiny configs", "CPU, seconds: diffalign train tiny/NAME model=M data=D output_dir=O"),
    ("reward", "reward-model configs", "diffalign train-reward reward/NAME model=P data=PAIRS"),
    ("accelerate", "accelerate configs", "accelerate launch --config_file $(diffalign recipes --path accelerate/NAME) ..."),
)
YAML_SUFFIXES = (".yaml", ".yml")


def configs_root() -> Traversable:
    return files("diffalign").joinpath("configs")


def _join(root: Traversable, rel: str) -> Traversable:
    node = root
    for part in rel.split("/"):
        node = node.joinpath(part)
    return node


def packaged_files(kind: str) -> list[Traversable]:
    """The YAML files of one packaged folder (``recipes``, ``tiny``, ...), sorted by name."""
    folder = configs_root().joinpath(kind)
    if not folder.is_dir():
        return []
    return sorted((f for f in folder.iterdir() if f.is_file() and f.name.endswith(YAML_SUFFIXES)), key=lambda f: f.name)


def _stem(name: str) -> str:
    for s in YAML_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def recipe_names() -> dict[str, Traversable]:
    """``sd15-dpo-pickapic`` -> its packaged file: the file name with ``-`` for ``_``."""
    return {_stem(f.name).replace("_", "-"): f for f in packaged_files("recipes")}


def recipe_aliases(names: list[str] | None = None) -> dict[str, str]:
    """Short alias -> full recipe name: every leading run of >= 2 name parts that only one recipe
    starts with (``sd15-dpo`` -> ``sd15-dpo-pickapic``). A prefix two recipes share is no alias,
    so adding a recipe can only remove aliases that had become ambiguous, never repoint one."""
    names = list(recipe_names()) if names is None else names
    owners: dict[str, set[str]] = {}
    for name in names:
        parts = name.split("-")
        for k in range(2, len(parts)):
            owners.setdefault("-".join(parts[:k]), set()).add(name)
    return {alias: next(iter(o)) for alias, o in sorted(owners.items()) if len(o) == 1 and alias not in names}


def description(f: Traversable) -> str:
    """The first sentence of a config's first comment line (each packaged YAML starts with one)."""
    for line in f.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.startswith("#"):
            return ""
        text = line.lstrip("#").strip()
        # a sentence ends at ". " before a capital ("et al. 2023" does not end one)
        end = next((i for i in range(len(text) - 2) if text[i:i + 2] == ". " and text[i + 2].isupper()), None)
        return text[: end + 1] if end is not None else text
    return ""


def _packaged_path(spec: str) -> Traversable | None:
    """A packaged config by its path relative to ``diffalign/configs`` (or an old clone path)."""
    rel = spec.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or "" in parts:
        return None
    candidates = [(configs_root(), rel)]
    if parts[0] == "configs" and len(parts) > 1:  # the clone layout before the configs moved into the package
        old = "/".join(parts[1:])
        candidates.append((configs_root(), old))
        if len(parts) == 2:  # configs/sd15_dpo_pickapic.yaml -> recipes/
            candidates.append((configs_root().joinpath("recipes"), old))
        if parts[1] == "testbed" and len(parts) > 2:  # configs/testbed/* -> diffalign/testbed/configs/*
            candidates.append((files("diffalign").joinpath("testbed", "configs"), "/".join(parts[2:])))
    for root, r in candidates:
        for name in (r,) if r.endswith(YAML_SUFFIXES) else (r, r + ".yaml"):
            node = _join(root, name)
            if node.is_file():
                return node
    return None


def _recipe_by_name(spec: str) -> Traversable | None:
    key = _stem(spec.strip()).lower().replace("_", "-")
    names = recipe_names()
    key = recipe_aliases(list(names)).get(key, key)
    return names.get(key)


def available_summary() -> str:
    names = recipe_names()
    aliases = recipe_aliases(list(names))
    shown = [n + (f" ({', '.join(a for a, full in aliases.items() if full == n)})" if n in aliases.values() else "")
             for n in names]
    tiny = [f"tiny/{_stem(f.name)}" for f in packaged_files("tiny")]
    return f"recipes: {', '.join(shown) or 'none'}; tiny configs: {', '.join(tiny) or 'none'}"


def resolve_config(spec: str | os.PathLike | Traversable) -> Path | Traversable:
    """A config argument -> the file to read: an existing file, a packaged config path, or a recipe
    name (see the module docstring). Anything else is one :class:`ConfigError` naming what exists."""
    if not isinstance(spec, (str, os.PathLike)):  # already a packaged Traversable
        if spec.is_file():
            return spec
        raise ConfigError(f"packaged config '{spec}' is missing from this diffalign install (reinstall diffalign)")
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config '{spec}' is a directory, not a YAML file")
    text = os.fspath(spec)
    if not path.is_absolute():
        found = _packaged_path(text) or _recipe_by_name(text)
        if found is not None:
            return found
    raise ConfigError(f"config '{text}' does not exist as a file, a packaged config path or a recipe name; "
                      f"{available_summary()} (diffalign recipes lists them)")


def packaged_config(rel: str) -> Traversable:
    """A config the code itself relies on (e.g. ``tiny/dpo.yaml`` for ``diffalign demo``): it must
    ship with the package; a missing one is an error, never a silent fallback to other values."""
    node = _join(configs_root(), rel)
    if not node.is_file():
        raise ConfigError(f"packaged config '{rel}' is missing from this diffalign install at {configs_root()} "
                          "(reinstall diffalign)")
    return node


def as_path(node: Path | Traversable) -> str:
    """A filesystem path for tools that need one (``accelerate --config_file``)."""
    return os.fspath(node) if isinstance(node, os.PathLike) else str(node)
