"""Pick-a-Pic-schema preference pairs: loading, filtering, transforms, per-rank streaming.

Schema: :mod:`diffalign.data.schema` (Pick-a-Pic v2; :data:`~diffalign.data.schema.REQUIRED_COLUMNS`
are checked on load). Sources: a hub id (``datasets`` downloads
or streams it), a local dataset dir, a parquet file, a directory of parquet files, or a glob.

Rows are yielded chosen-first: when ``label_0 < label_1`` the two images are swapped. Rows that
cannot be used are skipped and *counted by reason* (``unlabeled``, ``tie``, ``identical``,
``bad_label``, ``bad_image``, ``bad_caption``); each yielded example carries the counts since the
previous one, so the trainer can log ``skipped_rows`` even with dataloader workers.
"""

from __future__ import annotations

import glob
import hashlib
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from ..hub import check_hub_name
from ..files import decode_image as decode_image_bytes
from ..files import rgb_image
from .batches import PairBatch
from .schema import REQUIRED_COLUMNS


def parquet_files(source: str) -> list[str] | None:
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source))
        return files or None
    p = Path(source)
    if p.is_file() and p.suffix == ".parquet":
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
        return files or None
    return None




def load_raw_dataset(source: str, opts) -> Any:
    """``source`` (hub id, dataset dir, parquet file(s) or glob) as a ``datasets`` Dataset, or an
    IterableDataset when ``opts.streaming``; one clear error when it cannot be loaded."""
    import datasets

    if not source:
        raise UserError("config key 'data' is empty: give a hub id, a dataset dir or parquet file(s)")
    files = parquet_files(source)
    if files is None:
        check_hub_name(source, "data", repo_type="dataset")
    try:
        if files is not None:
            return datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=opts.streaming)
        return datasets.load_dataset(source, split=opts.split, streaming=opts.streaming)
    except Exception as e:  # datasets raises many types; one line naming the source is what users need
        raise UserError(f"data={source!r}: could not load it as a dataset ({type(e).__name__}: {e})") from None


def column_names(ds) -> list[str]:
    return ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())


def load_preference_dataset(source: str, opts) -> Any:
    """Pick-a-Pic-schema rows (see :func:`load_raw_dataset`), with the required columns checked."""
    ds = load_raw_dataset(source, opts)
    columns = column_names(ds)
    missing = [c for c in (*REQUIRED_COLUMNS, opts.caption_column) if c not in columns]
    if missing:
        raise UserError(
            f"data={source!r}: missing column(s) {', '.join(repr(m) for m in missing)} of the Pick-a-Pic schema "
            f"(has: {', '.join(columns)}); set data_opts.caption_column if the caption is named differently"
        )
    return ds


def _to_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    return None


def decode_image(value: Any):
    """JPEG/PNG bytes (or a datasets Image dict, or a PIL image) -> RGB PIL image
    (:func:`diffalign.files.decode_image`), else raises ``ValueError``; images under 2x2 are refused."""
    from PIL import Image

    if isinstance(value, Image.Image):
        img = rgb_image(value)
    else:
        raw = _to_bytes(value)
        if raw is None:
            raise ValueError(f"not image bytes ({type(value).__name__})")
        img = decode_image_bytes(raw)
    if img.width < 2 or img.height < 2:
        raise ValueError(f"image too small ({img.width}x{img.height})")
    return img


def _label(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(x) or x < 0 or x > 1:
        return None
    return x


def classify_row(row: dict, opts) -> tuple[str | None, bool]:
    """(skip reason or None, swap). ``swap`` means image 1 is the chosen one."""
    if row.get("has_label") is False:
        return "unlabeled", False
    l0 = _label(row.get("label_0"))
    l1 = _label(row.get("label_1", None if l0 is None else 1.0 - l0))
    if l0 is None or l1 is None:
        return "bad_label", False
    if l0 == l1:
        if opts.drop_ties:
            return "tie", False
        return None, False
    if opts.drop_identical and row.get("are_different") is False:
        return "identical", False
    return None, l0 < l1


class PairTransform:
    """Resize (shorter side -> resolution), crop (center or random), flip; the same crop
    offsets-policy and one flip decision for both images of a pair. Output in [-1, 1]."""

    def __init__(self, resolution: int, random_crop: bool, random_flip: bool) -> None:
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip

    def _one(self, img, rng: random.Random, flip: bool) -> torch.Tensor:
        from PIL import Image

        r = self.resolution
        scale = r / min(img.width, img.height)
        w, h = max(r, round(img.width * scale)), max(r, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        if self.random_crop:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        img = img.crop((left, top, left + r, top + r))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __call__(self, img_w, img_l, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        flip = self.random_flip and rng.random() < 0.5
        return self._one(img_w, rng, flip), self._one(img_l, rng, flip)


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of every random draw of data row ``row`` in epoch ``epoch`` under
    ``data_opts.per_sample_draws``: the stream's flip, crop and caption dropout, and the trainer's
    posterior sample, timestep and noise. A hash, so nearby rows and epochs get unrelated streams."""
    digest = hashlib.blake2b(f"diffalign-sample:{seed}:{epoch}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: a torch seed


def dealt(order, epoch: int, epoch_len: int, shard: int, num_shards: int):
    """Shard ``shard``'s part of one epoch's ``order`` when the concatenated epochs are dealt to
    the shards round-robin (``data_opts.per_sample_draws``): global position ``p`` goes to shard
    ``p % num_shards``, across epoch ends too, so the k-th batch of every process together holds
    the pairs of the k-th batch of a one-process run with ``num_shards`` times the batch size.
    (Without it every epoch starts again at shard 0: an epoch whose length does not divide by
    the shard count shifts the later epochs.)"""
    return order[(shard - epoch * epoch_len) % num_shards::num_shards]


class PreferencePairStream(torch.utils.data.IterableDataset):
    """Endless, per-rank, per-worker stream of ``{pixels_w, pixels_l, caption, skipped}``.

    Epochs reshuffle with ``seed + epoch``; rank r of W (and worker k of K) takes every
    (W*K)-th row, so ranks see disjoint data. A streamed dataset is split by rank with
    ``datasets.distributed.split_dataset_by_node`` (whole files per rank when they divide evenly:
    a rank does not download the others' rows), then every K-th row per worker. Endless iteration keeps DDP ranks in lock-step
    even when they skip different numbers of bad rows (the trainer loops on ``max_steps``).

    ``data_opts.per_sample_draws``: a local dataset's rows are dealt round-robin over the
    concatenated epochs (:func:`dealt`), and each example's random choices (flip, crop, caption
    dropout) come from ``random.Random(sample_seed(seed, epoch, row))``, the example carrying that
    seed for the trainer's draws. Rows are dealt before they are read, so rows this stream skips
    (ties, bad images) are skipped per rank and shift that rank's later batches against a
    one-process run: the latent cache drops them before dealing; a streamed (hub) dataset is split
    by files per rank, so its order depends on the process count anyway.
    """

    def __init__(self, dataset, opts, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.dataset = dataset
        self.opts = opts
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.transform = PairTransform(opts.resolution, opts.random_crop, opts.random_flip)
        self._state: dict = {"epoch": 0, "pos": 0, "rng": None, "skipped": {}}
        self._resume: dict | None = None

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    @property
    def per_sample_draws(self) -> bool:
        return bool(getattr(self.opts, "per_sample_draws", False))

    def _rows(self, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[tuple[int, dict, int]]:
        """(position in this shard's epoch order, row, the row's index), from position ``start``.
        The index is the row's place in the dataset (a streamed dataset: in this rank's part of it)."""
        import datasets

        limit = self.opts.max_samples
        if isinstance(self.dataset, datasets.IterableDataset):
            ds = self.dataset.shuffle(seed=self.seed + epoch, buffer_size=self.opts.shuffle_buffer)
            if self.world_size > 1:
                # each rank reads only its own files when the file count divides by the ranks
                # (Pick-a-Pic v2 has hundreds of parquet shards); otherwise datasets keeps every
                # world_size-th row, as the modulo below did. The same seed on every rank keeps the
                # shuffled file list identical, so the ranks' files are disjoint.
                from datasets.distributed import split_dataset_by_node

                ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
                workers = num_shards // self.world_size
                shard, num_shards = shard % workers, workers
                limit = None if limit is None else -(-limit // self.world_size)
            pos = 0
            for i, row in enumerate(ds):
                if limit is not None and i >= limit:
                    break
                if i % num_shards == shard:
                    if pos >= start:
                        yield pos, row, i
                    pos += 1
        else:
            n = len(self.dataset) if limit is None else min(limit, len(self.dataset))
            order = np.random.default_rng(self.seed + epoch).permutation(n)
            order = dealt(order, epoch, n, shard, num_shards) if self.per_sample_draws else order[shard::num_shards]
            for pos in range(start, len(order)):
                yield pos, self.dataset[int(order[pos])], int(order[pos])

    # Resumable position (exact when the stream runs in the main process, num_workers=0).
    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict | None) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[dict]:
        shard, num_shards = self._shard()
        rng = random.Random(self.seed * 7919 + shard)
        skipped: Counter = Counter()
        epoch, start = 0, 0
        resume = getattr(self, "_resume", None)
        if resume:
            epoch, start = resume["epoch"], resume["pos"]
            if resume.get("rng") is not None:
                version, internal, gauss = resume["rng"]
                rng.setstate((version, tuple(internal), gauss))
            skipped.update(resume.get("skipped", {}))
            self._resume = None
        while True:
            yielded = 0
            for pos, row, index in self._rows(epoch, shard, num_shards, start):
                keyed = sample_seed(self.seed, epoch, index) if self.per_sample_draws else None
                example = self._example(row, rng if keyed is None else random.Random(keyed), skipped)
                if example is None:
                    self._state = {"epoch": epoch, "pos": pos + 1, "rng": list(rng.getstate()), "skipped": dict(skipped)}
                    continue
                if keyed is not None:
                    example["sample_seed"] = keyed
                example["skipped"] = dict(skipped)
                skipped.clear()
                yielded += 1
                self._state = {"epoch": epoch, "pos": pos + 1, "rng": list(rng.getstate()), "skipped": {}}
                yield example
            if yielded == 0 and start == 0:
                raise UserError(
                    f"no usable preference pair in shard {shard}/{num_shards} of the data "
                    f"(skipped: {dict(skipped) or 'none; the shard is empty'}); check labels, ties "
                    "(data_opts.drop_ties) and image bytes, or use fewer processes/workers"
                )
            epoch, start = epoch + 1, 0

    def _example(self, row: dict, rng: random.Random, skipped: Counter) -> dict | None:
        reason, swap = classify_row(row, self.opts)
        if reason is not None:
            skipped[reason] += 1
            return None
        caption = row.get(self.opts.caption_column)
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            skipped["bad_caption"] += 1
            return None
        try:
            img0, img1 = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            skipped["bad_image"] += 1
            return None
        chosen, rejected = (img1, img0) if swap else (img0, img1)
        if self.opts.empty_prompt_prob > 0 and rng.random() < self.opts.empty_prompt_prob:
            caption = ""
        pixels_w, pixels_l = self.transform(chosen, rejected, rng)
        return {"pixels_w": pixels_w, "pixels_l": pixels_l, "caption": caption}


def collate_pairs(examples: list[dict]) -> PairBatch:
    skipped: Counter = Counter()
    for e in examples:
        skipped.update(e.get("skipped", {}))
    return PairBatch(
        pixels_w=torch.stack([e["pixels_w"] for e in examples]),
        pixels_l=torch.stack([e["pixels_l"] for e in examples]),
        captions=[e["caption"] for e in examples],
        skipped=dict(skipped),
        sample_seed=sample_seeds(examples),
    )


def sample_seeds(examples: list[dict]) -> torch.Tensor | None:
    """The examples' ``sample_seed`` as an int64 tensor (``data_opts.per_sample_draws``), else None."""
    if "sample_seed" not in examples[0]:
        return None
    return torch.tensor([e["sample_seed"] for e in examples], dtype=torch.int64)


def pair_dataloader(source: str, opts, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    dataset = load_preference_dataset(source, opts)
    stream = PreferencePairStream(dataset, opts, seed=seed, rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=collate_pairs,
        num_workers=opts.num_workers,
        persistent_workers=opts.num_workers > 0,
    )


__all__ = [
    "PairTransform", "PreferencePairStream", "classify_row", "collate_pairs", "dealt", "decode_image",
    "load_preference_dataset", "pair_dataloader", "sample_seed", "sample_seeds",
]
