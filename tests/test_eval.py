"""diffalign eval / compare, and testbed pairs sampled from a pipeline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from diffalign.errors import UserError
from diffalign.eval.generate import EvalConfig, resolve_prompts, run_eval

PROMPTS = ["a red circle", "two blue squares"]


def _eval(model, out, lora=None, batch_size=8, prompts_file=None):
    cfg = EvalConfig(model=model, prompts=str(prompts_file), rewards=["testbed", "jpeg"], out=str(out), lora=lora,
                     seeds=2, steps=2, guidance=3.0, batch_size=batch_size)
    return run_eval(cfg)


def _rows(d):
    with open(Path(d) / "per_image.csv", newline="") as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def test_eval_reproducible_and_outputs(tiny_model, tmp_path, prompts_file):
    model = tiny_model("sd15")
    s1 = _eval(model, tmp_path / "a", batch_size=8, prompts_file=prompts_file)
    s2 = _eval(model, tmp_path / "b", batch_size=8, prompts_file=prompts_file)
    r1, r2 = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert list(r1[0].keys())[:6] == ["prompt_idx", "prompt", "seed", "image", "testbed", "jpeg"]
    assert len(r1) == len(PROMPTS) * 2
    assert [r["seed"] for r in r1] == [r["seed"] for r in r2]
    assert len({r["seed"] for r in r1}) == 4
    for a, b in zip(r1, r2):
        assert a["testbed"] == b["testbed"] and a["jpeg"] == b["jpeg"]
        assert (tmp_path / "a" / a["image"]).read_bytes() == (tmp_path / "b" / b["image"]).read_bytes()
    for name in ("testbed", "jpeg"):
        st = s1["rewards"][name]
        assert st["n"] == 4
        assert st["ci_low"] <= st["mean"] <= st["ci_high"]
        assert st == s2["rewards"][name]
    assert (tmp_path / "a" / "grid.png").is_file()
    # another batch size: same seeds and noise, equal up to float rounding of batched kernels
    _eval(model, tmp_path / "c", batch_size=3, prompts_file=prompts_file)
    import numpy as np
    from PIL import Image

    for a, c in zip(r1, _rows(tmp_path / "c")):
        assert a["seed"] == c["seed"]
        ia = np.asarray(Image.open(tmp_path / "a" / a["image"]), dtype=np.int16)
        ic = np.asarray(Image.open(tmp_path / "c" / c["image"]), dtype=np.int16)
        assert np.abs(ia - ic).max() <= 2
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rewards"]["jpeg"]["n"] == 4


def test_eval_sampling_applies_each_familys_guidance(tiny_model):
    """Qwen-Image's pipeline ignores ``guidance_scale``: eval must run its true CFG (with the empty
    negative prompt), the same guided sampler the rollout engine uses."""
    import torch

    from diffalign.eval.generate import generate, load_pipeline
    from diffalign.models import load_adapter
    from diffalign.pipelines import GuidedModel, sample, sampling_table

    pipe = load_pipeline(tiny_model("qwenimage"))
    guided = generate(pipe, PROMPTS, [0, 1], steps=3, guidance=4.5, resolution=32)
    unguided = generate(pipe, PROMPTS, [0, 1], steps=3, guidance=1.0, resolution=32)
    adapter = load_adapter(tiny_model("qwenimage"))
    # the pipeline draws each image's noise as one [1, 1 frame, C, h, w] tensor from its generator, then packs it
    noise = torch.stack([torch.randn((1, 1, *adapter.latent_shape(32, 32)), generator=torch.Generator().manual_seed(s))[0, 0]
                         for s in (0, 1)])
    model = GuidedModel(adapter, adapter.encode_prompt(PROMPTS), adapter.encode_prompt([""]), 4.5)
    ours = adapter.decode_latents(sample(model, sampling_table(adapter, 3, height=32, width=32), noise, torch.tensor([0, 1])))
    torch.testing.assert_close(ours, guided, rtol=0, atol=2e-5)
    assert float((unguided - guided).abs().max()) > 1e-4  # (the tiny model's text barely steers it)


def test_prompt_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local prompt file"):
        resolve_prompts("partiprompts")
    bad = tmp_path / "p.csv"
    bad.write_text("x\n")
    with pytest.raises(UserError, match="p.csv"):
        resolve_prompts(str(bad))
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a red circle"}\n{"caption": "a blue square"}\n')
    assert resolve_prompts(str(j)) == ["a red circle", "a blue square"]
    assert len(resolve_prompts("testbed_heldout:5")) == 5


def test_confidence_interval():
    from diffalign.eval.summary import confidence_interval

    ci = confidence_interval([1.0, 2.0, 3.0, 4.0])
    assert ci["ci_low"] < ci["mean"] == 2.5 < ci["ci_high"]
    assert confidence_interval([1.0])["ci_low"] == 1.0


def test_compare_report(tiny_model, toy_pairs, tmp_path, prompts_file):
    from diffalign.config import load_config
    from diffalign.eval.compare import compare
    from diffalign.trainers import train

    model = tiny_model("sd15")
    run = tmp_path / "dpo"
    cfg = load_config("tiny/dpo.yaml", [f"model={model}", f"data={toy_pairs}", f"output_dir={run}", "max_steps=2", "batch_size=2"])
    train(cfg)
    _eval(model, tmp_path / "base", prompts_file=prompts_file)
    _eval(model, tmp_path / "dpo_eval", lora=str(run), prompts_file=prompts_file)
    res = compare([str(tmp_path / "base"), str(tmp_path / "dpo_eval")], str(tmp_path / "report"))
    rep = tmp_path / "report"
    for f in ("report.md", "report.html", "table.csv", "side_by_side.png", "curves.png"):
        assert (rep / f).is_file(), f
    assert res["base"] == "base"
    md = (rep / "report.md").read_text()
    assert "win vs base" in md and "dpo_eval" in md
    with open(rep / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "testbed_win_rate" in rows[0] and rows[1]["testbed_win_rate"] != ""
    assert 0.0 <= float(rows[1]["jpeg_win_rate"]) <= 1.0
    # paired difference: the mean of per-(prompt, seed) differences, recomputed from the CSVs
    base_scores = {(r["prompt"], r["seed"]): float(r["jpeg"]) for r in _rows(tmp_path / "base")}
    diffs = np.array([float(r["jpeg"]) - base_scores[(r["prompt"], r["seed"])] for r in _rows(tmp_path / "dpo_eval")])
    assert float(rows[1]["jpeg_delta_mean"]) == pytest.approx(diffs.mean(), abs=1e-9)
    half = float(rows[1]["jpeg_delta_ci_high"]) - float(rows[1]["jpeg_delta_mean"])
    assert half == pytest.approx(3.182 * diffs.std(ddof=1) / np.sqrt(len(diffs)), rel=1e-6)  # t(3) for 4 pairs
    assert "minus base, paired" in md
    with pytest.raises(UserError):
        compare([str(tmp_path / "nothing")], str(tmp_path / "r2"))


def test_testbed_pairs_from_pipeline_sampler(tiny_model, tmp_path):
    from diffalign.config import DataOptions
    from diffalign.data.pickapic import PreferencePairStream, load_preference_dataset
    from diffalign.eval.generate import load_pipeline
    from diffalign.testbed import make_pairs, train_prompts
    from diffalign.testbed.base_model import PipelineSampler

    sampler = PipelineSampler(load_pipeline(tiny_model("sd15")), steps=2, guidance=3.0)
    prompts = train_prompts(8)
    for mismatch in (False, True):
        path = tmp_path / f"pairs_{mismatch}" / "train.parquet"
        table = make_pairs(sampler, prompts, n_pairs=6, seed=0, style_mismatch=mismatch, out_path=path)
        assert table.num_rows == 6
        opts = DataOptions(resolution=32, drop_ties=False)
        ds = load_preference_dataset(str(path.parent), opts)
        ex = next(iter(PreferencePairStream(ds, opts, seed=0)))
        assert ex["pixels_w"].shape[-1] == 32 and isinstance(ex["caption"], str)
