"""The pair trainer's default path: the latent cache on by default, same numbers as uncached,
the VAE and text encoders freed while training from it."""

import json
from pathlib import Path

import pytest

from diffalign.config import load_config
from diffalign.trainers import train
from diffalign.trainers.pair import PairRecipe

ROOT = Path(__file__).resolve().parents[1]


def _cfg(method, model, data, out, *extra):
    return load_config(ROOT / f"diffalign/configs/tiny/{method}.yaml",
                       [f"model={model}", f"data={data}", f"output_dir={out}", "max_steps=3", "batch_size=4", *extra])


def _losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "mapo"])
def test_default_cache_trains_the_same_numbers_as_uncached(tiny_model, toy_pairs, tmp_path, latent_cache_root, method):
    # toy_pairs has ties (skipped rows) and random_flip is on: the cached stream must visit the
    # same pairs with the same flips as the pixel stream, and sample the same latents
    model = tiny_model("sd15")
    before = set(latent_cache_root.iterdir())
    train(_cfg(method, model, toy_pairs, tmp_path / "cached"))
    built = set(latent_cache_root.iterdir()) - before
    assert len(built) <= 1 and (built or any((d / "index.json").is_file() for d in before))
    train(_cfg(method, model, toy_pairs, tmp_path / "uncached", "data_opts.cache=false"))
    assert len(set(latent_cache_root.iterdir()) - before) <= 1  # the uncached run wrote no cache
    cached, uncached = _losses(tmp_path / "cached"), _losses(tmp_path / "uncached")
    assert len(cached) == 3
    assert cached == pytest.approx(uncached, rel=1e-4)


def test_encoders_are_freed_when_training_from_the_cache(tiny_model, toy_pairs, tmp_path):
    model = tiny_model("sd15")
    recipe = PairRecipe(_cfg("dpo", model, toy_pairs, tmp_path / "c")).setup()
    a = recipe.adapter
    assert a.encoders_released and a.pipe.vae is None and a.pipe.text_encoder is None
    assert all(p.requires_grad for p in recipe.params)  # what the optimizer holds: LoRA only
    assert sum(p.numel() for p in recipe.params) < sum(p.numel() for p in a.denoiser.parameters()) / 2
    with pytest.raises(RuntimeError, match="released"):
        a.encode_images(None)
    result = recipe.train()
    assert result["final"]["step"] == 3 and a.pipe.vae is None  # trained without them
    uncached = PairRecipe(_cfg("dpo", model, toy_pairs, tmp_path / "u", "data_opts.cache=false")).setup()
    assert not uncached.adapter.encoders_released and uncached.adapter.pipe.vae is not None


def test_cache_off_wins_and_the_cached_reference_estimator_needs_the_cache(tmp_path):
    from diffalign.data.cache import cache_applies
    from diffalign.errors import ConfigError

    on = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=M", "data=D", f"data_opts.cache_dir={tmp_path}"])
    off = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=M", "data=D", f"data_opts.cache_dir={tmp_path}",
                                                                  "data_opts.cache=false"])
    assert cache_applies(on) == (True, "") and cache_applies(off) == (False, "data_opts.cache=false")
    crop = load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=M", "data=D", "data_opts.random_crop=true"])
    assert not cache_applies(crop)[0]  # the default cache steps aside; an explicit cache_dir would refuse
    with pytest.raises(ConfigError, match="cached_reference"):
        load_config(ROOT / "diffalign/configs/tiny/dpo.yaml", ["model=M", "data=D", f"data_opts.cache_dir={tmp_path}",
                                                               "loss.cached_reference=true", "data_opts.cache=false"])
