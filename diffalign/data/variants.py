"""Data variants of the offline pair trainer: dual captions (DCPO), caption-perturbation pairs
(TPO), unpaired like/dislike examples (KTO) and reward-carrying pairs (CoPG).

All are subclasses of :class:`~diffalign.data.pickapic.PreferencePairStream` that override only
``_example`` (one row -> one example), so they inherit its sharding, epoch reshuffling,
skip counting and resumable position. A method declares the variant it reads
(:class:`~diffalign.losses.methods.DataVariant`); :data:`STREAMS` maps each variant to its
stream. Batches (from :func:`collate_variant`, see :mod:`.batches`):

* ``PAIRS``: the Pick-a-Pic path unchanged (:func:`~diffalign.data.pickapic.pair_dataloader`):
  a :class:`~.batches.PairBatch` with ``pixels_w``, ``pixels_l``, ``captions``;
* ``DUAL_CAPTION_PAIRS`` (DCPO): the same plus ``captions_l``, the rejected image's caption;
* ``REWARD_PAIRS`` (CoPG): pairs plus ``rewards_w`` / ``rewards_l`` (``reward_0`` / ``reward_1``
  columns when the data has them, e.g. from ``diffalign relabel``, else the labels
  ``label_0`` / ``label_1``);
* ``CAPTION_PAIRS`` (TPO): ``pixels_w`` (one image, used on both sides), ``captions`` (matched)
  and ``captions_l`` (perturbed): ``pixels_l`` is None;
* ``UNPAIRED`` (KTO) and ``CAPTION_UNPAIRED`` (TPO with ``loss.base: kto``): an
  :class:`~.batches.UnpairedBatch`: ``pixels`` [M,3,H,W], ``captions`` [M] and ``desirable``
  (bool [M]). A Pick-a-Pic row gives two examples (chosen = desirable, rejected = undesirable),
  a caption row two (matched caption desirable, perturbed undesirable), an unpaired row
  (``image`` + ``label`` columns) one; ``batch_size`` counts rows.

Caption perturbation (:func:`perturb_caption`) is deterministic in the caption alone (seeded by
its CRC32), so runs are reproducible and the stream's random state is untouched.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import DataOptions, option
from ..errors import UserError
from ..losses.methods import DataVariant
from .batches import PairBatch, UnpairedBatch
from .pickapic import (
    PreferencePairStream, classify_row, column_names, decode_image,
    load_preference_dataset, load_raw_dataset, pair_dataloader, sample_seeds,
)
from .schema import REQUIRED_COLUMNS

PERTURBATIONS = ("drop", "shuffle", "drop_shuffle")


@dataclass
class VariantDataOptions(DataOptions):
    """``data_opts`` of the pair trainer: the Pick-a-Pic options plus the variants' columns."""

    rejected_caption_column: str | None = option(None, help=(
        "DCPO/TPO: caption of the rejected side (else caption_0/1, else perturbed)"
    ))
    caption_perturbation: str = option("drop_shuffle", help="drop | shuffle | drop_shuffle (see perturb_caption)")
    image_column: str = option("image", help="TPO / unpaired KTO rows: the image (falls back to jpg_0)")
    label_column: str = option("label", help="unpaired KTO rows: 1 = desirable, 0 = undesirable")
    per_sample_draws: bool = option(False, help=(
        "layout-independent draws: every random draw of a pair (flip, crop, caption dropout, VAE posterior "
        "sample, timestep, noise) comes from a generator keyed by (seed, epoch, data row), and the data "
        "order is dealt to the processes round-robin, so N processes x batch_size b, one process x "
        "batch_size N*b and gradient_accumulation_steps N x b train the same steps (up to float summation "
        "order; exact with num_workers=0 and a local dataset or the latent cache). false: one generator "
        "per process, drawn in batch order (the numbers of runs made before this option)"
    ))


# ------------------------------------------------------------------------------ captions
def perturb_caption(caption: str, mode: str = "drop_shuffle", drop_frac: float = 0.3) -> str:
    """A deterministic, different caption: ``drop`` removes ``max(1, round(drop_frac * n))`` of
    the n words, ``shuffle`` permutes them, ``drop_shuffle`` does both. The random choices are
    seeded by the caption's CRC32. A one-word caption becomes "" (with ``drop``) or is kept
    (``shuffle``); "" stays "". If a permutation happens to give the original order, the word
    order is rotated by one.
    """
    if mode not in PERTURBATIONS:
        raise ValueError(f"perturb_caption: mode must be one of {', '.join(PERTURBATIONS)}, got {mode!r}")
    words = caption.split()
    if not words:
        return ""
    rng = random.Random(zlib.crc32(caption.encode("utf-8")))
    if mode in ("drop", "drop_shuffle"):
        if len(words) == 1:
            return ""
        n_drop = min(len(words) - 1, max(1, round(drop_frac * len(words))))
        drop = set(rng.sample(range(len(words)), n_drop))
        words = [w for i, w in enumerate(words) if i not in drop]
    if mode in ("shuffle", "drop_shuffle") and len(words) > 1:
        before = list(words)
        rng.shuffle(words)
        if words == before:
            words = words[1:] + words[:1]
    return " ".join(words)


def _caption(row: dict, column: str) -> str | None:
    c = row.get(column)
    if c is None:
        return ""
    return c if isinstance(c, str) else None


def _opt(opts, name: str, default: Any) -> Any:
    return getattr(opts, name, default)


def _negative_caption(row: dict, caption: str, opts, loser_index: int | None = None) -> str:
    """The caption of the rejected side: ``data_opts.rejected_caption_column`` when set and
    present, else the loser's ``caption_0`` / ``caption_1`` (per-image captions) when present,
    else :func:`perturb_caption` of the caption."""
    col = _opt(opts, "rejected_caption_column", None)
    if col and isinstance(row.get(col), str) and row[col]:
        return row[col]
    if loser_index is not None:
        per_image = row.get(f"caption_{loser_index}")
        if isinstance(per_image, str) and per_image:
            return per_image
    return perturb_caption(caption, _opt(opts, "caption_perturbation", "drop_shuffle"))


# ------------------------------------------------------------------------------ streams
class DualCaptionPairStream(PreferencePairStream):
    """DCPO pairs: the Pick-a-Pic example plus ``caption_l``, the rejected image's caption."""

    def _example(self, row: dict, rng: random.Random, skipped: Counter) -> dict | None:
        reason, swap = classify_row(row, self.opts)
        example = super()._example(row, rng, skipped)
        if example is None or reason is not None:
            return example
        original = _caption(row, self.opts.caption_column) or ""
        if example["caption"] == "" and original != "":  # CFG-style prompt dropout: both sides
            example["caption_l"] = ""
        else:
            example["caption_l"] = _negative_caption(row, original, self.opts, loser_index=0 if swap else 1)
        return example


class RewardPairStream(PreferencePairStream):
    """CoPG pairs: the Pick-a-Pic example plus ``reward_w`` / ``reward_l`` (chosen-first)."""

    def _example(self, row: dict, rng: random.Random, skipped: Counter) -> dict | None:
        reason, swap = classify_row(row, self.opts)
        example = super()._example(row, rng, skipped)
        if example is None or reason is not None:
            return example
        if row.get("reward_0") is not None and row.get("reward_1") is not None:
            r0, r1 = float(row["reward_0"]), float(row["reward_1"])
        else:
            r0 = float(row["label_0"])
            r1 = float(row["label_1"]) if row.get("label_1") is not None else 1.0 - r0
        example["reward_w"], example["reward_l"] = (r1, r0) if swap else (r0, r1)
        return example


class UnpairedStream(PreferencePairStream):
    """KTO examples. Pick-a-Pic rows -> (chosen, desirable) + (rejected, undesirable); unpaired
    rows (``data_opts.image_column`` + ``data_opts.label_column``: 1/true = desirable,
    0/false = undesirable) -> one example."""

    def __init__(self, dataset, opts, seed: int = 0, rank: int = 0, world_size: int = 1, paired: bool = True) -> None:
        super().__init__(dataset, opts, seed=seed, rank=rank, world_size=world_size)
        self.paired = paired

    def _example(self, row: dict, rng: random.Random, skipped: Counter) -> dict | None:
        if self.paired:
            pair = super()._example(row, rng, skipped)
            if pair is None:
                return None
            return {"pixels": torch.stack([pair["pixels_w"], pair["pixels_l"]]),
                    "captions": [pair["caption"]] * 2, "desirable": [True, False]}
        label = _desirable(row.get(_opt(self.opts, "label_column", "label")))
        if label is None:
            skipped["bad_label"] += 1
            return None
        caption, img = _caption_and_image(row, self.opts, skipped)
        if img is None:
            return None
        if self.opts.empty_prompt_prob > 0 and rng.random() < self.opts.empty_prompt_prob:
            caption = ""
        flip = self.opts.random_flip and rng.random() < 0.5
        return {"pixels": self.transform._one(img, rng, flip)[None], "captions": [caption], "desirable": [label]}


def _caption_and_image(row: dict, opts, skipped: Counter):
    """(caption, RGB image) of an image-caption row, or (None, None) with the reason counted."""
    caption = _caption(row, opts.caption_column)
    if caption is None:
        skipped["bad_caption"] += 1
        return None, None
    try:
        return caption, decode_image(row[_image_column(row, opts)])
    except Exception:  # PIL raises many types
        skipped["bad_image"] += 1
        return None, None


class CaptionPairStream(PreferencePairStream):
    """TPO "free lunch" pairs from image-caption rows (no preference labels): the image with its
    own caption is preferred over the same image with a perturbed caption.
    ``unpaired=True`` (``loss.base: kto``) emits them as a desirable + undesirable example."""

    def __init__(self, dataset, opts, seed: int = 0, rank: int = 0, world_size: int = 1, unpaired: bool = False) -> None:
        super().__init__(dataset, opts, seed=seed, rank=rank, world_size=world_size)
        self.unpaired = unpaired

    def _example(self, row: dict, rng: random.Random, skipped: Counter) -> dict | None:
        caption, img = _caption_and_image(row, self.opts, skipped)
        if img is None:
            return None
        negative = _negative_caption(row, caption, self.opts)
        if caption.strip() == "" or negative == caption:
            skipped["bad_caption"] += 1  # nothing to contrast
            return None
        flip = self.opts.random_flip and rng.random() < 0.5
        pixels = self.transform._one(img, rng, flip)
        if self.unpaired:
            return {"pixels": torch.stack([pixels, pixels]), "captions": [caption, negative], "desirable": [True, False]}
        return {"pixels_w": pixels, "caption": caption, "caption_l": negative}


def _desirable(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return True if x == 1.0 else False if x == 0.0 else None


def _image_column(row: dict, opts) -> str:
    col = _opt(opts, "image_column", "image")
    return col if col in row else "jpg_0"


# ------------------------------------------------------------------------------ loading
def load_rows(source: str, opts, need_any_image: bool = True, extra: tuple[str, ...] = ()) -> Any:
    """Like :func:`~diffalign.data.pickapic.load_preference_dataset` with a looser schema: the
    caption column, an image column (``data_opts.image_column`` or ``jpg_0``) and ``extra``."""
    ds = load_raw_dataset(source, opts)
    columns = column_names(ds)
    missing = [c for c in (opts.caption_column, *extra) if c not in columns]
    image_col = _opt(opts, "image_column", "image")
    if need_any_image and image_col not in columns and "jpg_0" not in columns:
        missing.append(f"{image_col} (or jpg_0)")
    if missing:
        raise UserError(
            f"data={source!r}: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(has: {', '.join(columns)}); see data_opts.caption_column / image_column / label_column"
        )
    return ds


_IMAGE_SEED_STEP = 0x9E3779B97F4A7C15  # per_sample_draws: the j-th image of an unpaired row draws from seed + j * this


def collate_variant(examples: list[dict]) -> PairBatch | UnpairedBatch:
    """Unpaired examples (``pixels`` + ``desirable``) -> :class:`UnpairedBatch`; pair examples ->
    :class:`PairBatch` with whatever the variant adds (``caption_l``, ``reward_w`` / ``reward_l``;
    no ``pixels_l``: one image for both sides)."""
    skipped: Counter = Counter()
    for e in examples:
        skipped.update(e.get("skipped", {}))
    first = examples[0]
    if "pixels" in first:
        seeds = None
        if "sample_seed" in first:  # one seed per image: a row's second image gets a derived one
            seeds = torch.tensor([(e["sample_seed"] + j * _IMAGE_SEED_STEP) % 2**63
                                  for e in examples for j in range(len(e["captions"]))], dtype=torch.int64)
        return UnpairedBatch(
            pixels=torch.cat([e["pixels"] for e in examples]),
            captions=[c for e in examples for c in e["captions"]],
            desirable=torch.tensor([d for e in examples for d in e["desirable"]], dtype=torch.bool),
            skipped=dict(skipped),
            sample_seed=seeds,
        )
    batch = PairBatch(pixels_w=torch.stack([e["pixels_w"] for e in examples]),
                      captions=[e["caption"] for e in examples], skipped=dict(skipped),
                      sample_seed=sample_seeds(examples))
    if "pixels_l" in first:
        batch.pixels_l = torch.stack([e["pixels_l"] for e in examples])
    if "caption_l" in first:
        batch.captions_l = [e["caption_l"] for e in examples]
    if "reward_w" in first:
        batch.rewards_w = torch.tensor([e["reward_w"] for e in examples], dtype=torch.float32)
        batch.rewards_l = torch.tensor([e["reward_l"] for e in examples], dtype=torch.float32)
    return batch


def _unpaired_stream(source: str, opts, **kw) -> UnpairedStream:
    ds = load_rows(source, opts, need_any_image=False)
    cols = column_names(ds)
    if all(c in cols for c in REQUIRED_COLUMNS):
        return UnpairedStream(ds, opts, paired=True, **kw)
    label_col, image_col = _opt(opts, "label_column", "label"), _opt(opts, "image_column", "image")
    if label_col not in cols or (image_col not in cols and "jpg_0" not in cols):
        raise UserError(
            f"data={source!r}: unpaired (desirable / undesirable) training needs Pick-a-Pic pairs "
            f"({', '.join(REQUIRED_COLUMNS)}) or unpaired rows "
            f"({image_col!r} + {label_col!r}: 1 desirable / 0 undesirable) (has: {', '.join(cols)}); "
            "see data_opts.image_column / label_column"
        )
    return UnpairedStream(ds, opts, paired=False, **kw)


# The stream of each data variant; the plain Pick-a-Pic pairs use pair_dataloader's own stream.
STREAMS: dict[DataVariant, Callable[..., PreferencePairStream]] = {
    DataVariant.DUAL_CAPTION_PAIRS: lambda source, opts, **kw: DualCaptionPairStream(load_preference_dataset(source, opts), opts, **kw),
    DataVariant.REWARD_PAIRS: lambda source, opts, **kw: RewardPairStream(load_preference_dataset(source, opts), opts, **kw),
    DataVariant.CAPTION_PAIRS: lambda source, opts, **kw: CaptionPairStream(load_rows(source, opts), opts, **kw),
    DataVariant.CAPTION_UNPAIRED: lambda source, opts, **kw: CaptionPairStream(load_rows(source, opts), opts, unpaired=True, **kw),
    DataVariant.UNPAIRED: _unpaired_stream,
}


def variant_stream(variant: DataVariant, source: str, opts, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> torch.utils.data.IterableDataset | None:
    """The stream of a data variant, or None for the plain Pick-a-Pic pair path."""
    if variant == DataVariant.PAIRS:
        return None
    return STREAMS[variant](source, opts, seed=seed, rank=rank, world_size=world_size)


def variant_dataloader(cfg, rank: int = 0, world_size: int = 1):
    """The data loader of the pair trainer config ``cfg``: the stream of the data variant its
    method reads (``cfg.objective.variant``), or the shared Pick-a-Pic pair path."""
    stream = variant_stream(cfg.objective.variant, cfg.data, cfg.data_opts, cfg.seed, rank, world_size)
    if stream is None:
        return pair_dataloader(cfg.data, cfg.data_opts, cfg.batch_size, cfg.seed, rank=rank, world_size=world_size)
    n = cfg.data_opts.num_workers
    return torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate_variant,
                                       num_workers=n, persistent_workers=n > 0)


def write_toy_captions(out_dir: str | Path, n: int, size: int = 32, seed: int = 0, labels: bool = False) -> Path:
    """Toy image-caption parquet (``caption`` + ``image`` JPEG bytes; with ``labels`` also an
    unpaired ``label`` column: warm images 1, cool noisy ones 0), for TPO and unpaired KTO."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .toy import SUBJECTS, STYLES, jpeg_bytes, toy_preferred_image, toy_rejected_image

    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"caption": [], "image": []}
    if labels:
        cols["label"] = []
    for _ in range(n):
        good = (not labels) or rng.random() < 0.5
        img = toy_preferred_image(rng, size) if good else toy_rejected_image(rng, size)
        cols["caption"].append(f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {STYLES[rng.integers(len(STYLES))]}")
        cols["image"].append(jpeg_bytes(img))
        if labels:
            cols["label"].append(1.0 if good else 0.0)
    types = {"caption": pa.string(), "image": pa.binary(), "label": pa.float64()}
    table = pa.table({k: v for k, v in cols.items()}, schema=pa.schema([(k, types[k]) for k in cols]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


__all__ = [
    "CaptionPairStream", "DualCaptionPairStream", "PERTURBATIONS", "RewardPairStream", "UnpairedStream", "VariantDataOptions",
    "STREAMS", "collate_variant", "load_rows", "perturb_caption", "variant_dataloader", "variant_stream", "write_toy_captions",
]
