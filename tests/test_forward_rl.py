"""DiffusionNFT and AWM: the losses against the papers' formulas written out here, their gradient
directions, the trainer's timestep draws and old-policy decay, and the configs' checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.losses.forward import awm_log_prob, nft_loss, nft_optimality, old_policy_decay, velocity_kl
from diffalign.trainers.forward import draw_train_steps
from diffalign.trainers.forward_config import ForwardOptions

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"


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
    per = draw_train_steps(200, 10, ForwardOptions(train_timesteps=4, timestep_fraction=0.9), g)
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


@pytest.mark.parametrize("overrides,key", [
    (["sampler.shared_noise=true"], "sampler.shared_noise"),
    (["forward.timestep_fraction=0.05"], "forward.timestep_fraction"),
    (["forward.train_timesteps=9", "forward.timestep_fraction=0.5"], "forward.train_timesteps"),
    (["nft.beta=0"], "nft.beta"),
    (["awm.weighting=cubic"], "awm.weighting"),
])
def test_bad_forward_configs_name_the_key(overrides, key):
    path = CONFIGS / ("awm.yaml" if any(o.startswith("awm.") for o in overrides) else "nft.yaml")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, ["model=M", *overrides])
