"""Published conventions of the online RL references as options (issue 14): each option against an
independent implementation of the reference's formula, written here from the repo/paper text, on
random tensors (fp32 tolerance). The sources:

* flow_grpo (yifan123/flow_grpo): ``scripts/train_sd3.py`` (KL, first ``int(N f)`` steps, zero-advantage
  filter), ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` (``std_dev_t``, CPS log-prob),
  ``flow_grpo/stat_tracking.py`` (``np.std + 1e-4``, global std);
* DanceGRPO (XueZeyue/DanceGRPO): ``fastvideo/train_grpo_flux.py`` (``sd3_time_shift``, ``std() + 1e-8``,
  ``int(len(timesteps[:-1]) f)`` random steps, reward on the last step's x0-prediction).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffalign.losses import gaussian_kl_same_std
from diffalign.models import SD3Adapter
from diffalign.pipelines import (
    CPSStep, DanceSDEStep, FlowSDEStep, full_plan, rollout, sampling_table, split_prediction, time_shift_table,
)
from diffalign.trainers.advantages import group_advantages, tree_advantages

SHAPE = (10, 4, 6, 6)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd3_table(num_steps=10):
    """SD3(.5)'s sampling table through the adapter: FlowMatchEulerDiscreteScheduler, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    adapter = SD3Adapter.__new__(SD3Adapter)
    adapter.noise_scheduler, adapter.pipe = sched, SimpleNamespace(scheduler=sched)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(num_steps)
    return sampling_table(adapter, num_steps), ref.sigmas.float()


# ----------------------------------------------------------------------------- loss.kl_form
def test_kl_form_flow_grpo_is_their_formula_and_gaussian_is_inverse_dt_times_it():
    """flow_grpo: ``((mean - mean_ref)**2).mean(dim=(1,2,3)) / (2 * std_dev_t**2)`` with
    ``std_dev_t = a sqrt(sigma / (1 - (sigma == 1 ? sigma_1 : sigma)))`` (no sqrt(dt)). Ours with the
    true std is 1/dt times it per step: 25, 21, 18, 15, 12, 9.5, 7.3, 5.4, 3.7, 112 on SD3's 10 steps."""
    table, sigmas = _sd3_table(10)
    n = table.num_steps
    kind = FlowSDEStep(0.7)
    co = table.coeffs(torch.arange(n))
    x, x0, eps, x0_ref = _rand(*SHAPE), _rand(*SHAPE, seed=1), _rand(*SHAPE, seed=2), _rand(*SHAPE, seed=3)
    mean = kind.mean(x, x0, eps, co)
    mean_ref = kind.mean(x, x0_ref, eps, co)

    sigma, sigma_max = sigmas[:n].view(-1, 1, 1, 1), float(sigmas[1])
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.tensor(sigma_max), sigma))) * 0.7
    theirs = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)).flatten()

    flow_grpo = gaussian_kl_same_std(mean, mean_ref, kind.kl_std(co, "flow_grpo"))
    gaussian = gaussian_kl_same_std(mean, mean_ref, kind.kl_std(co, "gaussian"))
    torch.testing.assert_close(flow_grpo, theirs, rtol=1e-5, atol=0)
    dt = (sigmas[:n] - sigmas[1:n + 1]).double()
    torch.testing.assert_close((gaussian / flow_grpo).double(), 1.0 / dt, rtol=1e-4, atol=0)
    # the measured table (two significant digits), and the 23x average
    assert (gaussian / flow_grpo).tolist() == pytest.approx([25, 21, 18, 15, 12, 9.5, 7.3, 5.4, 3.7, 112], rel=0.03)
    assert float((gaussian / flow_grpo).mean()) == pytest.approx(23, rel=0.01)


def test_kl_form_is_the_same_for_cps_and_g_for_dance():
    """flow_grpo's CPS ``std_dev_t`` is the true std (so both forms agree); DanceGRPO's diffusion is ``eta``."""
    table, _ = _sd3_table(6)
    co = table.coeffs(torch.arange(5))
    cps = CPSStep(0.8)
    torch.testing.assert_close(cps.kl_std(co, "flow_grpo"), cps.kl_std(co, "gaussian"))
    dance = DanceSDEStep(0.3)
    torch.testing.assert_close(dance.kl_std(co, "flow_grpo"), torch.full((5,), 0.3))
    torch.testing.assert_close(dance.kl_std(co, "gaussian"), 0.3 * (co.sigma - co.sigma_next).sqrt())
    with pytest.raises(ValueError, match="kl form"):
        cps.kl_std(co, "exact")


# ----------------------------------------------------------------------------- sampler.cps_logprob
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cps_flow_grpo_log_prob_is_negative_squared_error(reduction):
    """flow_grpo's ``sde_type == 'cps'``: ``std = sigma_prev sin(a pi/2)``, ``x0 = x - sigma v``,
    ``x1 = x + (1 - sigma) v``, ``mean = (1 - sigma_prev) x0 + sqrt(sigma_prev^2 - std^2) x1``,
    ``log_prob = -(x_next - mean)^2`` averaged (or, with ``sum``, summed) over the latent."""
    table, sigmas = _sd3_table(10)
    steps = torch.arange(9)  # the last step (sigma_prev = 0) is deterministic
    co = table.coeffs(steps)
    x, v, z = _rand(9, 4, 6, 6), _rand(9, 4, 6, 6, seed=1), _rand(9, 4, 6, 6, seed=2)
    kind = CPSStep(0.8, log_prob_form="flow_grpo")
    x0, eps = split_prediction(v, x, co.alpha, co.sigma, "flow")
    x_next, lp_sampled, _, _ = kind.sample(x, x0, eps, co, z, reduction)
    lp_recomputed = kind.log_prob(x_next, x, x0, eps, co, reduction)

    sigma, sigma_prev = sigmas[:9].view(-1, 1, 1, 1), sigmas[1:10].view(-1, 1, 1, 1)
    std = sigma_prev * math.sin(0.8 * math.pi / 2)
    ref_mean = (x - sigma * v) * (1 - sigma_prev) + (x + v * (1 - sigma)) * torch.sqrt(sigma_prev**2 - std**2)
    ref_next = ref_mean + std * z
    elem = -((ref_next - ref_mean) ** 2)
    ref_lp = elem.flatten(1).mean(1) if reduction == "mean" else elem.flatten(1).sum(1)
    torch.testing.assert_close(x_next, ref_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp_sampled, ref_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp_recomputed, lp_sampled, rtol=0, atol=1e-6)
    # the Gaussian form's log-ratio is theirs / (2 std^2): the clip ranges do not carry over
    gauss = CPSStep(0.8)
    other = x0 + 0.1 * _rand(9, 4, 6, 6, seed=4)
    d_theirs = kind.log_prob(x_next, x, other, eps, co) - kind.log_prob(x_next, x, x0, eps, co)
    d_ours = gauss.log_prob(x_next, x, other, eps, co) - gauss.log_prob(x_next, x, x0, eps, co)
    torch.testing.assert_close(d_theirs, d_ours * 2 * std.flatten() ** 2, rtol=1e-2, atol=1e-7)


# ----------------------------------------------------------------------------- sampler.sigma_schedule
def test_time_shift_table_is_dancegrpo_sd3_time_shift():
    """DanceGRPO: ``sigma_schedule = sd3_time_shift(shift, linspace(1, 0, N + 1))``; model timestep sigma * 1000."""
    n, shift = 10, 3.0
    u = torch.linspace(1, 0, n + 1)
    theirs = (shift * u) / (1 + (shift - 1) * u)
    table = time_shift_table(n, shift)
    torch.testing.assert_close(table.sigma, theirs[:-1])
    torch.testing.assert_close(table.sigma_next, theirs[1:])
    torch.testing.assert_close(table.alpha, 1 - theirs[:-1])
    torch.testing.assert_close(table.timesteps, theirs[:-1] * 1000)
    assert float(table.next_timesteps[-1]) < 0 and float(table.sigma_cap) == pytest.approx(float(theirs[1]))
    scheduler_table, _ = _sd3_table(n)
    gap = float((scheduler_table.sigma - table.sigma).abs().max())
    assert gap == pytest.approx(0.241, abs=1e-3)  # the 0.24 at N = 10: the two tables differ


# ----------------------------------------------------------------------------- schedule: which steps train
def _transitions(rows: int, steps: int) -> dict:
    return {"log_prob": torch.zeros(rows * steps), "step": torch.arange(steps).repeat(rows),
            "depth": torch.zeros(rows * steps, dtype=torch.long), "node": torch.arange(rows).repeat_interleave(steps)}


def test_dancegrpo_rule_random_int_of_n_minus_one_never_the_last():
    from diffalign.trainers.trajectory import select_fraction

    rows, n, f = 6, 10, 0.6
    trans = _transitions(rows, n)
    sel = select_fraction(trans, f, torch.Generator().manual_seed(0), exclude_step=n - 1, rounding="floor")
    per_row = [trans["step"][sel][trans["node"][sel] == r].tolist() for r in range(rows)]
    assert all(len(p) == int((n - 1) * f) for p in per_row)  # DanceGRPO: int(len(timesteps[:-1]) * f) = 5
    assert all(max(p) < n - 1 for p in per_row)
    assert len({tuple(p) for p in per_row}) > 1  # a random subset per row
    # f = 1 with the exclusion: every step but the last
    assert select_fraction(trans, 1.0, torch.Generator(), exclude_step=n - 1).numel() == rows * (n - 1)


@pytest.mark.parametrize("fraction", [0.99, 0.9, 0.7, 0.35])
def test_flow_grpo_rule_first_int_n_f_steps(fraction):
    from diffalign.trainers.trajectory import select_fraction

    rows, n = 3, 10
    trans = _transitions(rows, n)
    sel = select_fraction(trans, fraction, torch.Generator(), first=True)
    expected = list(range(int(n * fraction)))  # flow_grpo: range(int(num_steps * timestep_fraction))
    for r in range(rows):
        assert trans["step"][sel][trans["node"][sel] == r].tolist() == expected


# ----------------------------------------------------------------------------- advantage.std_ddof / eps
def test_std_ddof_one_is_dancegrpo_group_std_and_zero_is_flow_grpo():
    rewards = _rand(12)
    groups = torch.arange(3).repeat_interleave(4)
    dance = torch.cat([(g - g.mean()) / (g.std() + 1e-8) for g in rewards.split(4)])  # torch.std: unbiased
    torch.testing.assert_close(group_advantages(rewards, groups, "group", 1e-8, std_ddof=1), dance)
    flow = torch.cat([(g - g.mean()) / (g.std(unbiased=False) + 1e-4) for g in rewards.split(4)])  # np.std + 1e-4
    torch.testing.assert_close(group_advantages(rewards, groups, "group", 1e-4, std_ddof=0), flow)
    # flow_grpo's global_std: the group mean over the std of every reward (np.std, ddof 0)
    glob = torch.cat([g - g.mean() for g in rewards.split(4)]) / (rewards.std(unbiased=False) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, groups, "global", 1e-4), glob)
    ratio = group_advantages(rewards, groups, "group", 0.0, std_ddof=0) / group_advantages(rewards, groups, "group", 0.0,
                                                                                           std_ddof=1)
    torch.testing.assert_close(ratio, torch.full((12,), math.sqrt(4 / 3)))  # 1.155 at n = 4


def test_std_ddof_on_tree_depth_with_two_nodes_and_single_node_groups():
    """BranchGRPO: two nodes per group at a depth: the unbiased std is sqrt(2) (41%) larger; a depth
    with one node per group has zero advantage under both (no NaN from n - 1 = 0)."""
    leaf = torch.tensor([1.0, 2.0, 4.0, 7.0])
    groups = torch.zeros(4, dtype=torch.long)
    ancestors = [torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), torch.arange(4)]
    a0 = tree_advantages(leaf, groups, ancestors, "depth", "group", 1e-8, std_ddof=0)
    a1 = tree_advantages(leaf, groups, ancestors, "depth", "group", 1e-8, std_ddof=1)
    assert a0[0].tolist() == [0.0] and a1[0].tolist() == [0.0]
    v = torch.tensor([1.5, 5.5])
    torch.testing.assert_close(a1[1], (v - v.mean()) / (v.std() + 1e-8))
    torch.testing.assert_close(a0[1] / a1[1], torch.full((2,), math.sqrt(2)))


# ----------------------------------------------------------------------------- reward_on: x0_last
class _Velocity:
    """A fixed 'network' for the rollout engine: v = 0.5 x + 0.1 t/1000 (no weights)."""

    calls = rows = 0

    def __call__(self, x, t, prompt_index, net=None):
        return 0.5 * x + 0.1 * (t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("kind,equal", [(FlowSDEStep(0.7), False), (CPSStep(0.8), True)])
def test_rollout_records_the_last_steps_x0_prediction(kind, equal):
    """DanceGRPO scores ``pred_original_sample = latents - sigma v`` of the last step; after a
    deterministic last step to sigma = 0 (CPS) that is the final latent, after a noisy one it is not."""
    table, _ = _sd3_table(4)
    noise = _rand(3, 4, 6, 6)
    ro = rollout(_Velocity(), table, full_plan(4), kind, noise, torch.zeros(3, dtype=torch.long),
                 generator=torch.Generator().manual_seed(0))
    last = ro.transitions["step"] == 3
    x_last = ro.transitions["x"][last] if bool(last.any()) else None
    if x_last is None:  # CPS: the last step ran as an ODE step; its input is the previous step's output
        x_last = ro.transitions["x_next"][ro.transitions["step"] == 2]
    sigma = float(table.sigma[3])
    v = 0.5 * x_last + 0.1 * float(table.timesteps[3]) / 1000
    torch.testing.assert_close(ro.last_x0, x_last - sigma * v)
    assert torch.allclose(ro.final, ro.last_x0, atol=1e-6) == equal


# ----------------------------------------------------------------------------- in the trainer (tiny models)
from pathlib import Path  # noqa: E402

from diffalign.config import ConfigError, load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
SMALL = ("max_steps=2", "sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2", "train_batch_size=4",
         "eval.num_prompts=2", "sampler.eval_num_steps=4")


def _run(model_dir, out, *overrides):
    import json

    from diffalign.trainers.online import train_online

    cfg = load_config(CONFIGS / "grpo.yaml", [f"model={model_dir}", f"output_dir={out}", *overrides])
    train_online(cfg)
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_reference_conventions_train_on_policy_with_a_watched_eval_reward(tiny_model, tmp_path, monkeypatch):
    """DanceGRPO's table, step rule, std and x0 reward with flow_grpo's KL form, an eval-only reward:
    on-policy log-probs, KL 0 at the reference, int((N - 1) f) steps per sample, the last step's
    x0-prediction scored (not the final latent), the watched reward logged."""
    import diffalign.trainers.online as online

    rollouts, scored = [], []
    real_rollout, real_score = online.rollout, online.score_images
    monkeypatch.setattr(online, "rollout", lambda *a, **k: rollouts.append(real_rollout(*a, **k)) or rollouts[-1])
    monkeypatch.setattr(online, "score_images", lambda adapter, latents, *a: scored.append(latents) or real_score(adapter, latents, *a))
    rows = _run(tiny_model("sd3"), tmp_path, *SMALL, "loss.kl_beta=0.05", "loss.kl_form=flow_grpo",
                "sampler.sigma_schedule=time_shift", "reward_on=x0_last", "schedule.exclude_last_step=true",
                "schedule.timestep_rounding=floor", "schedule.timestep_fraction=0.6", "advantage.std_ddof=1",
                "advantage.eps=1e-8", "prompt_sampling=epoch", "eval.rewards=[{name: contrast}]")
    assert all(r["logprob_mismatch"] < 1e-4 for r in rows)
    assert rows[0]["kl"] < 1e-6 and rows[-1]["kl"] > 0
    assert all(r["transitions"] == 4 * int((3 - 1) * 0.6) for r in rows)
    assert "eval_reward/contrast" in rows[-1] and "eval_reward_mean" in rows[-1]
    assert torch.equal(scored[0], rollouts[0].last_x0) and not torch.allclose(scored[0], rollouts[0].final)
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000


def test_cps_flow_grpo_log_prob_is_on_policy_in_the_trainer(tiny_model, tmp_path):
    rows = _run(tiny_model("sd3"), tmp_path, *SMALL, "max_steps=1", "eval.every=-1", "sampler.step=cps",
                "sampler.cps_logprob=flow_grpo", "loss.clip_range=1e-5")
    assert rows[0]["logprob_mismatch"] < 1e-6


def test_zero_advantage_transitions_are_dropped(tiny_model, tmp_path, monkeypatch):
    """flow_grpo filters samples whose advantages are all zero: a constant reward leaves nothing to train."""
    import diffalign.trainers.online as online

    monkeypatch.setattr(online, "resolve_reward", lambda name, args=None, device=None: lambda images, *a, **k: torch.zeros(len(images)))
    kept = _run(tiny_model("sd3"), tmp_path / "a", *SMALL, "max_steps=1", "eval.every=-1")
    dropped = _run(tiny_model("sd3"), tmp_path / "b", *SMALL, "max_steps=1", "eval.every=-1",
                   "advantage.drop_zero_advantage=true")
    assert kept[0]["transitions"] == 4 * 3 and dropped[0]["transitions"] == 0
    assert "grad_norm" in kept[0] and "grad_norm" not in dropped[0]  # no update without transitions


def _recipe(model_dir, out, *overrides):
    from diffalign.trainers.online import OnlineRecipe

    cfg = load_config(CONFIGS / "grpo.yaml", [f"model={model_dir}", f"output_dir={out}", "prompts_per_step=4", *overrides])
    return OnlineRecipe(cfg).setup()


def test_prompt_sampling_distinct_and_epoch_over_ranks(tiny_model, tmp_path):
    recipe = _recipe(tiny_model("sd3"), tmp_path, "prompt_sampling=distinct", "sampler.sigma_schedule=time_shift")
    torch.testing.assert_close(recipe.table.sigma, time_shift_table(4, 3.0).sigma)  # the option reaches the rollouts
    n = len(recipe.prompts)
    ranks = [SimpleNamespace(process_index=r, num_processes=2) for r in range(2)]

    def picks(step):
        out = []
        for acc in ranks:
            recipe.accelerator = acc
            out.append(recipe.prompt_indices(step))
        return out

    for step in (1, 2, 3):  # distinct: 8 different prompts per step over both ranks, fresh each step
        a, b = picks(step)
        assert len(set(a + b)) == 8
        assert picks(step) == [a, b]  # a function of (seed, step): the same after a resume
    assert picks(1) != picks(2)
    recipe.cfg.prompt_sampling = "epoch"
    per_step = 8
    epoch0 = [i for s in range(1, n // per_step + 1) for i in sum(picks(s), [])]
    epoch1 = [i for s in range(n // per_step + 1, 2 * n // per_step + 1) for i in sum(picks(s), [])]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))  # each prompt once per epoch
    assert epoch0 != epoch1  # reshuffled


def test_time_shift_needs_a_flow_model(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="sampler.sigma_schedule"):
        _recipe(tiny_model("sd15"), tmp_path, "sampler.sigma_schedule=time_shift")


@pytest.mark.parametrize("overrides,key", [
    (["sampler.cps_logprob=flow_grpo"], "sampler.cps_logprob"),  # the default step is not cps
    (["sampler.step=cps", "sampler.cps_logprob=flow_grpo", "loss.ratio_norm=true"], "loss.ratio_norm"),
    (["loss.kl_form=exact"], "loss.kl_form"),
    (["advantage.std_ddof=2"], "advantage.std_ddof"),
    (["schedule.timestep_rounding=ceil"], "schedule.timestep_rounding"),
    (["sampler.sigma_schedule=karras"], "sampler.sigma_schedule"),
    (["sampler.shift=0"], "sampler.shift"),
    (["reward_on=latent"], "reward_on"),
    (["prompt_sampling=shuffle"], "prompt_sampling"),
    (["eval.rewards=[{name: a}, {name: a}]"], "eval.rewards"),
])
def test_convention_options_reject_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "grpo.yaml", ["model=m", *overrides])


def test_reward_curve_plots_watched_rewards_beside_the_training_reward(tmp_path):
    from PIL import Image

    from diffalign.trainers.plots import save_reward_curve

    rows = [{"step": s, "reward_mean": 0.1 * s, "reward_std": 0.01,
             **({"eval_reward_mean": 0.1 * s, "eval_reward/hpsv2": 0.3 - 0.01 * s} if s % 2 == 0 else {})}
            for s in range(1, 7)]
    save_reward_curve(rows, tmp_path / "train_only.png")
    save_reward_curve(rows, tmp_path / "watched.png", ["hpsv2"])
    w_train, w_watched = Image.open(tmp_path / "train_only.png").width, Image.open(tmp_path / "watched.png").width
    assert w_watched > 1.5 * w_train  # a second panel beside the training curve
