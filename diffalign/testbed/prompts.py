"""Deterministic train / held-out prompt sets for the testbed world.

Held-out prompts use (colour, shape) combinations that never occur in training prompts:
:data:`HELDOUT_PAIRS` holds out one shape per colour (each shape twice), so every colour
and every shape still appears in training, only the *combination* is new. A scene is
held-out if any of its object groups uses a held-out pair; train prompts use none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ..data.prompts import read_prompts  # noqa: F401 - re-exported: the testbed's prompt files are read by the shared reader
from .world import COLOURS, SHAPES, caption, sample_scene

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "circle"),
        ("blue", "square"),
        ("yellow", "circle"),
        ("purple", "triangle"),
        ("white", "square"),
    }
)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
SPLITS = ("train", "heldout")
_SPLIT_SEED = {"train": 0x7EA1, "heldout": 0x4E1D}


def is_heldout(scene) -> bool:
    """True if any object group of ``scene`` uses a held-out (colour, shape) pair."""
    return any((g.colour, g.shape) in HELDOUT_PAIRS for g in scene.groups)


def prompt_split(split: str, n: int, seed: int = 0, **scene_kwargs) -> list[str]:
    """``n`` distinct captions of ``split`` (``"train"`` or ``"heldout"``), deterministic in ``seed``.

    Train scenes draw every group from :data:`TRAIN_PAIRS`; held-out scenes contain at
    least one held-out pair (the other group, if any, may be any pair). Extra keyword
    arguments go to :func:`~diffalign.testbed.world.sample_scene` (e.g. ``p_two_groups=0``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([int(seed), _SPLIT_SEED[split]])
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(200 * max(int(n), 1) + 10_000):
        if len(out) >= n:
            break
        if split == "train":
            scene = sample_scene(rng, pairs=TRAIN_PAIRS, **scene_kwargs)
        else:
            scene = sample_scene(rng, **scene_kwargs)
            if not is_heldout(scene):
                continue
        text = caption(scene)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise ValueError(f"prompt_split: only {len(out)} distinct {split} prompts found, asked for {n}")
    return out


def train_prompts(n: int = 1000, seed: int = 0, **scene_kwargs) -> list[str]:
    """Training prompts (no held-out colour x shape pair)."""
    return prompt_split("train", n, seed, **scene_kwargs)


def heldout_prompts(n: int = 200, seed: int = 0, **scene_kwargs) -> list[str]:
    """Held-out prompts (each uses at least one colour x shape pair never seen in training)."""
    return prompt_split("heldout", n, seed, **scene_kwargs)


def write_prompts(prompts: Iterable[str], path: str | Path) -> Path:
    """Write prompts as ``.txt`` (one a line) or ``.jsonl`` (``{"prompt": ...}`` a line), by suffix."""
    path = Path(path)
    prompts = list(prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".txt":
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    else:
        raise ValueError(f"write_prompts: {path} must end in .txt or .jsonl")
    return path


def write_prompt_splits(out_dir: str | Path, n_train: int = 1000, n_heldout: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``train.txt``, ``train.jsonl``, ``heldout.txt``, ``heldout.jsonl`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        prompts = prompt_split(split, n, seed)
        for ext in ("txt", "jsonl"):
            paths[f"{split}.{ext}"] = write_prompts(prompts, out_dir / f"{split}.{ext}")
    return paths


def scene_key(text: str) -> str:
    """A caption without its prefix ("a photo of", "an image of"): two captions with the
    same key describe the same scene, so split hygiene is checked on keys, not strings."""
    from dataclasses import replace

    from .reward import parse_caption

    return caption(replace(parse_caption(text), prefix=""))


def job_prompt_splits(n_train: int, n_indist: int, n_compositional: int, seed: int = 0, n_curve: int = 0,
                      **scene_kwargs) -> dict[str, list[str]]:
    """The three prompt sets of ``diffalign testbed-compare``, deterministic in ``seed``:

    * ``train``: the captions pairs and rollouts are drawn from (train colour x shape pairs);
    * ``indist``: captions from the same distribution whose *scenes* (captions up to the
      prefix, :func:`scene_key`) occur in no ``train`` caption - the primary evaluation;
    * ``compositional``: held-out colour x shape pairs (:func:`heldout_prompts`), seen by
      neither the base models nor any method - generalisation.

    * ``curve`` (``n_curve`` > 0): captions of the same distribution whose scenes are in neither
      ``train`` nor ``indist``: the fixed evaluation subset the online methods are evaluated on
      while they train (curves, the efficiency race, checkpoint choice), so that nothing is chosen
      on ``indist``.

    ``indist`` scenes are drawn first, so growing ``n_train`` never changes ``indist``; ``curve``
    is drawn after both, so it changes neither.
    """
    rng = np.random.default_rng([int(seed), 0x1D15])
    indist: list[str] = []
    train: list[str] = []
    held_keys: set[str] = set()
    train_keys: set[str] = set()
    seen: set[str] = set()
    for _ in range(400 * max(n_train + n_indist, 1) + 10_000):
        if len(indist) >= n_indist and len(train) >= n_train:
            break
        text = caption(sample_scene(rng, pairs=TRAIN_PAIRS, **scene_kwargs))
        if text in seen:
            continue
        seen.add(text)
        key = scene_key(text)
        if key in held_keys:
            continue
        if len(indist) < n_indist and key not in train_keys:
            indist.append(text)
            held_keys.add(key)
        elif len(train) < n_train:
            train.append(text)
            train_keys.add(key)
    if len(indist) < n_indist or len(train) < n_train:
        raise ValueError(f"job_prompt_splits: found {len(train)} train / {len(indist)} indist prompts, asked for {n_train} / {n_indist}")
    curve: list[str] = []
    curve_keys: set[str] = set()
    for _ in range(400 * max(n_curve, 1) + 10_000):
        if len(curve) >= n_curve:
            break
        text = caption(sample_scene(rng, pairs=TRAIN_PAIRS, **scene_kwargs))
        key = scene_key(text)
        if text in seen or key in held_keys or key in train_keys or key in curve_keys:
            continue
        seen.add(text)
        curve.append(text)
        curve_keys.add(key)
    if len(curve) < n_curve:
        raise ValueError(f"job_prompt_splits: found {len(curve)} curve prompts, asked for {n_curve}")
    out = {"train": train, "indist": indist, "compositional": heldout_prompts(n_compositional, seed, **scene_kwargs)}
    if n_curve:
        out["curve"] = curve
    return out
