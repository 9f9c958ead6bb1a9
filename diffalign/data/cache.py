"""Latent + text-embedding cache for the offline pair trainer (on by default).

Today's reference scripts run the VAE encoder and the text encoders on every pair of every
epoch. The cache runs them once per usable pair and stores:

* the VAE posterior **moments** (mean, std) of the chosen and rejected image, unscaled, for the
  plain and (when ``data_opts.random_flip``) the horizontally flipped crop: latents of a flipped
  image are not the flipped latents, so both are encoded. Training samples
  ``mean + std * noise`` exactly as ``latent_dist.sample()`` does, so a cached and an uncached
  run draw the same numbers (``tests/test_cache.py`` checks the losses are equal);
* the prompt conditioning once per **unique** caption (Pick-a-Pic repeats prompts), plus the
  empty caption for ``data_opts.empty_prompt_prob``;
* with ``loss.cached_reference`` (an estimator variant for DPO/IPO/CoPG): each pair gets one fixed
  (posterior sample, noise, timestep) drawn from a per-pair seed, and the reference model's MSEs
  at it are computed once (``reference.safetensors``). Training then needs no reference forward,
  at the price of one noise sample per pair instead of a fresh one every epoch; flips are off.

Where: ``data_opts.cache_dir`` when set, else a directory under :func:`default_cache_root`
(``~/.cache/diffalign/latents`` unless ``$DIFFALIGN_LATENT_CACHE`` or ``$DIFFALIGN_CACHE`` say otherwise) named by a hash of the fingerprint below, so runs on the
same data, model and settings share one cache and different ones never collide
(:func:`resolve_cache_dir`). ``data_opts.cache: false`` turns the cache off; methods that read
another data variant, random crops and streaming datasets train uncached (:func:`cache_applies`).

The cached stream visits pairs in the same order, with the same flip and empty-caption draws, as
the uncached stream (:class:`CachedPairStream`), so a cached run trains on the same batches.

On disk, next to nothing else: ``cache_dir/index.json`` (fingerprint, row map, skip counts) and
``shard-00000.safetensors`` ... (latent moments) and ``captions.safetensors``. The fingerprint
keys on *contents*, not path strings: each data file's size, mtime and a sampled hash, the
model dir's config files (hashed) and weight files (size, mtime, sampled hash), or the hub
revision for hub ids. A cache whose data or model contents changed is stale and rebuilt with a
one-line message; a cache built with other settings (resolution, caption column, ...) is refused
with the differing key named. Random crops are not cacheable (each epoch would need new crops):
the cache requires ``random_crop: false``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..logging import is_quiet, progress
from ..losses import per_sample_mse
from ..models import cat_cond
from .batches import CachedPairBatch
from .pickapic import PairTransform, classify_row, decode_image, load_preference_dataset

CACHE_VERSION = 3  # 2: data and model keyed by content; 3: source row count (the uncached stream's order)

# Fingerprint keys whose change means the inputs were regenerated or replaced: the cache is
# stale and gets rebuilt. Any other key is a setting of this run; a mismatch there means the
# cache_dir belongs to another config and is refused (rebuilding would destroy that cache).
CONTENT_KEYS = ("version", "data_content", "model_content", "vae_content")

_SAMPLE = 1 << 20  # bytes hashed at each of head / middle / tail of a large file
# small text files that define a model (configs, tokenizer, scheduler): hashed in full
_CONFIG_SUFFIXES = {".json", ".txt", ".yaml", ".yml", ".model", ".merges", ".vocab"}


def file_signature(path: Path) -> str:
    """``size:mtime_ns:hash`` of a file. Files up to 4 MiB are hashed in full, larger ones at
    their head, middle and tail: Pick-a-Pic shards are GBs each, and a regenerated file
    differs in size, mtime and bytes alike, so sampling keeps the check to milliseconds."""
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        if st.st_size <= 4 * _SAMPLE:
            h.update(f.read())
        else:
            for offset in (0, st.st_size // 2, st.st_size - _SAMPLE):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"


def _tree_signature(root: Path, files: list[Path]) -> dict[str, str]:
    out = {}
    for f in sorted(files):
        rel = str(f.relative_to(root)) if f.is_relative_to(root) else str(f)
        if f.suffix in _CONFIG_SUFFIXES:  # configs change in place without changing size
            out[rel] = "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()[:32]
        else:
            out[rel] = file_signature(f)
    return out


def _visible_files(root: Path) -> list[Path]:
    # hidden entries are tool state (.cache/ of huggingface_hub, .git), not model or data
    return [f for f in root.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts)]


def data_content(source: str, opts) -> dict:
    """Content signature of the data ``source`` (see :func:`load_raw_dataset`)."""
    from .pickapic import parquet_files

    files = parquet_files(source) if source else None
    if files is not None:
        paths = [Path(f).resolve() for f in files]
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        return {"files": _tree_signature(root, paths)}
    p = Path(source)
    if p.exists():  # a save_to_disk dir or a loader script dir: every file in it counts
        root = p.resolve()
        return {"files": _tree_signature(root, _visible_files(root) if root.is_dir() else [root])}
    # a hub dataset: the fingerprint ``datasets`` derives from the resolved revision and files
    ds = load_preference_dataset(source, opts)
    return {"hub": source, "datasets_fingerprint": getattr(ds, "_fingerprint", None)}


def model_content(model: str | None, revision: str | None = None) -> dict | None:
    """Content signature of a model dir (configs hashed, weights by size/mtime/sample), or the
    hub id and its resolved commit (the snapshot dir name in the local hub cache)."""
    if not model:
        return None
    p = Path(model)
    if p.exists():
        root = p.resolve()
        return {"files": _tree_signature(root, _visible_files(root) if root.is_dir() else [root])}
    commit = revision
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(model, revision=revision, local_files_only=True, allow_patterns=["*.json"])
        commit = Path(snap).name
    except Exception:  # not downloaded yet, or offline: the requested revision is all we know
        pass
    return {"hub": model, "revision": commit}


def cache_fingerprint(cfg, adapter) -> dict:
    o = cfg.data_opts
    vae = adapter.vae_config
    return {
        "version": CACHE_VERSION, "model_content": model_content(cfg.model, cfg.model_opts.revision),
        "revision": cfg.model_opts.revision, "vae_content": model_content(cfg.model_opts.vae),
        "scaling_factor": getattr(vae, "scaling_factor", None), "shift_factor": getattr(vae, "shift_factor", None),
        "data_content": data_content(cfg.data, o), "split": o.split, "caption_column": o.caption_column,
        "resolution": o.resolution,
        "flips": bool(o.random_flip), "drop_ties": o.drop_ties, "drop_identical": o.drop_identical,
        "max_samples": o.max_samples, "max_sequence_length": cfg.model_opts.max_sequence_length,
        "cached_reference": _cached_reference(cfg), "seed": cfg.seed if _cached_reference(cfg) else None,
        # where the inputs were, for people reading index.json; not compared (a moved data
        # dir with the same contents keeps its cache)
        "data": cfg.data, "model": cfg.model,
    }


def _describe_change(key: str, old, new) -> str:
    what = {"data_content": "data", "model_content": "model", "vae_content": "VAE", "version": "cache format"}[key]
    if key == "version":
        return f"cache format {old} -> {new}"
    old_files = (old or {}).get("files") if isinstance(old, dict) else None
    new_files = (new or {}).get("files") if isinstance(new, dict) else None
    if old_files is not None and new_files is not None:
        changed = sorted(k for k in set(old_files) | set(new_files) if old_files.get(k) != new_files.get(k))
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            return f"{what} files changed: {', '.join(changed[:3])}{more}"
    return f"{what} changed"


def _cached_reference(cfg) -> bool:
    return bool(getattr(getattr(cfg, "loss", None), "cached_reference", False))


def row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row * 7_919 + 17) % (2**63 - 1)


def fixed_pair_draws(adapter, batch: CachedPairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [2B], noise [2B], timesteps [2B]) of the cached-reference estimator: pair ``i``
    always gets the posterior samples, noise and timestep drawn from ``Generator(row_seed[i])``,
    so the reference losses stored in the cache belong to exactly this (x_t, t)."""
    means, noises, ts = [], [], []
    for i, seed in enumerate(batch.row_seed.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        t = adapter.sample_timesteps(1, generator=g)
        shape = batch.mean_w[i].shape
        eps_w, eps_l, noise = (torch.randn(shape, generator=g) for _ in range(3))
        means.append((batch.mean_w[i] + batch.std_w[i] * eps_w, batch.mean_l[i] + batch.std_l[i] * eps_l))
        noises.append(noise)
        ts.append(t)
    samples = torch.stack([m[0] for m in means] + [m[1] for m in means])
    latents = adapter.scale_latents(samples)
    noise = torch.stack(noises).to(latents.device)
    t = torch.cat(ts).to(latents.device)
    return latents, torch.cat([noise, noise]), torch.cat([t, t])


@torch.no_grad()
def compute_reference_losses(cfg, adapter, out: Path, index: dict, batch_size: int = 16) -> None:
    """The reference's per-pair MSEs at each pair's fixed draws (:func:`fixed_pair_draws`), stored as
    ``reference.safetensors`` (``ref_w``, ``ref_l`` in row order). The reference is the network as
    loaded: adapters disabled when LoRA is already attached."""
    from safetensors.torch import load_file

    from ..files import save_safetensors as save_file

    shards = [load_file(str(out / f"shard-{i:05d}.safetensors")) for i in range(index["shards"])]
    conds = load_file(str(out / "captions.safetensors"))
    rows = index["rows"]
    ref_w, ref_l = [], []
    has_lora = getattr(adapter.denoiser, "_hf_peft_config_loaded", False)
    for start in progress(range(0, len(rows), batch_size), desc="cache reference losses"):
        chunk = rows[start:start + batch_size]
        moments = {k: torch.stack([shards[r["shard"]][k][r["offset"]] for r in chunk]) for k in ("mean_w", "std_w", "mean_l", "std_l")}
        cond = {k: torch.stack([v[r["caption"]] for r in chunk]).to(adapter.device) for k, v in conds.items()}
        batch = CachedPairBatch(**moments, cond=cond, captions=[index["captions"][r["caption"]] for r in chunk],
                                row_seed=torch.tensor([row_seed(cfg.seed, start + j) for j in range(len(chunk))]))
        latents, noise, t = fixed_pair_draws(adapter, batch)
        x_t, target = adapter.noisy_input_and_target(latents, noise, t)
        cond2 = cat_cond(cond, cond)
        if has_lora:
            with adapter.adapters_disabled():
                pred = adapter.predict(x_t, t, cond2)
        else:
            pred = adapter.predict(x_t, t, cond2)
        w, l = per_sample_mse(pred, target).chunk(2)
        ref_w.append(w.cpu())
        ref_l.append(l.cpu())
    save_file({"ref_w": torch.cat(ref_w), "ref_l": torch.cat(ref_l)}, out / "reference.safetensors")


def default_cache_root() -> Path:
    """``$DIFFALIGN_LATENT_CACHE``, else ``$DIFFALIGN_CACHE/latents``, else ``~/.cache/diffalign/latents``."""
    if os.environ.get("DIFFALIGN_LATENT_CACHE"):
        return Path(os.environ["DIFFALIGN_LATENT_CACHE"])
    root = os.environ.get("DIFFALIGN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "diffalign") / "latents"


def cache_applies(cfg) -> tuple[bool, str]:
    """Whether this pair-training run reads the latent cache, and if not why (one phrase).
    ``data_opts.cache=false`` turns it off; otherwise an explicit ``data_opts.cache_dir`` always
    applies (:func:`_check_cacheable` then names what stands in its way)."""
    o = cfg.data_opts
    if not o.cache:
        return False, "data_opts.cache=false"
    if o.cache_dir:
        return True, ""
    if not cfg.objective.cacheable:
        return False, f"method {cfg.method} reads its own data variant ({cfg.objective.variant.value})"
    if o.random_crop:
        return False, "data_opts.random_crop=true (crops differ every epoch)"
    if o.streaming:
        return False, "data_opts.streaming=true (a cache needs one full pass over the data)"
    return True, ""


def resolve_cache_dir(cfg, adapter) -> str:
    """``data_opts.cache_dir``, or the content-keyed directory under :func:`default_cache_root`."""
    if cfg.data_opts.cache_dir:
        return cfg.data_opts.cache_dir
    fp = {k: v for k, v in cache_fingerprint(cfg, adapter).items() if k not in ("data", "model")}
    key = hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return str(default_cache_root() / key)


def _check_cacheable(cfg) -> None:
    if _cached_reference(cfg) and not cfg.data_opts.cache_dir:
        raise UserError("loss.cached_reference=true needs data_opts.cache_dir (the reference losses live in the cache)")
    if cfg.data_opts.random_crop:
        raise UserError("data_opts.cache_dir needs data_opts.random_crop=false (random crops cannot be precomputed)")
    if not cfg.objective.cacheable:
        raise UserError(f"data_opts.cache_dir: method {cfg.method!r} reads its own data variant "
                        f"({cfg.objective.variant.value}); the cache serves Pick-a-Pic pairs")


@torch.no_grad()
def build_cache(cfg, adapter, batch_size: int = 16, shard_rows: int = 4096, cache_dir: str | None = None) -> Path:
    """Encode every usable pair of ``cfg.data`` once into ``cache_dir`` (default
    ``data_opts.cache_dir``); returns the cache dir."""
    _check_cacheable(cfg)
    out = Path(cache_dir or cfg.data_opts.cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # build in a private directory beside the cache and publish when complete: two runs that
    # build the same cache at once (the testbed job trains several methods on one pair set in
    # parallel) must never see each other's half-written or deleted files
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _write_cache(cfg, adapter, work, batch_size, shard_rows)
        _publish_cache(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _publish_cache(work: Path, out: Path) -> None:
    """Move a complete cache from ``work`` into ``out`` file by file (each an atomic rename),
    ``index.json`` last; the old index goes first, so a cache is never complete-looking with a
    mix of files (old shards beyond the new count are removed). When another run has meanwhile
    published a cache of the same fingerprint, that one stays untouched (it may be being read)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        if json.loads((out / "index.json").read_text())["fingerprint"] == json.loads((work / "index.json").read_text())["fingerprint"]:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    (out / "index.json").unlink(missing_ok=True)
    new = {f.name for f in work.iterdir()}
    for old in [*out.glob("shard-*.safetensors"), out / "reference.safetensors"]:
        if old.name not in new:
            old.unlink(missing_ok=True)
    for name in sorted(new - {"index.json"}):
        os.replace(work / name, out / name)
    os.replace(work / "index.json", out / "index.json")


def _write_cache(cfg, adapter, out: Path, batch_size: int, shard_rows: int) -> None:
    """The cache files of :func:`build_cache`, into the empty directory ``out``."""
    from ..files import save_safetensors as save_file

    fingerprint = cache_fingerprint(cfg, adapter)  # of the inputs as they are read now
    opts = cfg.data_opts
    dataset = load_preference_dataset(cfg.data, opts)
    transform = PairTransform(opts.resolution, random_crop=False, random_flip=False)
    skipped: Counter = Counter()
    captions: dict[str, int] = {"": 0}
    rows: list[dict] = []
    pending: list[tuple] = []
    shard_tensors: dict[str, list[torch.Tensor]] = {}
    shard_idx = 0

    def flush_batch():
        if not pending:
            return
        px_w = torch.stack([p[0] for p in pending])
        px_l = torch.stack([p[1] for p in pending])
        views = {"": (px_w, px_l)}
        if opts.random_flip:
            views["flip_"] = (px_w.flip(-1), px_l.flip(-1))
        for prefix, (w, l) in views.items():
            mean, std = adapter.encode_moments(torch.cat([w, l]))
            n = w.shape[0]
            for name, t in ((f"{prefix}mean_w", mean[:n]), (f"{prefix}mean_l", mean[n:]),
                            (f"{prefix}std_w", std[:n]), (f"{prefix}std_l", std[n:])):
                shard_tensors.setdefault(name, []).append(t.float().cpu())
        pending.clear()

    def flush_shard():
        nonlocal shard_idx
        flush_batch()
        if shard_tensors:
            save_file({k: torch.cat(v).contiguous() for k, v in shard_tensors.items()}, out / f"shard-{shard_idx:05d}.safetensors")
            shard_tensors.clear()
            shard_idx += 1

    n_rows = len(dataset) if opts.max_samples is None else min(opts.max_samples, len(dataset))
    for i, row in enumerate(progress(dataset, total=n_rows, desc="cache latents")):
        if i >= n_rows:
            break
        reason, swap = classify_row(row, opts)
        caption = row.get(opts.caption_column) or ""
        if reason is None and not isinstance(caption, str):
            reason = "bad_caption"
        if reason is None:
            try:
                img0, img1 = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
            except Exception:
                reason = "bad_image"
        if reason is not None:
            skipped[reason] += 1
            continue
        chosen, rejected = (img1, img0) if swap else (img0, img1)
        px_w, px_l = transform(chosen, rejected, random.Random(0))
        pending.append((px_w, px_l))
        captions.setdefault(caption, len(captions))
        rows.append({"source_row": i, "caption": captions[caption], "shard": shard_idx,
                     "offset": sum(len(p) for p in shard_tensors.get("mean_w", [])) + len(pending) - 1})
        if len(pending) >= batch_size:
            flush_batch()
        if sum(len(p) for p in shard_tensors.get("mean_w", [])) >= shard_rows:
            flush_shard()
    flush_shard()
    if not rows:
        raise UserError(f"data={cfg.data!r}: no usable pair to cache (skipped: {dict(skipped)})")

    caption_list = sorted(captions, key=captions.get)
    conds: dict[str, list[torch.Tensor]] = {}
    for start in progress(range(0, len(caption_list), batch_size), desc="cache text"):
        for k, v in adapter.encode_prompt(caption_list[start:start + batch_size]).items():
            conds.setdefault(k, []).append(v.float().cpu())
    save_file({k: torch.cat(v).contiguous() for k, v in conds.items()}, out / "captions.safetensors")
    index = {"fingerprint": fingerprint, "rows": rows, "captions": caption_list,
             "skipped": dict(skipped), "shards": shard_idx, "source_rows": n_rows}
    if _cached_reference(cfg):
        compute_reference_losses(cfg, adapter, out, index, batch_size)
    (out / "index.json").write_text(json.dumps(index))  # last: a cache without index.json is incomplete


def check_cache(cfg, adapter, announce: bool = True, cache_dir: str | None = None) -> dict | None:
    """The cache index if ``cache_dir`` (default ``data_opts.cache_dir``) holds a cache for
    exactly this config; None if it is empty or stale (its data or model contents changed:
    rebuild it, ``announce`` says so in one line); raises :class:`UserError` if it was built
    with other settings."""
    cache_dir = cache_dir or cfg.data_opts.cache_dir
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        have = index["fingerprint"]
    except (ValueError, KeyError, TypeError):
        if announce:
            print(f"latent cache at {cache_dir} has an unreadable index.json; rebuilding it", file=sys.stderr)
        return None
    want = cache_fingerprint(cfg, adapter)
    for key in CONTENT_KEYS:
        if have.get(key) != want[key]:
            if announce:
                print(f"latent cache at {cache_dir} is stale ({_describe_change(key, have.get(key), want[key])}); "
                      "rebuilding it", file=sys.stderr)
            return None
    for key, value in want.items():
        if key in CONTENT_KEYS or key in ("data", "model"):
            continue
        if have.get(key) != value:
            raise UserError(
                f"data_opts.cache_dir={cache_dir!r} was built for {key}={have.get(key)!r}, "
                f"this run has {key}={value!r}: use another cache_dir, or delete that one to rebuild it"
            )
    return index


class CachedPairStream(torch.utils.data.IterableDataset):
    """Endless per-rank stream over a latent cache; same sharding, shuffling and resume state
    as :class:`~diffalign.data.pickapic.PreferencePairStream`."""

    def __init__(self, cache_dir: str, index: dict, opts, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        from safetensors.torch import load_file

        super().__init__()
        self.dir, self.index, self.opts = Path(cache_dir), index, opts
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shards = [load_file(str(self.dir / f"shard-{i:05d}.safetensors")) for i in range(index["shards"])]
        self.conds = load_file(str(self.dir / "captions.safetensors"))
        fp = index["fingerprint"]
        self.reference = load_file(str(self.dir / "reference.safetensors")) if fp.get("cached_reference") else None
        self.row_seed_base = fp.get("seed")
        self._state: dict = {"epoch": 0, "pos": 0, "rng": None, "skipped": {}}
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict | None) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard, num_shards = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(self.seed * 7919 + shard)
        epoch, start = 0, 0
        first_skipped = dict(self.index["skipped"]) if shard == 0 else {}
        if self._resume:
            epoch, start = self._resume["epoch"], self._resume["pos"]
            if self._resume.get("rng") is not None:
                v, internal, gauss = self._resume["rng"]
                rng.setstate((v, tuple(internal), gauss))
            first_skipped, self._resume = {}, None
        # The uncached stream's order: a permutation of the source rows, unusable ones passed over.
        rows = self.index["rows"]
        cached_at = {r["source_row"]: i for i, r in enumerate(rows)}
        n = self.index.get("source_rows", len(rows))
        while True:
            order = np.random.default_rng(self.seed + epoch).permutation(n)[shard::num_shards]
            if not any(int(s) in cached_at for s in order):
                raise UserError(f"no cached pair in data shard {shard}/{num_shards} (the cache has {len(rows)} pairs)")
            for pos in range(start, len(order)):
                i = cached_at.get(int(order[pos]))
                if i is None:
                    continue
                example = self._example(rows[i], rng, i)
                example["skipped"], first_skipped = first_skipped, {}  # rows dropped at cache time, reported once
                self._state = {"epoch": epoch, "pos": pos + 1, "rng": list(rng.getstate()), "skipped": {}}
                yield example
            epoch, start = epoch + 1, 0

    def _example(self, row: dict, rng: random.Random, i: int = 0) -> dict:
        shard, off = self.shards[row["shard"]], row["offset"]
        caption_id = row["caption"]
        # the draws in the uncached stream's order: empty caption, then flip (PairTransform)
        if self.opts.empty_prompt_prob > 0 and rng.random() < self.opts.empty_prompt_prob:
            caption_id = 0
        flip = self.opts.random_flip and rng.random() < 0.5
        if self.reference is not None:
            flip = False  # the fixed draws (and stored reference losses) belong to the unflipped pair
        p = "flip_" if flip else ""
        extra = {}
        if self.reference is not None:
            extra = {"row_seed": torch.tensor(row_seed(self.row_seed_base, i)),
                     "ref_w": self.reference["ref_w"][i], "ref_l": self.reference["ref_l"][i]}
        return {
            **extra,
            "mean_w": shard[p + "mean_w"][off], "std_w": shard[p + "std_w"][off],
            "mean_l": shard[p + "mean_l"][off], "std_l": shard[p + "std_l"][off],
            "cond": {k: v[caption_id] for k, v in self.conds.items()},
            "caption": self.index["captions"][caption_id],
        }


def collate_cached(examples: list[dict]) -> CachedPairBatch:
    skipped: Counter = Counter()
    for e in examples:
        skipped.update(e.get("skipped", {}))
    optional = [k for k in ("row_seed", "ref_w", "ref_l") if k in examples[0]]
    return CachedPairBatch(
        **{k: torch.stack([e[k] for e in examples]) for k in ("mean_w", "std_w", "mean_l", "std_l", *optional)},
        cond={k: torch.stack([e["cond"][k] for e in examples]) for k in examples[0]["cond"]},
        captions=[e["caption"] for e in examples],
        skipped=dict(skipped),
    )


def cached_dataloader(cfg, adapter, accelerator, cache_dir: str | None = None):
    """Build the cache in ``cache_dir`` (default ``data_opts.cache_dir``) on first use (main
    process), then a loader over it on every rank. One line on the main process says which
    cache the run reads, and whether it was built now."""
    _check_cacheable(cfg)
    cache_dir = cache_dir or cfg.data_opts.cache_dir
    built = False
    if accelerator.is_main_process and check_cache(cfg, adapter, cache_dir=cache_dir) is None:
        adapter.restore_encoders()  # a trainer may have loaded the model without them, expecting a cache
        build_cache(cfg, adapter, cache_dir=cache_dir)
        built = True
    accelerator.wait_for_everyone()
    index = check_cache(cfg, adapter, announce=False, cache_dir=cache_dir)
    if index is None:
        raise UserError(f"data_opts.cache_dir={cache_dir!r}: the data or model changed while the cache "
                        "was being built; run again once they are final")
    if accelerator.is_main_process and not is_quiet():
        print(f"latent cache: {'built' if built else 'reading'} {cache_dir} ({len(index['rows'])} pairs; "
              "no VAE or text encoder held while training; data_opts.cache=false trains uncached)", file=sys.stderr)
    stream = CachedPairStream(cache_dir, index, cfg.data_opts, seed=cfg.seed,
                              rank=accelerator.process_index, world_size=accelerator.num_processes)
    return torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate_cached, num_workers=0)
