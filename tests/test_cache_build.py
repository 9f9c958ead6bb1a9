"""Building the latent cache on a real GPU run (issue #30 items 3 and 6): only the VAE and text
encoders are loaded, in the run's dtypes; the cache can be stored in bf16; every process of a
multi-process run encodes its own share of the rows."""

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from diffalign.config import load_config
from diffalign.data.cache import (
    CacheReader, build_cache, build_group, check_cache, load_cache_encoders, resolve_cache_dir,
)
from diffalign.errors import UserError
from diffalign.trainers import train

ROOT = Path(__file__).resolve().parents[1]
TINY_DPO = ROOT / "diffalign/configs/tiny/dpo.yaml"


def _cfg(model, data, tmp_path, *extra, cache="cache"):
    return load_config(TINY_DPO, [f"model={model}", f"data={data}", f"output_dir={tmp_path / 'run'}",
                                  f"data_opts.cache_dir={tmp_path / cache}", *extra])


def _stored_dtypes(cache_dir: Path) -> dict[str, set]:
    """The dtypes of the floating-point tensors in each kind of cache file."""
    out: dict[str, set] = {}
    for f in cache_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            kind = f.name.split("-")[0]
            out.setdefault(kind, set()).update(st.get_tensor(k).dtype for k in st.keys() if st.get_tensor(k).is_floating_point())
    return out


def test_bfloat16_cache_stores_bf16_and_trains(tiny_model, toy_pairs, tmp_path):
    cfg = _cfg(tiny_model("sd15"), toy_pairs, tmp_path, "data_opts.cache_dtype=bfloat16", "data_opts.random_flip=true",
               "max_steps=2", "batch_size=4")
    train(cfg)  # builds the cache on first use, then trains from it
    dtypes = _stored_dtypes(tmp_path / "cache")
    assert dtypes == {"shard": {torch.bfloat16}, "captions": {torch.bfloat16}}, dtypes
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # the dtype is part of the cache's key: a float32 run refuses this cache dir, and default
    # cache dirs of the two dtypes differ
    f32 = _cfg(tiny_model("sd15"), toy_pairs, tmp_path, "data_opts.random_flip=true")
    adapter = load_cache_encoders(f32)
    with pytest.raises(UserError, match="cache_dtype"):
        check_cache(f32, adapter)
    no_dir = [f"model={tiny_model('sd15')}", f"data={toy_pairs}"]
    a = load_config(TINY_DPO, no_dir)
    b = load_config(TINY_DPO, [*no_dir, "data_opts.cache_dtype=bfloat16"])
    assert resolve_cache_dir(a, adapter) != resolve_cache_dir(b, adapter)
    with pytest.raises(UserError, match="cache_dtype"):
        load_config(TINY_DPO, [*no_dir, "data_opts.cache_dtype=float64"])


def test_cache_command_never_builds_the_denoiser(tiny_model, toy_pairs, tmp_path, monkeypatch):
    """`diffalign cache` loaded the whole pipeline in fp32 (FLUX.1: ~67 GB) to run a VAE and
    text encoders; the denoiser is not even constructed now."""
    import diffusers

    from diffalign.commands.core import cmd_cache

    built = []
    real_init = diffusers.UNet2DConditionModel.__init__

    @functools.wraps(real_init)  # diffusers reads the signature of __init__ to split the config
    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "__init__", counting_init)
    model = tiny_model("sd15")
    args = argparse.Namespace(config=str(TINY_DPO), batch_size=4, force=False,
                              overrides=[f"model={model}", f"data={toy_pairs}", f"data_opts.cache_dir={tmp_path / 'cache'}"])
    assert cmd_cache(args) == 0
    assert built == []
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["rows"] and index["built_by"] == 1
    # the spy does see a denoiser being built (the check above is not vacuous)
    from diffalign.models import load_adapter

    load_adapter(model)
    assert built == ["UNet2DConditionModel"]


def test_cache_encoders_in_the_run_dtypes(tiny_model, toy_pairs, tmp_path):
    """Text encoders in the weight dtype of mixed_precision; the VAE in fp32 unless its config
    says force_upcast: false (diffusers' flag; SDXL's VAE overflows in fp16)."""
    model = tiny_model("sdxl")
    cfg = _cfg(model, toy_pairs, tmp_path, "mixed_precision=bf16")
    adapter = load_cache_encoders(cfg)
    assert adapter.denoiser is None
    assert {p.dtype for m in adapter.text_encoders() for p in m.parameters()} == {torch.bfloat16}
    assert len(adapter.text_encoders()) == 2 and adapter.vae.dtype == torch.float32
    # a VAE whose config says it is safe in half precision runs in the weight dtype
    fixed = tmp_path / "fixed_vae_model"
    shutil.copytree(model, fixed)
    vae_cfg = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**vae_cfg, "force_upcast": False}))
    adapter = load_cache_encoders(_cfg(str(fixed), toy_pairs, tmp_path, "mixed_precision=fp16"))
    assert adapter.vae.dtype == torch.float16
    assert {p.dtype for m in adapter.text_encoders() for p in m.parameters()} == {torch.float16}
    # no mixed precision: everything fp32, as before
    adapter = load_cache_encoders(_cfg(model, toy_pairs, tmp_path))
    assert adapter.vae.dtype == torch.float32 and adapter.text_encoders()[0].dtype == torch.float32


def test_packaged_large_model_recipes_cache_in_bf16():
    for name in ("flux1_dev_dpo_lora", "flux2_dpo_lora", "sdxl_dpo_pickapic", "sdxl_mapo_pickapic", "sd35_dpo_pickapic"):
        path = ROOT / "diffalign/configs/recipes" / f"{name}.yaml"
        cfg = load_config(path)
        assert cfg.mixed_precision == "bf16" and cfg.data_opts.cache_dtype == "bfloat16", name
        text = path.read_text()
        comment = text[:text.index("data_opts:")].rsplit("\n\n", 1)[-1]
        assert "MiB" in comment and "float32" in comment and "bfloat16" in comment, (name, comment)
    # the default stays float32: tests and the testbed keep their numbers
    assert yaml.safe_load(TINY_DPO.read_text())["data_opts"].get("cache_dtype") is None
    assert load_config(TINY_DPO, ["model=m", "data=d"]).data_opts.cache_dtype == "float32"


def test_build_groups_follow_the_file_system():
    # every process sees the main process's probe: one shared build, process 0 leads
    seen = [("a", 0, True), ("a", 1, True), ("b", 0, True), ("b", 1, True)]
    assert build_group(seen, 3) == ([0, 1, 2, 3], 0)
    # node-local directories: each host builds its own copy, its local main process leads
    seen = [("a", 0, True), ("a", 1, True), ("b", 1, False), ("b", 0, False)]
    assert build_group(seen, 1) == ([0, 1], 0)
    assert build_group(seen, 2) == ([2, 3], 3)


def _assert_same_cache(a: Path, b: Path) -> None:
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    strip = lambda rows: [{k: r[k] for k in ("source_row", "caption")} for r in rows]  # noqa: E731
    assert strip(ia["rows"]) == strip(ib["rows"]) and ia["captions"] == ib["captions"]
    assert ia["skipped"] == ib["skipped"] and ia["fingerprint"]["cache_dtype"] == ib["fingerprint"]["cache_dtype"]
    ra, rb = CacheReader(a, ia), CacheReader(b, ib)
    for row_a, row_b in zip(ia["rows"], ib["rows"]):
        for prefix in ("", "flip_"):
            ma, mb = ra.moments(row_a, prefix), rb.moments(row_b, prefix)
            assert ma.keys() == mb.keys()
            for k in ma:
                torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-5)
    for c in range(len(ia["captions"])):
        ca, cb = ra.cond(c), rb.cond(c)
        assert ca.keys() == cb.keys()
        for k in ca:
            torch.testing.assert_close(ca[k], cb[k], rtol=1e-4, atol=1e-5)


def test_two_processes_share_the_cache_build(tiny_model, toy_pairs, tmp_path):
    """`diffalign cache` under torchrun: each process encodes the rows i % 2 == its index into
    its own shards (rank 0 no longer encodes everything while rank 1 waits at a barrier), and the
    cache equals the one a single process builds."""
    model = tiny_model("sd15")
    overrides = [f"model={model}", f"data={toy_pairs}", "data_opts.random_flip=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "diffalign.cli", "cache", str(TINY_DPO), *overrides, f"data_opts.cache_dir={tmp_path / 'two'}",
         "--batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    index = json.loads((two / "index.json").read_text())
    assert index["built_by"] == 2
    by_rank = {f.split("-")[1] for f in index["shard_files"]}
    assert by_rank == {"r0", "r1"} and {f.split("-")[1] for f in index["caption_files"]} == {"r0", "r1"}
    assert all((two / f).is_file() for f in index["shard_files"] + index["caption_files"])
    # rank r encoded exactly the source rows i % 2 == r
    for row in index["rows"]:
        assert index["shard_files"][row["shard"]].startswith(f"shard-r{row['source_row'] % 2}-")
    assert not list(tmp_path.glob(".two.*"))  # no staging dir or probe file left behind

    cfg = load_config(TINY_DPO, [*overrides, f"data_opts.cache_dir={tmp_path / 'one'}"])
    build_cache(cfg, load_cache_encoders(cfg), batch_size=4)
    _assert_same_cache(tmp_path / "one", two)
    assert check_cache(cfg, load_cache_encoders(cfg), cache_dir=str(two)) is not None  # same fingerprint


def test_a_run_that_builds_its_cache_samples_latents_in_its_own_dtype(tiny_model):
    """The trainer restores the encoders for a first-use build with the VAE in fp32; releasing
    them again keeps the latent dtype the run had, so building now and reading later agree."""
    from diffalign.models import load_adapter

    adapter = load_adapter(tiny_model("sd15"), dtype=torch.bfloat16, encoders=False)
    assert adapter.latent_dtype == torch.bfloat16
    adapter.restore_encoders(torch.bfloat16, torch.float32)
    assert adapter.vae.dtype == torch.float32 and adapter.text_encoders()[0].dtype == torch.bfloat16
    adapter.release_encoders()
    assert adapter.latent_dtype == torch.bfloat16
