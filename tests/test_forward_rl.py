"""DiffusionNFT and AWM: the losses against the papers' formulas written out here, their gradient
directions, the trainer's timestep draws (against the releases' rules), the old-policy decay, AWM's
loss types and EMA-KL term, and the configs' checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.losses.forward import (awm_log_prob, awm_policy_loss, kl_ema_decay, nft_loss, nft_optimality,
                                      old_policy_decay, velocity_kl)
from diffalign.trainers.forward_process import draw_train_steps
from diffalign.trainers.forward_config import ForwardOptions

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
RECIPES = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "recipes"


def _flow_batch(seed=0, b=5, shape=(4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((b, *shape), generator=g)
    eps = torch.randn((b, *shape), generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    v_theta = (eps - x0) + 0.3 * torch.randn((b, *shape), generator=g)
    v_old = (eps - x0) + 0.3 * torch.randn((b, *shape), generator=g)
    return x0, eps, sigma, s, x_t, v_theta, v_old


def _nft_reference(x_t, s, x0, v_theta, v_old, r, beta):
    """Velocity-space DiffusionNFT loss as the paper/release state it (per sample)."""
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    out = []
    for v in (v_pos, v_neg):
        x0_hat = x_t - s * v
        w = (x0_hat - x0).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5)
        out.append(((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)) / w)
    return (r * out[0] + (1 - r) * out[1]) / beta


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_equals_the_velocity_space_formula(beta):
    x0, eps, sigma, s, x_t, v_theta, v_old = _flow_batch()
    adv = torch.tensor([-7.0, -2.5, 0.0, 1.0, 9.0])
    r = nft_optimality(adv, 5.0)
    assert torch.allclose(r, torch.tensor([0.0, 0.25, 0.5, 0.6, 1.0]))
    ours, _ = nft_loss(x_t - s * v_theta, x_t - s * v_old, x0, r, beta)
    ref = _nft_reference(x_t, s, x0, v_theta, v_old, r, beta)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_nft_gradient_moves_towards_positive_and_away_from_negative_samples():
    x0, eps, sigma, s, x_t, _, v_old = _flow_batch(1)
    x0_old = x_t - s * v_old
    err = lambda x: ((x - x0) ** 2).mean()  # noqa: E731
    for r_value, sign in ((1.0, -1), (0.0, +1)):
        x0_theta = x0_old.clone().requires_grad_(True)
        loss, _ = nft_loss(x0_theta, x0_old, x0, torch.full((5,), r_value), 1.0)
        loss.mean().backward()
        stepped = x0_theta.detach() - 1e-2 * x0_theta.grad
        assert sign * (err(stepped) - err(x0_old)) > 0
    # r = 1/2 at the old policy: positive and negative terms cancel exactly
    x0_theta = x0_old.clone().requires_grad_(True)
    nft_loss(x0_theta, x0_old, x0, torch.full((5,), 0.5), 1.0)[0].mean().backward()
    assert x0_theta.grad.abs().max() < 1e-6


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
def test_awm_log_prob_equals_the_release_weightings(weighting):
    x0, eps, sigma, s, x_t, v, _ = _flow_batch(2)
    e = ((v.double() - (eps.double() - x0.double())) ** 2).mean(dim=(1, 2, 3))
    t = sigma.double()
    p = 0.25
    ref = {
        "uniform": -e, "t": -e * t, "t2": -e * t * t, "huber": -(torch.sqrt(e + 1e-10) - 1e-5) * t,
        "ghuber": -((e + 1e-10) ** p - 1e-10**p) * t / p,
    }[weighting]
    assert torch.allclose(awm_log_prob(v, eps, x0, sigma, weighting, p).double(), ref, rtol=1e-6, atol=1e-7)


def test_awm_positive_advantage_lowers_the_flow_matching_error():
    from diffalign.losses.grpo import grpo_clip_loss

    x0, eps, sigma, s, x_t, v, _ = _flow_batch(3)
    fm = lambda v_: ((v_ - (eps - x0)) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    for adv, sign in ((1.0, -1), (-1.0, +1)):
        vv = v.clone().requires_grad_(True)
        lp = awm_log_prob(vv, eps, x0, sigma, "uniform")
        loss, _ = grpo_clip_loss(lp, lp.detach(), torch.full((5,), adv), 1.0)
        loss.backward()
        stepped = vv.detach() - 1e-2 * vv.grad
        assert torch.all(sign * (fm(stepped) - fm(v)) > 0)


def test_velocity_kl_and_old_policy_decay():
    a, b = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    assert torch.allclose(velocity_kl(a, b), ((a - b) ** 2).mean(dim=(1, 2, 3)))
    # DiffusionNFT's decay_type 1 and 2
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 10, 499, 500, 2000)] == [0.0, 0.01, 0.499, 0.5, 0.5]
    assert old_policy_decay(74, 0.0075, 0.999, 75) == 0.0
    assert old_policy_decay(175, 0.0075, 0.999, 75) == pytest.approx(0.75)
    assert old_policy_decay(10_000, 0.0075, 0.999, 75) == 0.999


def test_timestep_draws():
    g = torch.Generator().manual_seed(0)
    per = draw_train_steps(200, 10, ForwardOptions(train_timesteps=4, timestep_fraction=0.9, fraction_mode="range"), g)
    assert per.shape == (200, 4) and int(per.min()) >= 0 and int(per.max()) <= 8
    assert all(len(set(row.tolist())) == 4 for row in per)  # distinct per sample
    assert len({tuple(r.tolist()) for r in per}) > 50  # and different between samples
    strat = draw_train_steps(6, 14, ForwardOptions(train_timesteps=6, timestep_fraction=0.9, skip_first_step=True,
                                                   timestep_draw="stratified"), g)
    assert torch.equal(strat, strat[:1].expand_as(strat))  # shared by the batch (AWM)
    bounds = torch.linspace(1, 12, 7).long()
    row = strat[0]
    assert all(int(bounds[i]) <= int(row[i]) < max(int(bounds[i + 1]), int(bounds[i]) + 1) for i in range(6))
    every = draw_train_steps(3, 10, ForwardOptions(), g)
    assert sorted(every[0].tolist()) == list(range(10))


def test_nft_recipe_draws_the_release_per_sample_shuffle_of_the_whole_table():
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py: every sample gets its own random permutation
    of all N table steps and trains the first int(N * timestep_fraction) of it. So with N = 10 and
    0.99 each sample trains 9 distinct steps, the one left out is uniform over all 10: every step,
    the last (9) included, is trained by 9 of 10 samples and makes 1/10 of the trained rows."""
    cfg = load_config(RECIPES / "sd35_nft_pickscore.yaml", [])
    n, f = cfg.sampler.num_steps, cfg.forward.timestep_fraction
    assert (n, f) == (10, 0.99)
    k = int(n * f)
    draws = 20_000
    steps = draw_train_steps(draws, n, cfg.forward, torch.Generator().manual_seed(1))
    assert steps.shape == (draws, k) and int(steps.min()) == 0 and int(steps.max()) == n - 1
    assert all(len(set(row)) == k for row in steps.tolist())  # distinct steps per sample
    # per step: the share of samples training it, k / n = 0.9 (binomial sd 0.002 at 20000 draws)
    trained = torch.zeros(draws, n).scatter_(1, steps, 1.0)
    assert torch.allclose(trained.mean(0), torch.full((n,), k / n), atol=0.01), trained.mean(0)
    # and the share of trained rows at step 9: 1 / n
    assert float((steps == n - 1).float().mean()) == pytest.approx(1 / n, abs=0.005)
    # the step left out of a sample is uniform over the table (each 9-subset equally likely)
    left_out = (1.0 - trained).argmax(dim=1)
    assert torch.allclose(torch.bincount(left_out, minlength=n).float() / draws, torch.full((n,), 1 / n), atol=0.01)
    # the same statistics from the release's rule run directly (torch.randperm per sample)
    g = torch.Generator().manual_seed(2)
    release = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(draws)])
    rel = torch.zeros(draws, n).scatter_(1, release, 1.0).mean(0)
    assert torch.allclose(trained.mean(0), rel, atol=0.015)
    # fraction_mode range is the rule this recipe used before: step 9 never trained
    rng = draw_train_steps(2_000, n, ForwardOptions(timestep_fraction=f, fraction_mode="range"),
                           torch.Generator().manual_seed(3))
    assert rng.shape == (2_000, 9) and int(rng.max()) == 8


def test_per_sample_count_mode_counts_the_fraction_of_the_table():
    g = torch.Generator().manual_seed(0)
    # 10 steps x 0.6 -> 6 distinct steps per sample, drawn from all 10
    st = draw_train_steps(4_000, 10, ForwardOptions(timestep_fraction=0.6), g)
    assert st.shape == (4_000, 6) and set(st.unique().tolist()) == set(range(10))
    # train_timesteps sets the count itself; skip_first_step removes step 0 from the pool
    st = draw_train_steps(2_000, 10, ForwardOptions(train_timesteps=3, skip_first_step=True), g)
    assert st.shape == (2_000, 3) and set(st.unique().tolist()) == set(range(1, 10))
    # stratified draws always cover the range [first, int(N f)), whatever fraction_mode says
    strat = draw_train_steps(2, 14, ForwardOptions(train_timesteps=6, timestep_fraction=0.9, timestep_draw="stratified",
                                                   fraction_mode="count"), g)
    assert int(strat.max()) < 12


def test_kl_ema_decay_is_the_release_linear_schedule():
    """scxue/advantage_weighted_matching scripts/train_sd3_awm.py: after each epoch's update the
    EMA-KL anchor decays by min(kl_ema_decay, 0.001 * global_step) ('linear') or kl_ema_decay
    ('constant'); the SD3.5 configs use linear with kl_ema_decay 0.3."""
    steps = [0, 1, 10, 150, 299, 300, 301, 5_000]
    assert [kl_ema_decay(s, 0.3) for s in steps] == pytest.approx([min(0.3, 0.001 * s) for s in steps])
    assert [kl_ema_decay(s, 0.3) for s in (0, 150, 300, 5_000)] == pytest.approx([0.0, 0.15, 0.3, 0.3])
    assert kl_ema_decay(7, 0.3, "constant") == 0.3
    assert kl_ema_decay(100, 0.5, "linear", rate=0.002) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        kl_ema_decay(1, 0.3, "cosine")


def _sum_first_reference(lp, old, adv, samples, clip):
    """The release's sum_first written out per sample: average a sample's log-probs over its
    timesteps, one ratio per sample, the clipped surrogate, the mean over samples."""
    losses = []
    for s in sorted(set(samples.tolist())):
        m = samples == s
        ratio = torch.exp(lp[m].mean() - old[m].mean())
        a = adv[m][0]
        losses.append(torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip)))
    return torch.stack(losses).mean()


def test_awm_sum_first_against_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    n, k, clip = 5, 3, 0.2
    samples = torch.arange(n).repeat_interleave(k)
    order = torch.randperm(n * k, generator=g)  # rows in any order
    samples = samples[order]
    adv = torch.randn(n, generator=g)[samples]
    old = torch.randn(n * k, generator=g) * 0.1
    lp = (old + torch.randn(n * k, generator=g) * 0.3).requires_grad_(True)
    ours, metrics = awm_policy_loss(lp, old, adv, clip, "sum_first", samples)
    lp_ref = lp.detach().clone().requires_grad_(True)
    ref = _sum_first_reference(lp_ref, old, adv, samples, clip)
    assert torch.allclose(ours, ref, atol=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(lp.grad, lp_ref.grad, atol=1e-6)
    assert metrics["ratio_mean"].shape == ()
    # exp_first (one ratio per row) is a different objective off-policy ...
    exp_first, _ = awm_policy_loss(lp.detach(), old, adv, clip, "exp_first")
    assert not torch.allclose(exp_first, ours.detach(), atol=1e-4)
    # ... and the same value and gradient on-policy (old = lp)
    a = lp.detach().clone().requires_grad_(True)
    b = lp.detach().clone().requires_grad_(True)
    la, _ = awm_policy_loss(a, a.detach(), adv, clip, "sum_first", samples)
    lb, _ = awm_policy_loss(b, b.detach(), adv, clip, "exp_first")
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb) and torch.allclose(a.grad, b.grad, atol=1e-7)


def _awm_recipe(tiny_model, tmp_path, *overrides):
    from diffalign.trainers.online import OnlineRecipe

    cfg = load_config(CONFIGS / "awm.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", "sampler.resolution=16",
                                             "eval.every=-1", *overrides])
    return OnlineRecipe(cfg).setup()


def test_awm_ema_kl_term_and_anchor_decay(tiny_model, tmp_path):
    """The EMA-KL term is ema_beta * mean over rows of mean((v_theta - v_ema)^2), v_ema the
    network with the anchor's weights (checked on a separate copy of the network), and the anchor
    decays towards the trained weights by the linear schedule."""
    import copy

    from diffalign.pipelines import GuidedModel
    from diffalign.trainers.forward_process import ImageAdvantages, NoisedRows
    from diffalign.trainers.strategy import StepRewards

    recipe = _awm_recipe(tiny_model, tmp_path, "awm.ema_beta=0.5", "forward.kl_beta=0")
    strategy = recipe.strategy
    assert strategy.kl_ema_params is not None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the trained weights move away from the anchor
        for p in recipe.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    anchor = [e.clone() for e in strategy.kl_ema_params]
    assert any(not torch.equal(a, p) for a, p in zip(anchor, recipe.params))
    model = GuidedModel(recipe.adapter, recipe.adapter.encode_prompt(["a red cube", "a blue ball"]), recipe.uncond,
                        recipe.cfg.sampler.guidance_scale)
    shape = recipe.latent_shape
    groups = torch.tensor([0, 0, 1, 1])
    adv = ImageAdvantages(StepRewards({}, groups, torch.zeros(4), []), torch.randn((4, *shape), generator=g),
                          torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, -1.0, 0.5, -0.5]))
    rows = NoisedRows(torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor([1, 2, 3, 1, 3, 2]), torch.randn((6, *shape), generator=g))
    with torch.no_grad():
        on, metrics = strategy.rows_loss(model, adv, rows)
        strategy.kl_ema_params, kept = None, strategy.kl_ema_params
        off, _ = strategy.rows_loss(model, adv, rows)
        strategy.kl_ema_params = kept
        # independent v_theta and v_ema: the trained network and a copy holding the anchor weights
        _, x_t, _, t, prompt = strategy._noised(adv, rows)
        v = model(x_t, t, prompt, recipe.policy.module)
        twin = copy.deepcopy(recipe.policy.module)
        for q, a in zip([q for q in twin.parameters() if q.requires_grad], anchor):
            q.copy_(a)
        v_ema = model(x_t, t, prompt, twin)
    expected = ((v - v_ema) ** 2).mean(dim=(1, 2, 3)).mean()
    assert float(expected) > 0
    assert float(metrics["ema_kl"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(on - off) == pytest.approx(0.5 * float(expected), rel=1e-4)
    assert all(torch.equal(a, p) for a, p in zip(anchor, strategy.kl_ema_params))  # swapped back, untouched
    # the anchor's decay after an update: d = min(0.3, 0.001 * updates taken)
    strategy.optimizer_steps = 120
    strategy._decay_kl_ema()
    d = min(0.3, 0.001 * 120)
    for a, e, p in zip(anchor, strategy.kl_ema_params, recipe.params):
        assert torch.allclose(e, d * a + (1 - d) * p.detach(), atol=1e-7)


def test_awm_trains_with_ema_kl_and_sum_first(tiny_model, tmp_path):
    import json

    from diffalign.trainers import train

    recipe_off = load_config(CONFIGS / "awm.yaml", ["model=M"])
    assert recipe_off.awm.ema_beta == 0 and recipe_off.awm.loss_type == "exp_first"
    cfg = load_config(CONFIGS / "awm.yaml", [f"model={tiny_model('sd3')}", f"output_dir={tmp_path}", "sampler.resolution=16",
                                             "max_steps=2", "eval.every=-1", "awm.ema_beta=1.0", "awm.loss_type=sum_first",
                                             "updates_per_epoch=2", "train_batch_size=4"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["ema_kl"] >= 0 for r in rows)
    assert [r["kl_ema_decay"] for r in rows] == pytest.approx([0.002, 0.004])  # 2 updates per step


@pytest.mark.parametrize("overrides,key", [
    (["sampler.shared_noise=true"], "sampler.shared_noise"),
    (["forward.timestep_fraction=0.05"], "forward.timestep_fraction"),
    (["forward.train_timesteps=9", "forward.timestep_fraction=0.5"], "forward.train_timesteps"),
    (["nft.beta=0"], "nft.beta"),
    (["awm.weighting=cubic"], "awm.weighting"),
    (["awm.loss_type=sum_all"], "awm.loss_type"),
    (["awm.loss_type=sum_first", "train_batch_size=3"], "train_batch_size"),
    (["awm.kl_ema_decay_type=cosine"], "awm.kl_ema_decay_type"),
    (["awm.kl_ema_decay=1.0"], "awm.kl_ema_decay"),
    (["awm.ema_beta=-1"], "awm.ema_beta"),
    (["forward.fraction_mode=first"], "forward.fraction_mode"),
])
def test_bad_forward_configs_name_the_key(overrides, key):
    path = CONFIGS / ("awm.yaml" if any(o.startswith("awm.") for o in overrides) else "nft.yaml")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, ["model=M", *overrides])
