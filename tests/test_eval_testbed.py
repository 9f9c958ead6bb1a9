"""testbed-compare: building blocks, the base-model trainer, and the whole job on the quick budget."""

from __future__ import annotations

import json

import pytest
import torch


def test_budgets_and_configs_load():
    from diffalign.config import load_config
    from diffalign.eval.testbed_job import CONFIG_DIR, grpo_available, load_budget

    for budget in ("quick", "full"):
        b = load_budget(budget)
        assert {"base", "n_pairs", "methods", "pair_overrides", "grpo_overrides", "eval_prompts"} <= set(b)
        for name in ("dpo", "mapo", "sft"):  # the budget's overrides apply to the configs
            cfg = load_config(CONFIG_DIR / f"{name}.yaml", ["model=M", "data=D", *b["pair_overrides"]])
            assert cfg.method == name
        if grpo_available():
            for name in ("grpo", "mixgrpo", "dancegrpo"):
                cfg = load_config(CONFIG_DIR / f"{name}.yaml", ["model=M", *b["grpo_overrides"]])
                assert cfg.method == "grpo"
            assert load_config(CONFIG_DIR / "mixgrpo.yaml", ["model=M"]).schedule.kind == "window"


def test_caching_sampler_samples_once():
    from diffalign.eval.testbed_job import CachingSampler

    calls = []

    def sampler(prompts, seeds):
        calls.append(len(prompts))
        return torch.stack([torch.full((3, 4, 4), float(s)) for s in seeds])

    cs = CachingSampler(sampler)
    a = cs(["x", "y", "x"], [1, 2, 1])
    b = cs(["y", "x"], [2, 1])
    assert calls == [2]
    assert torch.equal(a[0], b[1]) and a[1, 0, 0, 0] == 2.0


def test_tiny_text_encoder_separates_testbed_prompts(tiny_model):
    from transformers import CLIPTextModel, CLIPTokenizer

    from diffalign.testbed import train_prompts
    from diffalign.testbed.base_model import BUDGETS, prompt_separability

    path = tiny_model("sd15")
    sep = prompt_separability(CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                              CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"), train_prompts(60))
    assert sep["identical_pairs"] == 0 and sep["min_dist"] > 0.1
    assert BUDGETS["quick"].key() != BUDGETS["full"].key()


def test_base_model_trainer_and_shipped_lookup(tmp_path, monkeypatch):
    """The base-model script trains a loadable diffusers pipeline; the shipped weights are
    used only for the exact config they were trained with."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from diffalign.testbed.base_model import BUDGETS, BaseModelConfig, get_base_model, shipped_base_model

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    micro = BaseModelConfig(n_train=32, steps=3, vae_steps=3, batch_size=4, warmup_steps=1, train_text_encoder=True,
                            scene={"p_two_groups": 0.0})
    path = get_base_model(micro, log=None)
    assert path.parent == tmp_path / "cache" / "testbed"
    info = json.loads((path / "testbed_base.json").read_text())
    assert info["key"] == micro.key() and info["config"]["steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.config.sample_size == 16
    assert get_base_model(micro, log=None) == path  # cached: no retraining
    assert shipped_base_model(micro) is None
    shipped = shipped_base_model(BUDGETS["full"])
    if shipped is not None:  # the package ships the full base: any change of its config retrains
        assert get_base_model("full") == shipped
        assert shipped_base_model(replace(BUDGETS["full"], steps=BUDGETS["full"].steps + 1)) is None


@pytest.mark.slow
def test_testbed_compare_quick_budget(tmp_path):
    """The whole job on the quick budget: every method trains and is evaluated, and the
    report files exist with one table row per method."""
    from diffalign.eval.testbed_job import load_budget, run_testbed_compare

    res = run_testbed_compare(str(tmp_path / "tb"), budget="quick", log=lambda s: None)
    methods = load_budget("quick")["methods"]
    assert res["status"] == {m: "ok" for m in methods}
    assert [r["method"] for r in res["table"]] == ["base", *methods]
    for f in ("report.md", "report.html", "table.csv", "curves.png", "side_by_side.png"):
        assert (tmp_path / "tb" / "report" / f).is_file(), f
    summary = json.loads((tmp_path / "tb" / "testbed_compare.json").read_text())
    assert summary["budget"] == "quick" and summary["seconds"]["total"] > 0
    for r in res["table"][1:]:
        assert 0.0 <= r["testbed_win_rate"] <= 1.0 and r["testbed_n_paired"] == r["testbed_n"]
