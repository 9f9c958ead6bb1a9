"""Latent + text cache: same loss as the uncached path for the same timestep and noise."""

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.data.cache import CachedPairStream, build_cache, check_cache, collate_cached
from diffalign.data.pickapic import PairTransform, classify_row, collate_pairs, decode_image, load_preference_dataset
from diffalign.errors import UserError
from diffalign.models import load_adapter
from diffalign.trainers import train
from diffalign.trainers.pair import pair_forward, pair_loss

ROOT = Path(__file__).resolve().parents[1]


def _cfg(model, data, tmp_path, *extra):
    return load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", [f"model={model}", f"data={data}", f"output_dir={tmp_path / 'run'}",
                       f"data_opts.cache_dir={tmp_path / 'cache'}", "data_opts.random_flip=true", *extra])


@pytest.mark.parametrize("kind", ["sd15", "sd3", "flux", "flux2", "qwenimage"])
def test_cached_and_uncached_losses_match(tiny_model, toy_pairs, tmp_path, kind):
    cfg = _cfg(tiny_model(kind), toy_pairs, tmp_path)
    adapter = load_adapter(cfg.model, cfg.model_opts)
    adapter.add_lora(cfg.lora)  # the reference forward switches the LoRA off
    build_cache(cfg, adapter, batch_size=5, shard_rows=7)  # several shards and partial batches
    index = check_cache(cfg, adapter)
    stream = CachedPairStream(cfg.data_opts.cache_dir, index, cfg.data_opts)
    ds = load_preference_dataset(cfg.data, cfg.data_opts)
    rows = index["rows"][:4] + index["rows"][-2:]
    cached = collate_cached([stream._example(r, __import__("random").Random(1)) for r in rows])
    # the same pairs through the pixel path, with the same flips
    transform = PairTransform(cfg.data_opts.resolution, False, False)
    examples = []
    for r, flipped in zip(rows, [cfg.data_opts.random_flip and __import__("random").Random(1).random() < 0.5] * len(rows)):
        row = ds[r["source_row"]]
        _, swap = classify_row(row, cfg.data_opts)
        a, b = decode_image(row["jpg_0"]), decode_image(row["jpg_1"])
        w, l = transform(*((b, a) if swap else (a, b)), __import__("random").Random(0))
        if flipped:
            w, l = w.flip(-1), l.flip(-1)
        examples.append({"pixels_w": w, "pixels_l": l, "caption": index["captions"][r["caption"]]})
    uncached = collate_pairs(examples)
    assert cached.captions == uncached.captions
    results = []
    for batch in (uncached, cached):
        torch.manual_seed(0)  # the posterior sample draws from the global RNG in both paths
        g = torch.Generator().manual_seed(1)
        mse_w, mse_l, ref_w, ref_l = pair_forward(adapter, adapter.denoiser, None, batch, g, "dpo", cfg)
        results.append(pair_loss(cfg, mse_w, mse_l, ref_w, ref_l)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_training_from_cache_and_fingerprint_check(tiny_model, toy_pairs, tmp_path):
    cfg = _cfg(tiny_model("sd15"), toy_pairs, tmp_path, "max_steps=2", "batch_size=4")
    train(cfg)  # builds the cache on first use
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    n_ties = index["skipped"].get("tie", 0)
    assert len(index["rows"]) + n_ties == 48 and n_ties > 0
    assert len(index["captions"]) < len(index["rows"])  # captions deduplicated
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_rows"] == n_ties  # rows dropped at cache time are still reported
    other = _cfg(tiny_model("sd15"), toy_pairs, tmp_path, "data_opts.resolution=16")
    with pytest.raises(UserError, match="resolution"):
        check_cache(other, load_adapter(other.model))
    with pytest.raises(UserError, match="random_crop"):
        train(_cfg(tiny_model("sd15"), toy_pairs, tmp_path, "data_opts.random_crop=true"))


def test_cached_reference_losses_equal_a_fresh_reference_pass(tiny_model, toy_pairs, tmp_path):
    from diffalign.data.cache import fixed_pair_draws
    from diffalign.trainers.pair import reference_mse
    from diffalign.models import cat_cond

    cfg = _cfg(tiny_model("sd15"), toy_pairs, tmp_path, "loss.cached_reference=true", "max_steps=3", "batch_size=4")
    train(cfg)  # builds cache + reference losses, trains without reference forwards
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    adapter = load_adapter(cfg.model, cfg.model_opts)
    adapter.add_lora(cfg.lora)
    index = check_cache(cfg, adapter)
    stream = CachedPairStream(cfg.data_opts.cache_dir, index, cfg.data_opts)
    batch = collate_cached([stream._example(index["rows"][i], __import__("random").Random(0), i) for i in (0, 5, 9)])
    latents, noise, t = fixed_pair_draws(adapter, batch)
    again = fixed_pair_draws(adapter, batch)
    torch.testing.assert_close(latents, again[0])  # the draws are a function of the pair alone
    x_t, target = adapter.noisy_input_and_target(latents, noise, t)
    ref = reference_mse(adapter, None, x_t, t, cat_cond(batch.cond, batch.cond), target)
    torch.testing.assert_close(ref, torch.cat([batch.ref_w, batch.ref_l]), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="cache_dir"):
        load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=M", "data=D", "loss.cached_reference=true"])


def test_concurrent_builds_of_one_cache_never_disturb_a_reader(tiny_model, toy_pairs, tmp_path, monkeypatch):
    """Runs that build the same cache at once (the testbed job trains several methods on one pair
    set in parallel) build privately and publish complete files; a reader of the first cache keeps
    reading it while a second build of the same contents runs and finishes."""
    import diffalign.data.cache as cache_mod

    cfg = _cfg(tiny_model("sd15"), toy_pairs, tmp_path)
    adapter = load_adapter(cfg.model, cfg.model_opts)
    out = Path(cfg.data_opts.cache_dir)
    build_cache(cfg, adapter, batch_size=5, shard_rows=7)
    index = check_cache(cfg, adapter)
    inodes = {f.name: f.stat().st_ino for f in out.iterdir()}
    # a second build of the same contents, checked while it is half-way (after its first shard)
    real_save, seen = cache_mod._write_cache, []

    def spying_write(*args, **kwargs):
        real_save(*args, **kwargs)
        seen.append({f.name: f.stat().st_ino for f in out.iterdir()})

    monkeypatch.setattr(cache_mod, "_write_cache", spying_write)
    build_cache(cfg, adapter, batch_size=5, shard_rows=7)
    assert seen == [inodes]  # the building run never touched the published cache
    assert {f.name: f.stat().st_ino for f in out.iterdir()} == inodes  # same contents: the first stays
    stream = CachedPairStream(str(out), index, cfg.data_opts)
    assert len(stream.shards) == index["shards"] > 1
    assert [p.name for p in out.parent.iterdir() if ".build-" in p.name] == []  # no staging left
    # a build that dies leaves the published cache complete and no staging directory
    monkeypatch.setattr(cache_mod, "_write_cache", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        build_cache(cfg, adapter, batch_size=5, shard_rows=7)
    assert check_cache(cfg, adapter) == index
    assert [p.name for p in out.parent.iterdir() if ".build-" in p.name] == []
    # a rebuild with other shard sizes (a stale cache's case) replaces every file
    monkeypatch.setattr(cache_mod, "_write_cache", real_save)
    (out / "index.json").write_text(json.dumps({**index, "fingerprint": {**index["fingerprint"], "data_content": "old"}}))
    build_cache(cfg, adapter, batch_size=5, shard_rows=1000)
    new = check_cache(cfg, adapter)
    assert new["shards"] == 1 and sorted(f.name for f in out.glob("shard-*")) == ["shard-r0-00000.safetensors"]
    assert sorted(f.name for f in out.glob("captions*")) == ["captions-r0-00000.safetensors"]  # old caption shards gone too
