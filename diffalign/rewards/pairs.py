"""Rewards on Pick-a-Pic-schema preference pairs: pairwise accuracy, AI relabelling
(RLAIF-style), and margin filtering (FiFA-style).

Schema (Pick-a-Pic v2, :mod:`diffalign.data.schema`): the :data:`~diffalign.data.schema.PAIR_COLUMNS`
``caption``, ``jpg_0``/``jpg_1``, ``label_0``/``label_1`` are required; any other columns are
carried through unchanged. Parquet is read in record batches, so memory stays bounded. Rows whose
images do not decode are skipped and *counted* (with their row numbers) -- never silently lost.

Tie convention for pairwise accuracy (following PickScore's evaluation, Kirstain et al. 2023,
Sec. 5): the reward "predicts a tie" when ``|s0 - s1| <= tie_tol``. A pair scores 1 when the
prediction equals the human label (both prefer the same image, or both tie), 0.5 when exactly
one of the two is a tie, 0 otherwise. With the default ``tie_tol = 0`` a reward practically
never predicts ties, so each human tie counts 0.5. ``accuracy_strict`` reports the usual
number over non-tied human labels only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.schema import PAIR_COLUMNS
from ..errors import UserError
from .base import Reward, decode_image_bytes


def parquet_files(path: str | os.PathLike) -> list[Path]:
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
        if not files:
            raise UserError(f"pairs directory '{p}' contains no .parquet files")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"pairs file '{p}' does not exist")


def check_columns(files: Sequence[Path], required: Sequence[str] = PAIR_COLUMNS) -> None:
    import pyarrow.parquet as pq

    for f in files:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except Exception as e:  # noqa: BLE001 - not parquet at all
            raise UserError(f"pairs file '{f}' is not a readable parquet file: {e}") from None
        missing = [c for c in required if c not in names]
        if missing:
            raise UserError(f"pairs file '{f}' lacks column(s) {', '.join(repr(m) for m in missing)} "
                            f"(Pick-a-Pic schema needs {', '.join(required)})")


@dataclass
class PairBatch:
    """One record batch of pairs; image tensors only for rows that decoded (``ok``)."""

    batch: object  # pyarrow.RecordBatch, all rows (for writing)
    start: int  # global row index of the batch's first row
    ok: np.ndarray  # bool [n]: both images decoded
    captions: list[str]  # for ok rows
    images_0: list[torch.Tensor]
    images_1: list[torch.Tensor]
    label_0: np.ndarray  # for ok rows
    label_1: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)  # (global row, reason)

    @property
    def rows(self) -> np.ndarray:
        return self.start + np.flatnonzero(self.ok)


def iter_pair_batches(path: str | os.PathLike, batch_rows: int = 64) -> Iterator[PairBatch]:
    import pyarrow.parquet as pq

    files = parquet_files(path)
    check_columns(files)
    start = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            cols = {c: batch.column(c).to_pylist() for c in PAIR_COLUMNS}
            n = batch.num_rows
            ok = np.zeros(n, dtype=bool)
            caps, im0, im1, l0, l1, bad = [], [], [], [], [], []
            for i in range(n):
                try:
                    if cols["jpg_0"][i] is None or cols["jpg_1"][i] is None:
                        raise ValueError("missing image bytes")
                    a = decode_image_bytes(cols["jpg_0"][i])
                    b = decode_image_bytes(cols["jpg_1"][i])
                    if cols["label_0"][i] is None or cols["label_1"][i] is None:
                        raise ValueError("missing label")
                except ValueError as e:
                    bad.append((start + i, str(e)))
                    continue
                ok[i] = True
                caps.append(cols["caption"][i] or "")
                im0.append(a)
                im1.append(b)
                l0.append(float(cols["label_0"][i]))
                l1.append(float(cols["label_1"][i]))
            yield PairBatch(batch, start, ok, caps, im0, im1, np.array(l0), np.array(l1), bad)
            start += n


def score_pair_batch(reward: Reward, pb: PairBatch) -> tuple[np.ndarray, np.ndarray]:
    """Scores of image 0 and image 1 for the decodable rows of ``pb`` (one reward call)."""
    k = len(pb.captions)
    if k == 0:
        return np.zeros(0), np.zeros(0)
    images = pb.images_0 + pb.images_1
    prompts = pb.captions + pb.captions
    scores = reward(images, prompts if reward.needs_prompt else None).scores.detach().float().cpu().numpy()
    return scores[:k].astype(np.float64), scores[k:].astype(np.float64)


def preference(s0: np.ndarray, s1: np.ndarray, tie_tol: float = 0.0, higher_is_better: bool = True) -> np.ndarray:
    """+1: image 0 preferred, -1: image 1, 0: tie (``|s0 - s1| <= tie_tol``)."""
    d = np.asarray(s0, dtype=np.float64) - np.asarray(s1, dtype=np.float64)
    if not higher_is_better:
        d = -d
    return np.where(np.abs(d) <= tie_tol, 0, np.sign(d)).astype(np.int64)


def human_preference(label_0: np.ndarray, label_1: np.ndarray) -> np.ndarray:
    return np.sign(np.asarray(label_0, dtype=np.float64) - np.asarray(label_1, dtype=np.float64)).astype(np.int64)


def pairwise_accuracy(s0, s1, label_0, label_1, tie_tol: float = 0.0, higher_is_better: bool = True) -> dict:
    """Accuracy against human labels with PickScore's tie convention (see module docstring)."""
    pred = preference(s0, s1, tie_tol, higher_is_better)
    human = human_preference(label_0, label_1)
    points = np.where(pred == human, 1.0, np.where((pred == 0) | (human == 0), 0.5, 0.0))
    strict = human != 0
    return {
        "accuracy": float(points.mean()) if len(points) else float("nan"),
        "accuracy_strict": float((pred[strict] == human[strict]).mean()) if strict.any() else float("nan"),
        "pairs": int(len(points)),
        "human_ties": int((~strict).sum()),
        "predicted_ties": int((pred == 0).sum()),
    }


@dataclass
class PairScores:
    rows: np.ndarray
    captions: list[str]
    label_0: np.ndarray
    label_1: np.ndarray
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    bad: list[tuple[int, str]]
    images: int  # images scored per reward
    seconds: float


def score_pairs(rewards: dict[str, Reward], path: str | os.PathLike, batch_rows: int = 64) -> PairScores:
    import time

    rows, caps, l0s, l1s, bad = [], [], [], [], []
    acc: dict[str, tuple[list, list]] = {k: ([], []) for k in rewards}
    t0 = time.perf_counter()
    n_images = 0
    for pb in iter_pair_batches(path, batch_rows):
        bad.extend(pb.bad)
        rows.append(pb.rows)
        caps.extend(pb.captions)
        l0s.append(pb.label_0)
        l1s.append(pb.label_1)
        n_images += 2 * len(pb.captions)
        for key, reward in rewards.items():
            a, b = score_pair_batch(reward, pb)
            acc[key][0].append(a)
            acc[key][1].append(b)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
    return PairScores(
        rows=cat(rows).astype(np.int64), captions=caps, label_0=cat(l0s), label_1=cat(l1s),
        scores={k: (cat(v[0]), cat(v[1])) for k, v in acc.items()}, bad=bad, images=n_images,
        seconds=time.perf_counter() - t0,
    )


def describe_accuracy(m: dict) -> str:
    """Both accuracies of :func:`pairwise_accuracy`'s ``m`` with what each one counts
    ("0.750 (strict 1.000)" left that to guess)."""
    untied = m["pairs"] - m["human_ties"]
    return (f"accuracy {m['accuracy']:.3f} over all {m['pairs']} pairs (a human tie counts 0.5), "
            f"{m['accuracy_strict']:.3f} over the {untied} pairs without a human tie")


def describe_bad(bad: list[tuple[int, str]], limit: int = 5) -> str:
    if not bad:
        return "skipped 0 rows"
    shown = ", ".join(f"row {r} ({why[:60]})" for r, why in bad[:limit])
    more = f", ... {len(bad) - limit} more" if len(bad) > limit else ""
    return f"skipped {len(bad)} row(s) with undecodable images or missing labels: {shown}{more}"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_batch(writer, dst, table, provenance: dict):
    """Append ``table`` to the parquet at ``dst``; the first batch opens the writer and records
    ``provenance`` in the schema metadata (as ``diffalign.<key>``), later batches conform to it."""
    import pyarrow.parquet as pq

    if writer is None:
        meta = dict(table.schema.metadata or {})
        meta.update({f"diffalign.{k}".encode(): str(v).encode() for k, v in provenance.items()})
        table = table.replace_schema_metadata(meta)
        writer = pq.ParquetWriter(str(dst), table.schema)
    else:
        table = table.replace_schema_metadata(writer.schema.metadata).cast(writer.schema)
    writer.write_table(table)
    return writer


def _set_column(table, name: str, values, type_=None):
    import pyarrow as pa

    arr = pa.array(values, type=type_)
    if name in table.column_names:
        idx = table.column_names.index(name)
        return table.set_column(idx, pa.field(name, arr.type), arr)
    return table.append_column(pa.field(name, arr.type), arr)


def relabel(reward: Reward, src: str | os.PathLike, dst: str | os.PathLike, *, tie_tol: float = 0.0,
            batch_rows: int = 64) -> dict:
    """Replace ``label_0/label_1`` by the reward's preference (1/0, 0/1, or 0.5/0.5 for
    ``|s0 - s1| <= tie_tol``), keeping the originals as ``human_label_0/1`` (not overwritten if
    the input already has them) and the scores as ``reward_0/reward_1``. ``best_image_uid``,
    when present with ``image_0_uid/image_1_uid``, follows the new labels ("" for a tie); the
    original is kept as ``human_best_image_uid``. Rows with undecodable images are dropped
    from the output and counted. Returns a summary dict."""
    import pyarrow as pa

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    total = agree = ties = 0
    bad: list[tuple[int, str]] = []
    try:
        for pb in iter_pair_batches(src, batch_rows):
            bad.extend(pb.bad)
            if not pb.ok.any():
                continue
            s0, s1 = score_pair_batch(reward, pb)
            pref = preference(s0, s1, tie_tol, reward.higher_is_better)
            new0 = np.where(pref > 0, 1.0, np.where(pref < 0, 0.0, 0.5))
            table = pa.Table.from_batches([pb.batch]).filter(pa.array(pb.ok))
            names = table.column_names
            label_type = table.schema.field("label_0").type
            for side in ("0", "1"):
                if f"human_label_{side}" not in names:
                    table = _set_column(table, f"human_label_{side}", table.column(f"label_{side}"), label_type)
            table = _set_column(table, "label_0", pa.array(new0).cast(label_type))
            table = _set_column(table, "label_1", pa.array(1.0 - new0).cast(label_type))
            if {"best_image_uid", "image_0_uid", "image_1_uid"} <= set(names):
                if "human_best_image_uid" not in names:
                    table = _set_column(table, "human_best_image_uid", table.column("best_image_uid"))
                u0 = table.column("image_0_uid").to_pylist()
                u1 = table.column("image_1_uid").to_pylist()
                best = [a if p > 0 else (b if p < 0 else "") for a, b, p in zip(u0, u1, pref)]
                table = _set_column(table, "best_image_uid", pa.array(best).cast(table.schema.field("best_image_uid").type))
            table = _set_column(table, "reward_0", s0.tolist(), pa.float64())
            table = _set_column(table, "reward_1", s1.tolist(), pa.float64())
            writer = _write_batch(writer, dst, table, {"relabel_reward": reward.name, "relabel_tie_tol": tie_tol})
            human = human_preference(pb.label_0, pb.label_1)
            total += len(pref)
            agree += int((pref == human).sum())
            ties += int((pref == 0).sum())
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise UserError(f"relabel: no decodable pairs in '{src}' ({describe_bad(bad)})")
    return {"pairs": total, "agree_with_human": agree / total if total else float("nan"), "ai_ties": ties,
            "skipped": len(bad), "bad": bad, "out": str(dst)}


def filter_pairs(reward: Reward, src: str | os.PathLike, dst: str | os.PathLike, *, keep_fraction: float = 0.5,
                 require_agreement: bool = False, batch_rows: int = 64) -> dict:
    """Keep the ``keep_fraction`` of pairs with the largest reward margin ``|s0 - s1|``.

    FiFA (Yang et al. 2024, "Automated Filtering of Human Feedback Data for Aligning
    Text-to-Image Diffusion Models") selects pairs with a large preference margin of a reward
    model; this keeps that criterion (its text-quality/diversity terms are not included).
    ``require_agreement`` first drops pairs whose strict human label the reward contradicts.
    Output keeps every input column plus ``reward_0``, ``reward_1``, ``reward_margin``
    (``|s0 - s1|``); rows keep their input order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0.0 < keep_fraction <= 1.0:
        raise UserError(f"filter-pairs: --keep-fraction must be in (0, 1], got {keep_fraction}")
    ps = score_pairs({reward.name: reward}, src, batch_rows)
    s0, s1 = ps.scores[reward.name]
    margin = np.abs(s0 - s1)
    eligible = np.ones(len(margin), dtype=bool)
    if require_agreement:
        pref = preference(s0, s1, 0.0, reward.higher_is_better)
        human = human_preference(ps.label_0, ps.label_1)
        eligible = (human == 0) | (pref == human)
    n_keep = int(round(keep_fraction * len(margin)))
    order = np.argsort(-np.where(eligible, margin, -np.inf), kind="stable")
    chosen = [i for i in order[:n_keep] if eligible[i]]
    keep_rows = {int(ps.rows[i]): i for i in chosen}
    threshold = float(margin[chosen].min()) if chosen else float("nan")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    start = 0
    written = 0
    try:
        for f in parquet_files(src):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                idx = [i for i in range(batch.num_rows) if start + i in keep_rows]
                if idx:
                    table = pa.Table.from_batches([batch]).take(pa.array(idx))
                    pos = [keep_rows[start + i] for i in idx]
                    table = _set_column(table, "reward_0", s0[pos].tolist(), pa.float64())
                    table = _set_column(table, "reward_1", s1[pos].tolist(), pa.float64())
                    table = _set_column(table, "reward_margin", margin[pos].tolist(), pa.float64())
                    writer = _write_batch(writer, dst, table, {"filter_reward": reward.name,
                                                              "filter_keep_fraction": keep_fraction})
                    written += len(idx)
                start += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise UserError(f"filter-pairs: no pairs kept from '{src}' ({describe_bad(ps.bad)})")
    return {"pairs": len(margin), "kept": written, "min_kept_margin": threshold, "skipped": len(ps.bad),
            "bad": ps.bad, "ineligible": int((~eligible).sum()), "out": str(dst)}
