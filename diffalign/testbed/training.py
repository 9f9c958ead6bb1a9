"""Base-model training data: (caption, image) pairs from the world in the *default* style.

The base text-to-image model is trained from scratch on these; it never sees the target
(warm) style unless ``warm_rate > 0``, which is what makes the hidden taste something the
base model does not have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .prompts import TRAIN_PAIRS
from .world import COLOURS, SHAPES, STYLES, caption, decode_image, encode_jpeg, render, resolve_style, sample_scene


def make_training_set(
    n: int,
    resolution: int = 32,
    seed: int = 0,
    *,
    style: str | None = None,
    warm_rate: float = 0.0,
    exclude_heldout: bool = False,
    **scene_kwargs,
) -> list[tuple[str, np.ndarray]]:
    """``n`` ``(caption, uint8 HxWx3)`` samples: random scenes, rendered in ``style`` (default plain).

    ``warm_rate``: share drawn in the target (warm) style instead (default 0: never).
    ``exclude_heldout``: draw only train (colour, shape) pairs, so held-out prompts are also
    novel to the base model. Extra keyword arguments go to :func:`sample_scene`.
    Deterministic in ``seed``.
    """
    base = resolve_style(style)
    rng = np.random.default_rng([int(seed), 0x7A1D])
    pairs = TRAIN_PAIRS if exclude_heldout else [(c, s) for c in COLOURS for s in SHAPES]
    out = []
    for _ in range(int(n)):
        scene = sample_scene(rng, pairs=pairs, **scene_kwargs)
        st = STYLES["warm"] if (warm_rate > 0 and rng.random() < warm_rate) else base
        img_seed = int(rng.integers(0, 2**31 - 1))
        out.append((caption(scene), render(scene, resolution, st, img_seed)))
    return out


def write_training_set(
    samples: Sequence[tuple[str, np.ndarray]],
    out_dir: str | Path,
    *,
    format: str = "parquet",
    shard_size: int = 50_000,
    jpeg_quality: int = 95,
) -> Path:
    """Write samples to ``out_dir``.

    ``format="parquet"``: ``train-00000.parquet``, ... with columns ``caption`` (string) and
    ``image`` (binary JPEG bytes). ``format="imagefolder"``: ``00000000.jpg``, ... plus a
    ``metadata.jsonl`` of ``{"file_name", "caption"}`` (the Hugging Face imagefolder layout).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("caption", pa.string()), ("image", pa.binary())])
        for k, start in enumerate(range(0, max(len(samples), 1), shard_size)):
            chunk = samples[start : start + shard_size]
            table = pa.table(
                {"caption": [c for c, _ in chunk], "image": [encode_jpeg(im, jpeg_quality) for _, im in chunk]},
                schema=schema,
            )
            pq.write_table(table, out_dir / f"train-{k:05d}.parquet")
    elif format == "imagefolder":
        with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i, (cap, im) in enumerate(samples):
                name = f"{i:08d}.jpg"
                (out_dir / name).write_bytes(encode_jpeg(im, jpeg_quality))
                f.write(json.dumps({"file_name": name, "caption": cap}) + "\n")
    else:
        raise ValueError(f"write_training_set: unknown format {format!r}; use 'parquet' or 'imagefolder'")
    return out_dir


def load_training_set(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Read back what :func:`write_training_set` wrote (either format, or one parquet file)."""
    path = Path(path)
    if (path / "metadata.jsonl").is_file():
        out = []
        for line in (path / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out.append((row["caption"], decode_image((path / row["file_name"]).read_bytes())))
        return out
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"load_training_set: no parquet files or metadata.jsonl in {path}")
    out = []
    for f in files:
        d = pq.read_table(f, columns=["caption", "image"]).to_pydict()
        out.extend((c, decode_image(b)) for c, b in zip(d["caption"], d["image"]))
    return out
