"""testbed-compare: building blocks, the base-model trainer, and the whole job on the quick budget."""

from __future__ import annotations

import json

import pytest
import torch


def test_budgets_and_configs_load():
    import argparse

    from diffalign.cli import build_parser
    from diffalign.config import load_config
    from diffalign.testbed.base_model import BUDGETS
    from diffalign.testbed.job import CONFIG_DIR, METHODS, REWARD_MODEL, budget_methods, budget_names, load_budget, read_budgets

    names = budget_names()
    assert names == ["quick", "full", "long"]
    # every budget of job.yaml is a --budget choice of the command (and nothing else is)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    budget_arg = next(a for a in sub.choices["testbed-compare"]._actions if a.dest == "budget")
    assert sorted(budget_arg.choices) == sorted(names)
    # one defaults block: a budget that does not set a key gets the default's value
    import yaml

    raw = yaml.safe_load((CONFIG_DIR / "job.yaml").read_text())
    assert "n_pairs" not in raw["full"] and read_budgets()["full"]["n_pairs"] == raw["defaults"]["n_pairs"]
    assert raw["long"]["n_pairs"] != raw["defaults"]["n_pairs"] and read_budgets()["long"]["n_pairs"] == raw["long"]["n_pairs"]
    for budget in names:
        b = load_budget(budget)
        assert {"base", "flow_base", "n_pairs", "methods", "pair_overrides", "grpo_overrides", "indist_prompts",
                "compositional_prompts", "indist_seeds", "compositional_seeds", "reward_model", "seconds"} <= set(b)
        assert BUDGETS[b["base"]].family == "sd15" and BUDGETS[b["flow_base"]].family == "sd3"
        table, extra = budget_methods(b, budget)
        assert set(b["methods"]) <= set(table)
        for name in b["methods"]:  # the budget's (and a variant's) overrides apply to the method's config
            m = table[name]
            ov = ["model=M", "data=D", *b["grpo_overrides" if m.online else "pair_overrides"],
                  *b.get("method_overrides", {}).get(name, []), *extra.get(name, [])]
            cfg = load_config(CONFIG_DIR / m.config, ov)
            assert cfg.method == ("grpo" if m.config in ("grpo.yaml", "mixgrpo.yaml", "dancegrpo.yaml", "branchgrpo.yaml")
                                  else m.config.removesuffix(".yaml"))
    assert load_config(CONFIG_DIR / "mixgrpo.yaml", ["model=M"]).schedule.kind == "window"
    assert load_config(CONFIG_DIR / "branchgrpo.yaml", ["model=M"]).schedule.kind == "tree"
    assert load_budget("quick").get("plumbing") and not load_budget("full").get("plumbing")
    # the main job judges every row on the hidden taste; the online rows train on it, grpo_rm on a reward model
    full = load_budget("full")["methods"]
    assert {"dpo", "grpo", "mixgrpo", "nft", "grpo_rm"} <= set(full)
    assert all(METHODS[m].target == "testbed_style" for m in full)
    assert METHODS["grpo"].reward == "testbed_style" and METHODS["grpo_rm"].reward == REWARD_MODEL
    # the faithfulness-only rows run in `long`, judged on faithfulness, with AWM, DanceGRPO and BranchGRPO in the race
    long = load_budget("long")["methods"]
    assert {"grpo_faith", "nft_faith", "awm", "dancegrpo", "branchgrpo"} <= set(long)
    assert not any(m.endswith("_faith") for m in full)
    assert METHODS["grpo_faith"].target == METHODS["grpo_faith"].reward == "testbed"


def test_online_rows_train_on_their_reward_and_watch_both(tmp_path):
    from diffalign.config import load_config
    from diffalign.testbed.job import CONFIG_DIR, METHODS, online_reward_overrides

    cfg = load_config(CONFIG_DIR / "grpo.yaml", ["model=M", *online_reward_overrides(METHODS["grpo"], None)])
    assert [r.name for r in cfg.rewards] == ["testbed_style"] and cfg.eval.at_start
    assert [r.name for r in cfg.eval.rewards] == ["testbed_style", "testbed"]
    rm = tmp_path / "rm model"
    cfg = load_config(CONFIG_DIR / "grpo.yaml", ["model=M", *online_reward_overrides(METHODS["grpo_rm"], rm)])
    assert [r.name for r in cfg.rewards] == [f"pickscore={rm}"]
    cfg = load_config(CONFIG_DIR / "nft.yaml", ["model=M", *online_reward_overrides(METHODS["nft_faith"], None)])
    assert [r.name for r in cfg.rewards] == ["testbed"]
    with pytest.raises(ValueError, match="reward model"):
        online_reward_overrides(METHODS["grpo_rm"], None)


def test_reward_model_pairs_are_split_by_prompt_and_never_from_eval_prompts(tmp_path):
    """Split hygiene of the RLHF row: the reward model's pairs come from the train prompts only, and
    its validation prompts are prompts it never trained on."""
    import pyarrow.parquet as pq

    from diffalign.testbed import make_pairs, world_sampler
    from diffalign.testbed.job import split_reward_model_pairs
    from diffalign.testbed.prompts import job_prompt_splits, scene_key

    splits = job_prompt_splits(40, 16, 8, n_curve=8)
    make_pairs(world_sampler, splits["train"], 60, seed=0, out_path=tmp_path / "pairs" / "train-0.parquet")
    counts = split_reward_model_pairs(tmp_path / "pairs", tmp_path / "rm", val_fraction=0.3)
    train = pq.read_table(tmp_path / "rm" / "train.parquet").column("caption").to_pylist()
    val = pq.read_table(tmp_path / "rm" / "val.parquet").column("caption").to_pylist()
    assert counts == {"train": len(train), "val": len(val)} and len(train) + len(val) == 60 and val
    assert not set(train) & set(val)
    held = {scene_key(p) for k in ("indist", "curve") for p in splits[k]}
    assert not {scene_key(p) for p in train + val} & held
    # the fixed eval subset of the online curves is disjoint from every other prompt set
    assert not {scene_key(p) for p in splits["curve"]} & {scene_key(p) for p in splits["train"] + splits["indist"]}
    assert job_prompt_splits(40, 16, 8)["train"] == splits["train"]  # adding the curve set changes nothing else


def test_bad_variant_is_one_clear_error():
    from diffalign.errors import UserError
    from diffalign.testbed.job import budget_methods

    with pytest.raises(UserError, match="variant 'v' needs 'of"):
        budget_methods({"variants": {"v": {"of": "nope"}}}, "b")
    with pytest.raises(UserError, match="variant 'v' has target 'clip'"):
        budget_methods({"variants": {"v": {"of": "grpo", "target": "clip"}}}, "b")


def test_caching_sampler_samples_once():
    from diffalign.testbed.job import CachingSampler

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
                            scene={"p_two_groups": 0.0}, style="tinted")
    path = get_base_model(micro, log=None)
    assert path.parent == tmp_path / "cache" / "testbed"
    info = json.loads((path / "testbed_base.json").read_text())
    assert info["key"] == micro.key() and info["config"]["steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.config.sample_size == 16
    assert get_base_model(micro, log=None) == path  # cached: no retraining
    assert shipped_base_model(micro) is None
    for name in ("full", "flow_long"):
        shipped = shipped_base_model(BUDGETS[name])
        assert shipped is not None, f"the package ships the {name} base"
        assert get_base_model(name) == shipped  # any change of its config retrains
        assert shipped_base_model(replace(BUDGETS[name], steps=BUDGETS[name].steps + 1)) is None


def test_flow_base_trainer_loads_through_the_sd3_adapter(tmp_path):
    """The flow base (SD3 layout, no T5) trains, saves, and loads through the same path as any
    SD3 checkpoint; its sampler is the flow-matching Euler scheduler."""
    from diffalign.eval.generate import generate, load_pipeline
    from diffalign.models import load_adapter
    from diffalign.testbed.base_model import BaseModelConfig, train_base_model

    cfg = BaseModelConfig(family="sd3", n_train=32, steps=3, vae_steps=3, batch_size=4, warmup_steps=1,
                          train_text_encoder=True, scene={"p_two_groups": 0.0}, dit_layers=2)
    path = train_base_model(tmp_path / "flow", cfg, log=None)
    adapter = load_adapter(str(path))
    assert adapter.is_flow and adapter.pipe.text_encoder_3 is None
    assert type(adapter.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # without T5 the zero-token count is part of the model: read from the checkpoint, not the 256 default
    assert adapter.opts.max_sequence_length == 256 and adapter.max_sequence_length == cfg.max_sequence_length == 8
    cond = adapter.encode_prompt(["a red circle"])
    assert cond["encoder_hidden_states"].shape[1] == adapter.pipe.tokenizer.model_max_length + 8
    pipe = load_pipeline(str(path))
    img = generate(pipe, ["a red circle"], [0], steps=2, guidance=3.0, resolution=None)
    assert img.shape == (1, 3, 32, 32) and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
    assert torch.equal(img, generate(pipe, ["a red circle"], [0], steps=2, guidance=3.0, resolution=None, max_sequence_length=8))
    assert not torch.equal(img, generate(pipe, ["a red circle"], [0], steps=2, guidance=3.0, resolution=None, max_sequence_length=256))


@pytest.mark.slow
def test_testbed_compare_quick_budget(tmp_path):
    """The whole job on the quick budget (the shipped bases): every method trains and is
    evaluated on both splits; the report says it is a plumbing run and has its sections."""
    from diffalign.testbed.job import load_budget, run_testbed_compare

    res = run_testbed_compare(str(tmp_path / "tb"), budget="quick", workers=2, log=lambda s: None)
    methods = load_budget("quick")["methods"]
    assert res["status"] == {m: "ok" for m in methods}
    assert [r["method"] for r in res["headline"]] == methods
    report = tmp_path / "tb" / "report"
    text = (report / "report.md").read_text()
    assert text.splitlines()[0].startswith("**This is a plumbing run")
    for col in ("target minus base, paired [95% CI]", "compositional: target minus base", "train time (s)",
                "labels / reward calls", "effect / half-width"):
        assert col in text
    assert "dpo minus sft" in text and "train-reward slope per step" in text
    for f in ("report.html", "online_curves.png", "headline.json", "race.png", "overoptimisation.png"):
        assert (report / f).is_file(), f
    # labels and reward calls: 16 labelled pairs for the pair rows and the RLHF row, 2 steps x 4 samples online
    consumed = {r["method"]: r["consumed"] for r in res["headline"]}
    assert consumed["dpo"] == "16 labels" and consumed["grpo"] == "8 testbed_style calls"
    # the RLHF row's checkpoint is chosen on the eval prompts: 3 evaluations (steps 0, 1, 2) x 4 prompts of the taste
    assert consumed["grpo_rm"] == "16 labels; 8 learned-reward calls; 12 testbed_style calls to choose the checkpoint"
    best = json.loads((tmp_path / "tb" / "runs" / "grpo_rm" / "best" / "best.json").read_text())
    assert best["reward"] == "testbed_style" and 0 <= best["step"] <= 2
    assert f"judged at step {best['step']}" in text
    # the efficiency race: every online row on the taste, with a step-0 evaluation as the origin
    race = {r["method"]: r for r in res["race"]}
    assert set(race) == {"grpo", "mixgrpo", "nft", "grpo_rm"}
    assert "## The efficiency race" in text and "seconds to half the best final gain" in text
    # the reward model of the RLHF row trained on the job's pairs and is reported with its held-out accuracy
    rm = json.loads((tmp_path / "tb" / "reward_model" / "reward_model.json").read_text())
    assert rm["train_pairs"] + rm["val_pairs"] == 16 and 0.0 <= rm["val_accuracy"] <= 1.0
    assert "## RLHF: the reward model and over-optimisation" in text and f"{rm['val_accuracy']:.3f}" in text
    # the HTML page is rendered from the Markdown: one table row per method in the headline table
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    page = Tables()
    page.feed((report / "report.html").read_text())
    headline_rows = page.tables[0]
    assert headline_rows[0][0] == "method" and [r[0] for r in headline_rows[1:]] == methods
    assert all("`" not in c and "---" not in c for row in headline_rows for c in row)
    for kind in ("unet", "flow"):  # one detailed compare report per base and split
        for split in ("indist", "compositional"):
            assert (report / f"{kind}_{split}" / "report.md").is_file()
    for r in res["headline"]:
        for split in ("indist", "compositional"):
            t = r[f"{split}/{r['target']}"]
            assert 0.0 <= t["win_rate"] <= 1.0 and t["n_paired"] > 0
    summary = json.loads((tmp_path / "tb" / "testbed_compare.json").read_text())
    assert summary["budget"] == "quick" and summary["seconds"]["total"] > 0
    assert summary["seconds"]["train:grpo"] > 0


def test_unknown_method_is_rejected_before_any_work(tmp_path):
    from diffalign.errors import UserError
    from diffalign.testbed.job import run_testbed_compare

    with pytest.raises(UserError, match="unknown foo"):
        run_testbed_compare(str(tmp_path / "tb"), budget="quick", methods=["dpo", "foo"], log=lambda s: None)
    assert not (tmp_path / "tb").exists()


def test_ols_slope_matches_closed_form():
    import numpy as np

    from diffalign.testbed.report import ols_slope
    from diffalign.eval.summary import t_quantile_975

    rng = np.random.default_rng(0)
    x = np.arange(20.0)
    y = 0.3 * x + rng.normal(0, 1.0, 20)
    s = ols_slope(list(x), list(y))
    X = np.stack([np.ones_like(x), x], 1)
    beta, res, *_ = np.linalg.lstsq(X, y, rcond=None)
    cov = res[0] / (len(x) - 2) * np.linalg.inv(X.T @ X)
    half = t_quantile_975(len(x) - 2) * np.sqrt(cov[1, 1])
    assert s["slope"] == pytest.approx(beta[1]) and s["ci_high"] - s["slope"] == pytest.approx(half)
    assert s["ci_low"] > 0  # a clear rise is detected


@pytest.mark.slow
@pytest.mark.parametrize("budget,floor", [("full", 0.80), ("flow_long", 0.80)])
def test_shipped_bases_draw_the_world(budget, floor):
    """Each shipped base scores at least ``floor`` on in-distribution captions it never saw as
    pair or rollout prompts (the job's indist split), sampled as the job samples them: 0.80 for
    both (the flow base measures 0.83 on 64 captions x 2 seeds)."""
    from diffalign.eval.generate import generate, image_seed, load_pipeline
    from diffalign.testbed import testbed_reward
    from diffalign.testbed.base_model import BUDGETS, JOB_SCENE, shipped_base_model
    from diffalign.testbed.prompts import job_prompt_splits

    cfg = BUDGETS[budget]
    path = shipped_base_model(cfg)
    assert path is not None
    prompts = job_prompt_splits(200, 64, 32, **JOB_SCENE)["indist"][::4]  # 16 captions, 2 seeds each
    caps = [p for p in prompts for _ in range(2)]
    seeds = [image_seed(i // 2, i % 2, 10_000) for i in range(len(caps))]
    msl = cfg.max_sequence_length if cfg.family == "sd3" else None
    images = generate(load_pipeline(str(path)), caps, seeds, steps=10, guidance=3.0, resolution=None, max_sequence_length=msl)
    score = float(testbed_reward(images, caps).scores.mean())
    assert score >= floor, f"{budget} base scores {score:.3f} on indist captions (floor {floor})"


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_stop_when_the_job_process_is_killed(tmp_path):
    """A killed job must not leave its worker processes training on the cores."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "job.py"
    script.write_text(
        "import os, time, multiprocessing as mp\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from diffalign.testbed.runner import init_worker\n"
        "def work():\n"
        "    print(os.getpid(), flush=True); time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    with ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=init_worker) as pool:\n"
        "        pool.submit(work).result()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(worker, 0)  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    def gone() -> bool:  # exited, or a zombie nobody reaps (a container's PID 1 may not)
        try:
            with open(f"/proc/{worker}/status") as f:
                return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
        except FileNotFoundError:
            return True

    deadline = time.time() + 20
    while time.time() < deadline:
        if gone():
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail(f"worker {worker} outlived the killed job")


@pytest.mark.slow
def test_long_budget_methods_run_end_to_end(tmp_path):
    """The methods `long` adds (AWM, DanceGRPO, BranchGRPO, DDPO in the race; the faithfulness-only
    rows) run through the job on the quick budget's settings; the report states the bound for the
    faithfulness-only rows and claims no gain for them."""
    from diffalign.testbed.job import run_testbed_compare

    methods = ["grpo", "awm", "dancegrpo", "branchgrpo", "ddpo", "grpo_faith"]
    res = run_testbed_compare(str(tmp_path / "tb"), budget="quick", methods=methods, workers=2, log=lambda s: None)
    assert res["status"] == {m: "ok" for m in methods}
    assert {r["method"] for r in res["race"]} == {"grpo", "awm", "dancegrpo", "branchgrpo", "ddpo"}
    faith = next(r for r in res["headline"] if r["method"] == "grpo_faith")
    assert faith["target"] == "testbed" and not faith["faithfulness_falls"]
    text = (tmp_path / "tb" / "report" / "report.md").read_text()
    assert "Rows judged on faithfulness alone" in text and "No gain is claimed for them" in text


def test_time_to_gain_interpolates_the_first_crossing():
    from diffalign.testbed.report import time_to_gain

    curve = [(0, 0.0, 1.0), (2, 10.0, 1.1), (4, 30.0, 1.5), (6, 40.0, 1.2)]  # (step, seconds, reward)
    assert time_to_gain(curve, 0.3) == pytest.approx(10.0 + 20.0 * (0.2 / 0.4))  # 1.3 reached between 10 s and 30 s
    assert time_to_gain(curve, 0.1) == pytest.approx(10.0)
    assert time_to_gain(curve, 0.6) is None  # never reached
    assert time_to_gain(curve[1:], 0.1) is None  # no step-0 origin
