"""The GRPO trainer end to end on tiny models: on-policy log-probs, KL, metrics, outputs, config checks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.trainers.common import rank_generator

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
REQUIRED = ("reward_mean", "reward_std", "advantage_abs_mean", "clip_fraction", "approx_kl", "zero_std_group_fraction",
            "rollout_seconds", "train_seconds", "logprob_mismatch")


@pytest.fixture
def tiny(tiny_model):
    return tiny_model


def run(model_dir, out, config="grpo.yaml", *overrides):
    from diffalign.trainers.online import train_online

    cfg = load_config(CONFIGS / config, [f"model={model_dir}", f"output_dir={out}", *overrides])
    result = train_online(cfg)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return result, rows


SMALL = ("max_steps=2", "sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2", "train_batch_size=4",
         "eval.num_prompts=2", "sampler.eval_num_steps=4")


def test_on_policy_log_probs_unet_with_kl(tiny, tmp_path):
    """DDIM-eta on a tiny UNet, CFG on: recomputed == recorded log-probs; KL is 0 while model == reference."""
    _, rows = run(tiny("sd15"), tmp_path, "grpo.yaml", *SMALL, "loss.kl_beta=0.05")
    for r in rows:
        for k in REQUIRED:
            assert k in r, k
        assert r["logprob_mismatch"] < 1e-4
    assert rows[0]["kl"] < 1e-6  # step 1: LoRA B = 0, the model is its reference
    assert rows[-1]["kl"] > 0  # step 2 runs after an optimizer step
    assert "eval_reward_mean" in rows[-1]
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_on_policy_log_probs_dit_ratio_norm_and_epochs(tiny, tmp_path):
    """Flow-SDE on a tiny SD3: mismatch ~0 on the first update; later updates are off-policy (ratio != 1)."""
    _, rows = run(tiny("sd3"), tmp_path, "grpo.yaml", *SMALL, "loss.ratio_norm=true", "inner_epochs=2",
                  "loss.step_weighting=inverse_dt", "optim.learning_rate=1e-2")
    for r in rows:
        assert r["logprob_mismatch"] < 1e-4
        assert r["approx_kl"] > 0  # the second epoch sees the updated policy
        assert 0.0 <= r["clip_fraction"] <= 1.0


@pytest.mark.parametrize("config,kind", [
    *((c, "sd15" if c == "mixgrpo.yaml" else "sd3") for c in ("mixgrpo.yaml", "mixgrpo_flash.yaml", "branchgrpo.yaml", "dancegrpo.yaml")),
    *((c, "qwenimage") for c in ("mixgrpo.yaml", "mixgrpo_flash.yaml", "branchgrpo.yaml", "dancegrpo.yaml")),
    ("mixgrpo.yaml", "flux"), ("branchgrpo.yaml", "flux"), ("mixgrpo.yaml", "flux2"),
    ("branchgrpo.yaml", "flux2-klein"), ("dancegrpo.yaml", "flux2")])
def test_variant_configs_run(tiny, tmp_path, config, kind):
    model = tiny(kind)
    steps = {"mixgrpo.yaml": "sampler.num_steps=4", "mixgrpo_flash.yaml": "sampler.num_steps=6"}.get(config, "sampler.num_steps=5")
    _, rows = run(model, tmp_path, config, "max_steps=2", "prompts_per_step=2", "eval.num_prompts=2", "sampler.eval_num_steps=4",
                  steps)
    assert len(rows) == 2 and all(r["logprob_mismatch"] < 1e-4 for r in rows)
    if config == "mixgrpo.yaml":
        assert [r["window_start"] for r in rows] == [0, 1]
        assert [r["stochastic_steps"] for r in rows] == [2, 1]  # MixGRPO: cut at num_steps - 2 = 2 at the end of the sweep
    if config == "mixgrpo_flash.yaml":
        # window [0, 2) of 6 steps, then int((6 - 1) * 0.4) = 2 points, 1 post-window ODE step: 3 forwards of 8 rows
        assert rows[0]["model_rows"] == 8 * 3
    if config == "branchgrpo.yaml":
        # 2 roots -> 4 -> 8 leaves over 5 steps: one forward per node (2 + 4 + 3 * 8 rows; copies first: 4 + 8 + 24)
        assert all(r["model_rows"] == 2 + 4 + 24 for r in rows)
        # 4 + 8 + 3 * 8 transitions; depth pruning drops step 3 (8), width pruning keeps 8 of the 16 after the last branch
        assert all(r["transitions"] == 4 + 8 + 8 for r in rows)
    if config == "dancegrpo.yaml":
        assert rows[0]["transitions"] == 8 * 3  # 60% of 5 steps for each of the 8 samples
        assert "reward/redness" in rows[0] and "reward/contrast" in rows[0]


def _pipeline_sample(kind, pipe):
    g = torch.Generator().manual_seed(0)
    if kind == "qwenimage":  # true CFG against the empty negative prompt
        return pipe("a red apple", negative_prompt="", true_cfg_scale=4.5, num_inference_steps=3, height=32, width=32,
                    output_type="pt", generator=g).images
    return pipe(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=64,
                generator=g).images


@pytest.mark.parametrize("kind,step", [("qwenimage", "cps"), ("flux", "flow_sde"), ("flux2", "cps"), ("flux2-klein", "dance")])
def test_new_families_train_on_policy_and_save_a_lora_their_pipeline_loads(tiny, tmp_path, kind, step):
    """GRPO on Qwen-Image (true CFG) and each FLUX family (FLUX.1/FLUX.2-dev: embedded guidance, no
    unconditional pass; klein: CFG): recorded == recomputed log-probs, the KL to the reference moves
    off 0, and the saved LoRA loads through the pipeline's ``load_lora_weights`` without missing keys
    and changes its own samples."""
    import warnings

    from diffusers import DiffusionPipeline

    _, rows = run(tiny(kind), tmp_path, "grpo.yaml", *SMALL, f"sampler.step={step}", "optim.learning_rate=3e-2",
                  "loss.kl_beta=0.05", "eval.every=-1")
    assert all(r["logprob_mismatch"] < 1e-4 for r in rows) and rows[-1]["transitions"] > 0
    assert rows[0]["kl"] < 1e-6 and rows[-1]["kl"] > 0

    pipe = DiffusionPipeline.from_pretrained(tiny(kind))
    sample = lambda p: _pipeline_sample(kind, p)  # noqa: E731
    before = sample(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when saved keys miss targets
        pipe.load_lora_weights(str(tmp_path))
    assert (sample(pipe) - before).abs().max() > 1e-4


def test_reward_scoring_overlaps_next_rollout(tiny, tmp_path, monkeypatch):
    import diffalign.trainers.online as online
    from diffalign.rewards.simple import redness

    events = []

    def slow_reward(images, prompts=None, metadata=None):
        events.append(("score_start", time.perf_counter(), threading.current_thread() is threading.main_thread()))
        time.sleep(0.5)
        events.append(("score_end", time.perf_counter(), None))
        return redness(images)

    real_rollout = online.rollout

    def timed_rollout(*a, **kw):
        events.append(("rollout_start", time.perf_counter(), None))
        out = real_rollout(*a, **kw)
        events.append(("rollout_end", time.perf_counter(), None))
        return out

    monkeypatch.setattr(online, "rollout", timed_rollout)
    monkeypatch.setattr(online, "resolve_reward", lambda name, args=None, device=None: slow_reward)
    run(tiny("sd3"), tmp_path, "grpo.yaml", "max_steps=1", "sampler.num_steps=2", "prompts_per_step=4", "batch_size=4",
        "group_size=2", "eval.every=-1")
    first_score = next(e for e in events if e[0] == "score_start")
    assert first_score[2] is False  # scored on the worker thread
    second_rollout_start = [e for e in events if e[0] == "rollout_start"][1]
    first_score_end = next(e for e in events if e[0] == "score_end")
    assert second_rollout_start[1] < first_score_end[1]  # the next rollout ran while scoring


def test_per_rank_generators_differ_and_shared_noise_is_shared():
    from diffalign.trainers.rollout_schedule import initial_noise

    g0 = rank_generator(0, SimpleNamespace(process_index=0))
    g1 = rank_generator(0, SimpleNamespace(process_index=1))
    assert not torch.equal(torch.randn(4, generator=g0), torch.randn(4, generator=g1))
    g = torch.Generator().manual_seed(0)
    shared = initial_noise(2, 3, (1, 2, 2), True, g)
    assert torch.equal(shared[0], shared[2]) and not torch.equal(shared[0], shared[3])
    own = initial_noise(2, 3, (1, 2, 2), False, g)
    assert not torch.equal(own[0], own[1])


@pytest.mark.parametrize("overrides,key", [
    (["schedule.kind=window", "schedule.window.size=5", "sampler.num_steps=4"], "schedule.window.size"),
    (["schedule.kind=window", "schedule.window.size=2", "schedule.window.start=3", "sampler.num_steps=4"], "schedule.window.start"),
    (["batch_size=6", "group_size=4"], "batch_size"),
    (["prompts_per_step=3", "batch_size=8", "group_size=4"], "prompts_per_step"),
    (["schedule.kind=tree", "schedule.tree.branch_steps=[0,1]", "schedule.tree.branch_factor=2", "group_size=6", "batch_size=12"], "group_size"),
    (["schedule.kind=tree", "schedule.tree.branch_steps=[7]"], "schedule.tree.branch_steps"),
    (["sampler.step=euler_maruyama"], "sampler.step"),
    (["schedule.timestep_fraction=0"], "schedule.timestep_fraction"),
    (["advantage.std=batch"], "advantage.std"),
    (["gradient_accumulation_steps=2"], "gradient_accumulation_steps"),
    (["loss.clip_range=0"], "loss.clip_range"),
    (["rewards=[]"], "rewards"),
])
def test_impossible_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(CONFIGS / "grpo.yaml", ["model=m", *overrides])


@pytest.mark.parametrize("overrides, key", [
    (["eval.keep_best=pickscore"], "eval.keep_best"),  # not a reward of the run
    (["eval.keep_best=redness", "lora.rank=0"], "eval.keep_best"),
    (["eval.keep_best=redness", "eval.every=-1"], "eval.keep_best"),
])
def test_keep_best_needs_a_reward_evaluations_and_a_lora(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "grpo.yaml", ["model=m", "rewards=[{name: redness}]", *overrides])


def test_eval_at_start_and_keep_best(tiny, tmp_path):
    """``eval.at_start`` logs the starting weights as step 0; ``eval.keep_best`` keeps the weights of the
    evaluation with the highest watched reward, which load into the pipeline like the final LoRA."""
    from safetensors.torch import load_file

    args = (*SMALL, "max_steps=3", "eval.every=1", "eval.at_start=true", "rewards=[{name: redness}]",
            "eval.rewards=[{name: blueness}]", "eval.keep_best=blueness", "optim.learning_rate=3e-2")
    _, rows = run(tiny("sd3"), tmp_path / "a", "grpo.yaml", *args)
    evals = [(r["step"], r["eval_reward/blueness"]) for r in rows if "eval_reward/blueness" in r]
    assert [s for s, _ in evals] == [0, 1, 2, 3] and rows[0]["step"] == 0 and "reward_mean" not in rows[0]
    best = json.loads((tmp_path / "a" / "best" / "best.json").read_text())
    step, value = max(evals, key=lambda e: e[1])  # the first of equal values: a later one must be strictly higher
    assert best == {"step": step, "reward": "blueness", "value": pytest.approx(value)}
    kept = load_file(tmp_path / "a" / "best" / "pytorch_lora_weights.safetensors")
    final = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    assert kept.keys() == final.keys()
    same = all(torch.equal(kept[k], final[k]) for k in kept)
    assert same == (step == 3)  # the final weights only when the last evaluation was the best
    # a fresh run into the same directory does not inherit an earlier run's best (here a planted, unbeatable one)
    (tmp_path / "a" / "best" / "best.json").write_text(json.dumps({"step": 99, "reward": "blueness", "value": 1e9}))
    _, rows = run(tiny("sd3"), tmp_path / "a", "grpo.yaml", *args, "overwrite=true")
    assert json.loads((tmp_path / "a" / "best" / "best.json").read_text())["step"] <= 3


def test_zero_noise_tree_branch_is_rejected(tiny, tmp_path):
    """CPS's last step has no noise: branching there would give identical children."""
    with pytest.raises(ConfigError, match="schedule.tree.branch_steps"):
        run(tiny("sd3"), tmp_path, "branchgrpo.yaml", "sampler.step=cps", "schedule.tree.branch_steps=[0,3]")


def test_resume_repeats_the_same_step(tiny, tmp_path):
    """Checkpoint at step 2, resume, redo step 3: same rollouts and rewards as the straight run."""
    import shutil

    args = (*SMALL, "max_steps=3", "checkpoint_every=2", "eval.every=-1")
    _, straight = run(tiny("sd3"), tmp_path / "a", "grpo.yaml", *args)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000003")
    _, resumed = run(tiny("sd3"), tmp_path / "b", "grpo.yaml", *args, "resume=latest")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for k in ("reward_mean", "reward_std", "advantage_abs_mean", "loss"):
        assert resumed[2][k] == pytest.approx(straight[2][k], rel=1e-5, abs=1e-7), k


def test_prompt_files_and_reward_names(tmp_path):
    from diffalign.errors import UserError
    from diffalign.trainers.grpo_rewards import BUILTIN_PROMPTS, load_prompts, resolve_reward, reward_scores

    assert load_prompts(None) == (BUILTIN_PROMPTS, None)
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert load_prompts(str(tmp_path / "p.txt")) == (["a cat", "a dog"], None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "two apples", "count": 2}\n{"prompt": "a tree"}\n')
    prompts, meta = load_prompts(str(tmp_path / "p.jsonl"))
    assert prompts == ["two apples", "a tree"] and meta[0]["count"] == 2
    with pytest.raises(ConfigError, match="data"):
        load_prompts(str(tmp_path / "missing.txt"))
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 1.0  # a red image and a black one
    scores = reward_scores(resolve_reward("redness")(images, ["x", "y"]), 2, "redness")
    assert scores.tolist() == [1.0, 0.0]
    with pytest.raises(UserError):
        resolve_reward("no_such_reward")


def test_nonfinite_loss_is_not_backpropagated(tiny, tmp_path, monkeypatch):
    """One NaN policy (optim_step): a NaN loss skips backward and the step, counted per step;
    ``loss.max_nonfinite_steps`` in a row abort the run."""
    import diffalign.trainers.trajectory as trajectory

    real_loss = trajectory.grpo_clip_loss

    def nan_loss(*a, **kw):
        loss, metrics = real_loss(*a, **kw)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trajectory, "grpo_clip_loss", nan_loss)
    _, rows = run(tiny("sd3"), tmp_path / "a", "grpo.yaml", *SMALL, "eval.every=-1", "loss.max_nonfinite_steps=3",
                  "loss.kl_beta=0.05")
    assert [r["nonfinite_skipped"] for r in rows] == [1, 1]
    assert all("grad_norm" not in r for r in rows)  # no backward, so no gradient norm
    assert rows[-1]["kl"] < 1e-6  # the policy never moved from its reference
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        run(tiny("sd3"), tmp_path / "b", "grpo.yaml", *SMALL, "eval.every=-1", "loss.max_nonfinite_steps=2")
