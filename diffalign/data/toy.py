"""Toy Pick-a-Pic-schema data, written offline, learnable by construction.

Chosen images are smooth warm-coloured gradients; rejected ones are cool-coloured with
high-frequency noise. A model can learn to denoise the chosen style better than the rejected
one, so DPO/MaPO implicit accuracy must rise on it. About 1 row in 8 is a tie (0.5/0.5), and
half of the non-tie rows store the chosen image in ``jpg_1`` (``label_0 == 0``) to exercise the
loader's swap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import jpeg_bytes  # noqa: F401  (re-exported: data writers import it from here)
from .schema import PICKAPIC_SCHEMA_TYPES  # noqa: F401  (re-exported)

SUBJECTS = ["a cat", "a dog", "a house", "a tree", "a car", "a boat", "a flower", "a mountain"]
STYLES = ["at sunset", "in watercolor", "at noon", "in the snow", "as a sketch", "on a beach"]






def toy_preferred_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth warm gradient (the style the toy 'users' prefer)."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = rng.uniform(0.55, 0.95, size=3) * np.array([1.0, 0.6, 0.3])
    angle = rng.uniform(0, 2 * np.pi)
    ramp = 0.5 + 0.5 * (np.cos(angle) * x + np.sin(angle) * y) / 1.5
    img = base[None, None, :] * (0.6 + 0.4 * ramp[..., None])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def toy_rejected_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cool colours with pixel noise (the style they reject)."""
    base = rng.uniform(0.3, 0.8, size=3) * np.array([0.3, 0.6, 1.0])
    noise = rng.normal(0, 0.25, size=(size, size, 3))
    return (np.clip(base[None, None, :] + noise, 0, 1) * 255).astype(np.uint8)


def make_toy_pickapic_rows(n: int, size: int = 64, seed: int = 0, tie_fraction: float = 0.125) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in (
        "caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different",
        "model_0", "model_1", "ranking_id", "user_id", "best_image_uid", "image_0_uid", "image_1_uid")}
    for i in range(n):
        caption = f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {STYLES[rng.integers(len(STYLES))]}"
        good, bad = jpeg_bytes(toy_preferred_image(rng, size)), jpeg_bytes(toy_rejected_image(rng, size))
        tie = rng.random() < tie_fraction
        chosen_second = (not tie) and rng.random() < 0.5
        img0, img1 = (bad, good) if chosen_second else (good, bad)
        if tie:
            l0 = l1 = 0.5
        else:
            l0, l1 = (0.0, 1.0) if chosen_second else (1.0, 0.0)
        uid0, uid1 = f"toy-{seed}-{i}-0", f"toy-{seed}-{i}-1"
        cols["caption"].append(caption)
        cols["jpg_0"].append(img0)
        cols["jpg_1"].append(img1)
        cols["label_0"].append(l0)
        cols["label_1"].append(l1)
        cols["has_label"].append(True)
        cols["are_different"].append(True)
        cols["model_0"].append("toy-warm" if not chosen_second else "toy-cool")
        cols["model_1"].append("toy-cool" if not chosen_second else "toy-warm")
        cols["ranking_id"].append(int(seed * 1_000_000 + i))
        cols["user_id"].append(int(rng.integers(0, 32)))
        cols["best_image_uid"].append("" if tie else (uid1 if chosen_second else uid0))
        cols["image_0_uid"].append(uid0)
        cols["image_1_uid"].append(uid1)
    return cols


def pickapic_table(cols: dict[str, list]):
    """A pyarrow table with Pick-a-Pic v2 column types (binary images, float labels)."""
    import pyarrow as pa

    schema = pa.schema([(name, getattr(pa, typ)()) for name, typ in PICKAPIC_SCHEMA_TYPES.items() if name in cols])
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


def write_toy_pickapic(out_dir: str | Path, n: int, size: int = 64, seed: int = 0) -> Path:
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train-00000-of-00001.parquet"
    pq.write_table(pickapic_table(make_toy_pickapic_rows(n, size=size, seed=seed)), path)
    return path
