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

On disk, next to nothing else: ``cache_dir/index.json`` (fingerprint, row map, shard lists, skip
counts), the latent moments in ``shard-r<P>-<K>.safetensors`` and the prompt embeddings in
``captions-r<P>-<K>.safetensors`` (each file at most ``shard_rows`` rows; ``P`` is the building
process that wrote it). Moments and embeddings are stored in ``data_opts.cache_dtype`` (float32 by
default; bfloat16 halves a cache for bf16 runs); the dtype is part of the fingerprint. The
fingerprint keys on *contents*, not path strings: each data file's size, mtime and a sampled hash,
the model dir's config files (hashed) and weight files (size, mtime, sampled hash), or the hub
revision for hub ids. A cache whose data or model contents changed is stale and rebuilt with a
one-line message; a cache built with other settings (resolution, caption column, cache dtype, ...)
is refused with the differing key named. Random crops are not cacheable (each epoch would need new
crops): the cache requires ``random_crop: false``.

Building is shared by the processes of a run (:func:`build_cache` with an ``accelerator``): process
``P`` of ``N`` encodes the source rows ``i % N == P`` into its own shards, then an equal share of
the unique captions, and the main process writes ``index.json``; no process waits hours at a
barrier while another encodes everything. When the cache directory is node-local (the processes
of another node do not see the main process's files there), each node builds its own copy and the
node's local main process writes its index.

Reading: every rank's stream visits every pair over the epochs (each epoch permutes all rows
before sharding them over ranks, as the uncached stream does), so no rank can skip a shard; files
are instead opened lazily and memory-mapped, and a rank reads only the rows it draws. With
``data_opts.per_sample_draws`` the epoch's *cached* pairs are dealt round-robin over the
concatenated epochs (:func:`~diffalign.data.pickapic.dealt`), so the ranks' k-th batches together
are the k-th batch of a one-process run with the ranks' total batch size.
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
from .pickapic import PairTransform, classify_row, dealt, decode_image, load_preference_dataset, sample_seed, sample_seeds

CACHE_VERSION = 4  # 2: data and model keyed by content; 3: source row count (the uncached stream's order);
# 4: shards per building process, caption embeddings in shards, data_opts.cache_dtype

# data_opts.cache_dtype: the dtype of the stored moments and embeddings
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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
        "cache_dtype": o.cache_dtype,
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
    mean, std = batch.moments(adapter)
    return keyed_pair_draws(adapter, batch.row_seed.tolist(), mean, std)


def keyed_pair_draws(adapter, seeds: list[int], mean: torch.Tensor, std: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [2B], noise [2B], timesteps [2B]) with every draw of pair ``i`` from
    ``Generator(seeds[i])``, in this order: its timestep, the chosen and the rejected posterior
    samples, its noise; chosen and rejected share the noise and timestep. ``mean`` / ``std``: the
    posterior of the chosen then the rejected images ([2B]), or of one image both sides share
    ([B]: its one sample on both sides). The cached-reference estimator's fixed draws
    (:func:`fixed_pair_draws`) and ``data_opts.per_sample_draws`` (seeds from
    :func:`~diffalign.data.pickapic.sample_seed`) both draw so."""
    n = len(seeds)
    paired = mean.shape[0] == 2 * n
    means, noises, ts = [], [], []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        t = adapter.sample_timesteps(1, generator=g)
        shape = mean[i].shape
        eps_w, eps_l, noise = (torch.randn(shape, generator=g).to(mean.device) for _ in range(3))
        m_w = mean[i] + std[i] * eps_w
        means.append((m_w, mean[n + i] + std[n + i] * eps_l if paired else m_w))
        noises.append(noise)
        ts.append(t)
    samples = torch.stack([m[0] for m in means] + [m[1] for m in means])
    latents = adapter.scale_latents(samples)
    noise = torch.stack(noises).to(latents.device)
    t = torch.cat(ts).to(latents.device)
    return latents, torch.cat([noise, noise]), torch.cat([t, t])


def keyed_image_draws(adapter, seeds: list[int], mean: torch.Tensor, std: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [M], noise [M], timesteps [M]) of single images (unpaired batches): image ``i``'s
    timestep, posterior sample and noise from ``Generator(seeds[i])``, in that order."""
    samples, noises, ts = [], [], []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        ts.append(adapter.sample_timesteps(1, generator=g))
        eps, noise = (torch.randn(mean[i].shape, generator=g).to(mean.device) for _ in range(2))
        samples.append(mean[i] + std[i] * eps)
        noises.append(noise)
    latents = adapter.scale_latents(torch.stack(samples))
    return latents, torch.stack(noises).to(latents.device), torch.cat(ts).to(latents.device)


@torch.no_grad()
def compute_reference_losses(cfg, adapter, reader: "CacheReader", index: dict, rows: list[int],
                             batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The reference's per-pair MSEs at each pair's fixed draws (:func:`fixed_pair_draws`) for the
    pairs ``rows`` (positions in ``index["rows"]``): ``{"row", "ref_w", "ref_l"}``. The reference
    is the network as loaded: adapters disabled when LoRA is already attached."""
    ref_w, ref_l = [torch.zeros(0)], [torch.zeros(0)]
    has_lora = getattr(adapter.denoiser, "_hf_peft_config_loaded", False)
    for start in progress(range(0, len(rows), batch_size), desc="cache reference losses"):
        chunk = rows[start:start + batch_size]
        entries = [index["rows"][j] for j in chunk]
        moments = [reader.moments(r) for r in entries]
        conds = [reader.cond(r["caption"]) for r in entries]
        cond = {k: torch.stack([c[k] for c in conds]).to(adapter.device) for k in conds[0]}
        batch = CachedPairBatch(**{k: torch.stack([m[k] for m in moments]) for k in MOMENTS}, cond=cond,
                                captions=[index["captions"][r["caption"]] for r in entries],
                                row_seed=torch.tensor([row_seed(cfg.seed, j) for j in chunk]))
        latents, noise, t = fixed_pair_draws(adapter, batch)
        x_t, target = adapter.noisy_input_and_target(latents, noise, t)
        cond2 = cat_cond(cond, cond)
        if has_lora:
            with adapter.adapters_disabled():
                pred = adapter.predict(x_t, t, cond2)
        else:
            pred = adapter.predict(x_t, t, cond2)
        w, l = per_sample_mse(pred, target).chunk(2)
        ref_w.append(w.float().cpu())
        ref_l.append(l.float().cpu())
    return {"row": torch.tensor(rows, dtype=torch.long), "ref_w": torch.cat(ref_w), "ref_l": torch.cat(ref_l)}


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


def encoder_dtypes(cfg, vae_cfg) -> tuple[torch.dtype, torch.dtype]:
    """(text encoders, VAE) dtypes of a cache build. The text encoders run in the run's weight
    dtype (``mixed_precision`` bf16/fp16, as training runs its frozen parts); the VAE in fp32
    unless its config says ``force_upcast: false``: diffusers' flag of a VAE that is not safe in
    half precision (SDXL's overflows in fp16 and says true; a fixed one such as
    madebyollin/sdxl-vae-fp16-fix, given as ``model_opts.vae``, says false and then runs in the
    weight dtype). A VAE is a small part of a model's weights, so fp32 costs little."""
    weight = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    upcast = vae_cfg.get("force_upcast", True) if hasattr(vae_cfg, "get") else getattr(vae_cfg, "force_upcast", True)
    return weight, (torch.float32 if upcast else weight)


def load_cache_encoders(cfg, device: str | torch.device = "cpu"):
    """The adapter a cache build of ``cfg`` runs: the VAE and text encoders in
    :func:`encoder_dtypes`, never the whole pipeline in fp32 (FLUX.1: ~67 GB). The denoiser is
    loaded only for ``loss.cached_reference`` (its reference losses go into the cache), in the
    weight dtype, as the trainer's reference runs."""
    from ..models import load_encoders, vae_config

    text, vae = encoder_dtypes(cfg, vae_config(cfg.model, cfg.model_opts))
    return load_encoders(cfg.model, cfg.model_opts, dtype=text, vae_dtype=vae, device=device, denoiser=_cached_reference(cfg))


def build_group(seen: list[tuple[str, int, bool]], rank: int) -> tuple[list[int], int]:
    """(members, leader) of the build group of process ``rank``, from every process's
    ``(host name, local process index, whether it saw the main process's probe file)``.

    All saw it: the cache directory is shared, and every process builds its part of one cache,
    the main process (0) leading. Otherwise it is node-local: each host's processes build that
    host's copy, led by its local main process (local index 0), which writes the index there."""
    if all(saw for _, _, saw in seen):
        return list(range(len(seen))), 0
    host = seen[rank][0]
    members = [r for r, (h, _, _) in enumerate(seen) if h == host]
    return members, next((r for r in members if seen[r][1] == 0), members[0])


class BuildGroup:
    """The processes that build one cache directory together, and this process's place among
    them (:func:`build_group`). Without an accelerator, or with one process, it is this process
    alone. Every method is called by every process of the run, in the same order (the barriers
    and gathers are collective)."""

    def __init__(self, accelerator=None, out: Path | None = None) -> None:
        self.accelerator = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        self.size, self.position, self.is_leader, self.tag = 1, 0, True, None
        if self.accelerator is None:
            return
        import socket

        from accelerate.utils import broadcast_object_list, gather_object

        acc = self.accelerator
        nonce = broadcast_object_list([os.urandom(6).hex()])[0]  # process 0's: one name everywhere
        probe = out.parent / f".{out.name}.probe-{nonce}"
        if acc.is_main_process:
            probe.touch()
        acc.wait_for_everyone()
        seen = gather_object([(socket.gethostname(), acc.local_process_index, probe.exists())])
        acc.wait_for_everyone()
        if acc.is_main_process:
            probe.unlink(missing_ok=True)
        members, leader = build_group(seen, acc.process_index)
        self.size, self.position = len(members), members.index(acc.process_index)
        self.is_leader = acc.process_index == leader
        self.tag = f"{nonce}-{leader}"  # node-local groups that share a disk after all never share a staging dir

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def work_dir(self, out: Path) -> Path:
        """The private staging directory beside ``out`` (one name for the whole group)."""
        if self.tag is None:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        work = out.parent / f".{out.name}.build-{self.tag}"
        work.mkdir(exist_ok=True)
        return work


@torch.no_grad()
def build_cache(cfg, adapter, batch_size: int = 16, shard_rows: int = 4096, cache_dir: str | None = None,
                accelerator=None) -> Path:
    """Encode every usable pair of ``cfg.data`` once into ``cache_dir`` (default
    ``data_opts.cache_dir``); returns the cache dir. With an ``accelerator`` of several
    processes, every process calls this and encodes its share (:class:`BuildGroup`)."""
    _check_cacheable(cfg)
    out = Path(cache_dir or cfg.data_opts.cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    group = BuildGroup(accelerator, out)
    # build in a private directory beside the cache and publish when complete: two runs that
    # build the same cache at once (the testbed job trains several methods on one pair set in
    # parallel) must never see each other's half-written or deleted files
    work = group.work_dir(out)
    try:
        _write_cache(cfg, adapter, work, batch_size, shard_rows, group)
        group.barrier()  # every member is done reading the staging files
        if group.is_leader:
            _publish_cache(work, out)
    finally:
        if group.is_leader:
            shutil.rmtree(work, ignore_errors=True)
    group.barrier()  # published before any member reads it
    return out


def _publish_cache(work: Path, out: Path) -> None:
    """Move a complete cache from ``work`` into ``out`` file by file (each an atomic rename),
    ``index.json`` last; the old index goes first, so a cache is never complete-looking with a
    mix of files (old shards beyond the new count are removed). When another run has meanwhile
    published a cache of the same fingerprint, that one stays untouched (it may be being read).
    Subdirectories of ``work`` (the members' bookkeeping) are not published."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        if json.loads((out / "index.json").read_text())["fingerprint"] == json.loads((work / "index.json").read_text())["fingerprint"]:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    (out / "index.json").unlink(missing_ok=True)
    new = {f.name for f in work.iterdir() if f.is_file()}
    for old in [*out.glob("shard-*.safetensors"), *out.glob("captions*.safetensors"), out / "reference.safetensors"]:
        if old.name not in new:
            old.unlink(missing_ok=True)
    for name in sorted(new - {"index.json"}):
        os.replace(work / name, out / name)
    os.replace(work / "index.json", out / "index.json")


MOMENTS = ("mean_w", "std_w", "mean_l", "std_l")
_SHARD_BYTES = 1 << 30  # a file's rows are held in RAM until written: ~1 GiB, whatever shard_rows says


class _ShardWriter:
    """Rows (dicts of batch-first tensors) into ``<prefix>-00000.safetensors``, ... of at most
    ``max_rows`` rows and about :data:`_SHARD_BYTES` each: one file's rows in RAM at a time (a
    FLUX.1 caption embedding is 4 MiB in bf16, a 1024 px pair with flips 8 MiB in fp32)."""

    def __init__(self, out: Path, prefix: str, max_rows: int) -> None:
        self.out, self.prefix, self.max_rows = out, prefix, max(1, max_rows)
        self.files: list[str] = []
        self.counts: list[int] = []
        self.held: dict[str, list[torch.Tensor]] = {}
        self.rows = 0
        self.row_bytes = 0

    def room(self) -> int:
        """Rows the current file still takes."""
        limit = self.max_rows if not self.row_bytes else max(1, min(self.max_rows, _SHARD_BYTES // self.row_bytes))
        return max(0, limit - self.rows)

    def add(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Append rows (no more than :meth:`room`); returns (file number, offset of the first)."""
        n = len(next(iter(tensors.values())))
        at = (len(self.files), self.rows)
        for k, v in tensors.items():
            self.held.setdefault(k, []).append(v)
        self.rows += n
        self.row_bytes = max(self.row_bytes, sum(v[0].numel() * v.element_size() for v in tensors.values()))
        if self.room() == 0:
            self.flush()
        return at

    def add_all(self, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """Append rows across as many files as they fill; (file number, offset) of each row."""
        n, done, where = len(next(iter(tensors.values()))), 0, []
        while done < n:
            k = min(self.room() or 1, n - done)
            f, off = self.add({name: v[done:done + k] for name, v in tensors.items()})
            where += [(f, off + j) for j in range(k)]
            done += k
        return where

    def flush(self) -> None:
        if not self.rows:
            return
        from ..files import save_safetensors

        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_safetensors({k: torch.cat(v).contiguous() for k, v in self.held.items()}, self.out / name)
        self.files.append(name)
        self.counts.append(self.rows)
        self.held, self.rows = {}, 0


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the cache stores it: floating point in the cache dtype (masks keep theirs)."""
    return t.to("cpu", dtype) if t.is_floating_point() else t.cpu()


def _encode_pairs(cfg, adapter, out: Path, batch_size: int, shard_rows: int, group: BuildGroup, dtype: torch.dtype) -> dict:
    """Encode this process's share of the source rows (``i % group.size == group.position``) into
    its own shards ``shard-r<P>-<K>``; returns its part of the index (rows with caption texts)."""
    opts = cfg.data_opts
    dataset = load_preference_dataset(cfg.data, opts)
    n_rows = len(dataset) if opts.max_samples is None else min(opts.max_samples, len(dataset))
    transform = PairTransform(opts.resolution, random_crop=False, random_flip=False)
    me, size = group.position, group.size
    writer = _ShardWriter(out, f"shard-r{me}", shard_rows)
    skipped: Counter = Counter()
    rows: list[dict] = []
    pending: list[tuple] = []  # (px_w, px_l, source row, caption) waiting for a VAE batch

    def encode_pending():
        if not pending:
            return
        px_w = torch.stack([p[0] for p in pending])
        px_l = torch.stack([p[1] for p in pending])
        views = {"": (px_w, px_l)}
        if opts.random_flip:
            views["flip_"] = (px_w.flip(-1), px_l.flip(-1))
        tensors = {}
        for prefix, (w, l) in views.items():
            mean, std = adapter.encode_moments(torch.cat([w, l]))
            n = w.shape[0]
            for name, t in ((f"{prefix}mean_w", mean[:n]), (f"{prefix}mean_l", mean[n:]),
                            (f"{prefix}std_w", std[:n]), (f"{prefix}std_l", std[n:])):
                tensors[name] = _stored(t, dtype)
        for (_, _, i, caption), (f, off) in zip(pending, writer.add_all(tensors)):
            rows.append({"source_row": i, "caption": caption, "shard": f, "offset": off})
        pending.clear()

    mine = dataset.select(range(me, n_rows, size))
    desc = "cache latents" if size == 1 else f"cache latents (process {me + 1}/{size})"
    for j, row in enumerate(progress(mine, total=len(mine), desc=desc)):
        i = me + j * size
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
        pending.append((px_w, px_l, i, caption))
        if len(pending) >= batch_size:
            encode_pending()
    encode_pending()
    writer.flush()
    return {"rows": rows, "skipped": dict(skipped), "shard_files": writer.files, "source_rows": n_rows}


def _merge_parts(parts: list[dict]) -> tuple[list[dict], list[str], dict, list[str]]:
    """(rows in source order with caption ids and global shard numbers, shard files, skip counts,
    unique captions): the same rows and caption ids as one process building alone."""
    shard_files: list[str] = []
    rows: list[dict] = []
    skipped: Counter = Counter()
    for part in parts:
        rows += [{**r, "shard": r["shard"] + len(shard_files)} for r in part["rows"]]
        shard_files += part["shard_files"]
        skipped.update(part["skipped"])
    rows.sort(key=lambda r: r["source_row"])
    captions: dict[str, int] = {"": 0}  # the empty caption of data_opts.empty_prompt_prob
    for r in rows:
        r["caption"] = captions.setdefault(r["caption"], len(captions))
    return rows, shard_files, dict(skipped), sorted(captions, key=captions.get)


def _encode_captions(adapter, captions: list[str], out: Path, batch_size: int, shard_rows: int, group: BuildGroup,
                     dtype: torch.dtype) -> dict:
    """Encode this process's block of the unique captions (contiguous ids, so files in process
    order hold ids in order) into ``captions-r<P>-<K>``, one file in RAM at a time."""
    per = -(-len(captions) // group.size)
    lo, hi = min(len(captions), group.position * per), min(len(captions), (group.position + 1) * per)
    writer = _ShardWriter(out, f"captions-r{group.position}", shard_rows)
    start = lo
    with progress(total=hi - lo, desc="cache text") as bar:
        while start < hi:
            chunk = captions[start:min(hi, start + min(batch_size, writer.room() or 1))]
            writer.add({k: _stored(v, dtype) for k, v in adapter.encode_prompt(chunk).items()})
            start += len(chunk)
            bar.update(len(chunk))
    writer.flush()
    return {"caption_files": writer.files, "caption_rows": writer.counts}


def _write_cache(cfg, adapter, out: Path, batch_size: int, shard_rows: int, group: BuildGroup | None = None) -> None:
    """The cache files of :func:`build_cache`, into the empty directory ``out``; every member of
    ``group`` calls it (the members meet at barriers between the phases)."""
    from ..files import save_safetensors as save_file

    group = group or BuildGroup()
    me = group.position
    fingerprint = cache_fingerprint(cfg, adapter)  # of the inputs as they are read now
    dtype = CACHE_DTYPES[cfg.data_opts.cache_dtype]
    parts = out / "parts"  # the members' bookkeeping; not published
    parts.mkdir(exist_ok=True)
    # 1. latents: this member's rows into its shards
    (parts / f"pairs-r{me}.json").write_text(json.dumps(_encode_pairs(cfg, adapter, out, batch_size, shard_rows, group, dtype)))
    group.barrier()
    pair_parts = [json.loads((parts / f"pairs-r{p}.json").read_text()) for p in range(group.size)]
    rows, shard_files, skipped, captions = _merge_parts(pair_parts)
    if not rows:
        raise UserError(f"data={cfg.data!r}: no usable pair to cache (skipped: {skipped})")
    # 2. text: this member's block of the unique captions
    (parts / f"captions-r{me}.json").write_text(json.dumps(_encode_captions(adapter, captions, out, batch_size, shard_rows,
                                                                             group, dtype)))
    group.barrier()
    caption_parts = [json.loads((parts / f"captions-r{p}.json").read_text()) for p in range(group.size)]
    index = {"fingerprint": fingerprint, "rows": rows, "captions": captions, "skipped": skipped,
             "shards": len(shard_files), "shard_files": shard_files,
             "caption_files": [f for c in caption_parts for f in c["caption_files"]],
             "caption_rows": [n for c in caption_parts for n in c["caption_rows"]],
             "source_rows": pair_parts[0]["source_rows"], "built_by": group.size}
    # 3. cached_reference: the reference losses of this member's share of the pairs
    if _cached_reference(cfg):
        mine = list(range(me, len(rows), group.size))
        save_file(compute_reference_losses(cfg, adapter, CacheReader(out, index), index, mine, batch_size),
                  parts / f"reference-r{me}.safetensors")
        group.barrier()
        if group.is_leader:
            from safetensors.torch import load_file

            ref = {"ref_w": torch.zeros(len(rows)), "ref_l": torch.zeros(len(rows))}
            for p in range(group.size):
                got = load_file(str(parts / f"reference-r{p}.safetensors"))
                for k in ref:
                    ref[k][got["row"]] = got[k]
            save_file(ref, out / "reference.safetensors")
    if group.is_leader:
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


class _RowFile:
    """One safetensors file of a cache, opened on first use and memory-mapped: a row read copies
    that row alone, so a rank holds no whole shard (before, every rank loaded every file)."""

    def __init__(self, path: Path) -> None:
        self.path, self._file, self._keys = path, None, None

    def __getstate__(self) -> dict:  # a DataLoader worker started by spawn opens the file itself
        return {"path": self.path, "_file": None, "_keys": None}

    def _open(self):
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="pt")
            self._keys = list(self._file.keys())
        return self._file

    def keys(self) -> list[str]:
        self._open()
        return self._keys

    def row(self, name: str, i: int) -> torch.Tensor:
        return self._open().get_slice(name)[i]


class CacheReader:
    """A cache directory's rows by index: a pair's latent moments, a caption's conditioning."""

    def __init__(self, cache_dir: str | Path, index: dict) -> None:
        d = Path(cache_dir)
        self.shards = [_RowFile(d / name) for name in index["shard_files"]]
        self.captions = [_RowFile(d / name) for name in index["caption_files"]]
        self._first_id = np.cumsum([0, *index["caption_rows"]])  # first caption id of each file

    def moments(self, row: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        """``mean_w``, ``std_w``, ``mean_l``, ``std_l`` of ``row`` (an ``index["rows"]`` entry); ``prefix="flip_"``: of its flipped view."""
        shard = self.shards[row["shard"]]
        return {k: shard.row(prefix + k, row["offset"]) for k in MOMENTS}

    def cond(self, caption_id: int) -> dict[str, torch.Tensor]:
        f = int(np.searchsorted(self._first_id, caption_id, side="right")) - 1
        file = self.captions[f]
        return {k: file.row(k, caption_id - int(self._first_id[f])) for k in file.keys()}


class CachedPairStream(torch.utils.data.IterableDataset):
    """Endless per-rank stream over a latent cache; same sharding, shuffling and resume state
    as :class:`~diffalign.data.pickapic.PreferencePairStream`. Rows are read from the files as
    they are drawn (:class:`CacheReader`)."""

    def __init__(self, cache_dir: str, index: dict, opts, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        from safetensors.torch import load_file

        super().__init__()
        self.dir, self.index, self.opts = Path(cache_dir), index, opts
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.reader = CacheReader(cache_dir, index)
        self.shards = self.reader.shards
        fp = index["fingerprint"]
        # two floats a pair: loaded whole
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
        keyed = bool(getattr(self.opts, "per_sample_draws", False))
        while True:
            order = np.random.default_rng(self.seed + epoch).permutation(n)
            if keyed:
                # the usable pairs of the epoch, then dealt: a process gets every num_shards-th
                # *cached* pair, so the processes' batches together are the one-process batches
                order = dealt(np.asarray([s for s in order if int(s) in cached_at]), epoch, len(rows), shard, num_shards)
            else:
                order = order[shard::num_shards]
            if not any(int(s) in cached_at for s in order):
                raise UserError(f"no cached pair in data shard {shard}/{num_shards} (the cache has {len(rows)} pairs)")
            for pos in range(start, len(order)):
                i = cached_at.get(int(order[pos]))
                if i is None:
                    continue
                seed = sample_seed(self.seed, epoch, int(order[pos])) if keyed else None
                example = self._example(rows[i], rng if seed is None else random.Random(seed), i)
                if seed is not None:
                    example["sample_seed"] = seed
                example["skipped"], first_skipped = first_skipped, {}  # rows dropped at cache time, reported once
                self._state = {"epoch": epoch, "pos": pos + 1, "rng": list(rng.getstate()), "skipped": {}}
                yield example
            epoch, start = epoch + 1, 0

    def _example(self, row: dict, rng: random.Random, i: int = 0) -> dict:
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
            **extra, **self.reader.moments(row, p),
            "cond": self.reader.cond(caption_id),
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
        sample_seed=sample_seeds(examples),
    )


def cached_dataloader(cfg, adapter, accelerator, cache_dir: str | None = None):
    """Build the cache in ``cache_dir`` (default ``data_opts.cache_dir``) on first use, every
    process encoding its share (:func:`build_cache`), then a loader over it on every rank. One
    line on the main process says which cache the run reads, and whether it was built now."""
    _check_cacheable(cfg)
    cache_dir = cache_dir or cfg.data_opts.cache_dir
    missing = check_cache(cfg, adapter, announce=accelerator.is_main_process, cache_dir=cache_dir) is None
    if accelerator.num_processes > 1:  # one decision for all: a build takes every process
        from accelerate.utils import gather_object

        missing = any(gather_object([missing]))
    if missing:
        # a trainer may have loaded the model without them, expecting a cache; they come back in
        # the dtypes `diffalign cache` uses, so both build the same cache
        adapter.restore_encoders(*encoder_dtypes(cfg, adapter.vae_config))
        build_cache(cfg, adapter, cache_dir=cache_dir, accelerator=accelerator)
    built = missing
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
