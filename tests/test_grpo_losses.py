"""GRPO losses and advantages: signs, gradient directions, clipping, KL, trees (pure, fast)."""

from __future__ import annotations

import pytest
import torch

from diffalign.losses import gaussian_kl_same_std, gaussian_log_prob, grpo_clip_loss, ratio_norm_log_ratio
from diffalign.trainers.advantages import (
    group_advantages, rollout_advantages, tree_advantages, zero_std_group_fraction,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_advantage_sign_sets_log_prob_direction(sign):
    """One gradient step on the loss raises log p of a positive-advantage sample, lowers a negative one."""
    x = _rand(4, 2, 3, 3)
    mean = _rand(4, 2, 3, 3, seed=1).requires_grad_(True)
    std = torch.full((4,), 0.5)
    lp0 = gaussian_log_prob(x, mean, std)
    adv = torch.full((4,), sign)
    loss, _ = grpo_clip_loss(lp0, lp0.detach(), adv, clip_range=0.2)
    loss.backward()
    with torch.no_grad():
        lp1 = gaussian_log_prob(x, mean - 0.01 * mean.grad, std)
    assert bool(((lp1 - lp0.detach()) * sign > 0).all())
    # on-policy the gradient is -A * grad(log p) / N (REINFORCE)
    mean.grad = None
    lp = gaussian_log_prob(x, mean, std)
    (g_ref,) = torch.autograd.grad((-(adv * lp)).mean(), mean)
    lp = gaussian_log_prob(x, mean, std)
    (g,) = torch.autograd.grad(grpo_clip_loss(lp, lp.detach(), adv, 0.2)[0], mean)
    torch.testing.assert_close(g, g_ref)


def test_clipping_stops_gradient_only_past_the_clip_in_the_advantage_direction():
    logp = torch.zeros(4, requires_grad=True)
    old = torch.tensor([-0.5, -0.5, 0.5, 0.5])  # ratios e^0.5 (above 1+eps), e^-0.5 (below 1-eps)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, m = grpo_clip_loss(logp, old, adv, clip_range=0.2)
    loss.backward()
    g = logp.grad
    assert g[0] == 0  # ratio high, A > 0: clipped
    assert g[1] != 0  # ratio high, A < 0: still pushed down
    assert g[2] != 0  # ratio low, A > 0: still pushed up
    assert g[3] == 0  # ratio low, A < 0: clipped
    assert float(m["clip_fraction"]) == 1.0
    assert float(m["approx_kl"]) == pytest.approx(0.5 * 0.25)


def test_weights_scale_per_transition_loss():
    logp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0])
    w = torch.tensor([0.0, 1.0, 2.0])
    loss, _ = grpo_clip_loss(logp, logp.detach(), adv, 0.1, weights=w)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w / 3)


def test_kl_zero_when_model_is_reference_and_pulls_towards_it():
    mean = _rand(3, 2, 4, 4).requires_grad_(True)
    std = torch.tensor([0.1, 0.2, 0.3])
    assert float(gaussian_kl_same_std(mean, mean.detach(), std).abs().max()) == 0.0
    ref = torch.zeros_like(mean)
    kl = gaussian_kl_same_std(mean, ref, std)
    torch.testing.assert_close(kl, (mean.detach() ** 2).flatten(1).mean(1) / (2 * std**2))
    lp = torch.zeros(3, requires_grad=True)
    loss, m = grpo_clip_loss(lp, lp.detach(), torch.zeros(3), 0.1, kl=kl, kl_beta=0.5)
    loss.backward()
    # gradient of the KL term points away from the reference: a descent step moves towards it
    assert float((mean.grad * mean.detach()).sum()) > 0
    assert "kl" in m


def test_ratio_norm_removes_shift_and_scales_by_std():
    old_mean = _rand(5, 2, 3, 3)
    d = 0.05 * _rand(5, 2, 3, 3, seed=1)
    z = _rand(5, 2, 3, 3, seed=2)
    std = torch.tensor([0.01, 0.1, 0.3, 1.0, 2.0])
    x = old_mean + std.view(-1, 1, 1, 1) * z
    old = gaussian_log_prob(x, old_mean, std)
    new = gaussian_log_prob(x, old_mean + d, std)
    lr = ratio_norm_log_ratio(new, old, old_mean + d, old_mean, std)
    torch.testing.assert_close(lr, (z * d).flatten(1).mean(1), rtol=1e-3, atol=1e-6)
    assert float(ratio_norm_log_ratio(old, old, old_mean, old_mean, std).abs().max()) == 0.0


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_normalise_within_groups():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 4.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    a = group_advantages(r, g, eps=0.0 + 1e-8)
    torch.testing.assert_close(a[:3], torch.tensor([-1.2247, 0.0, 1.2247]), rtol=1e-3, atol=1e-3)
    assert float(a[3:6].abs().max()) == 0.0  # zero-std group: no signal
    torch.testing.assert_close(a[6:], torch.tensor([-1.0, 1.0]))
    assert zero_std_group_fraction(r, g) == pytest.approx(1 / 3)
    glob = group_advantages(r, g, std="global")
    torch.testing.assert_close(glob[6:], torch.tensor([-2.0, 2.0]) / (r.std(unbiased=False) + 1e-4))
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), torch.zeros(4, dtype=torch.long), clip=1.5)
    assert float(clipped.max()) == 1.5
    torch.testing.assert_close(group_advantages(r, g, std="none")[6:], torch.tensor([-2.0, 2.0]))


def test_tree_advantages_depthwise_and_leaf():
    # one tree: root -> 2 children -> 2 leaves each (leaves 0,1 under child 0; 2,3 under child 1)
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0])
    groups = torch.zeros(4, dtype=torch.long)
    anc = [torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), torch.arange(4)]
    depth = tree_advantages(rewards, groups, anc, "depth", eps=1e-8)
    assert depth[0].tolist() == [0.0]  # the shared root step carries no signal
    torch.testing.assert_close(depth[1], torch.tensor([-1.0, 1.0]))  # node values 2, 6
    torch.testing.assert_close(depth[2], group_advantages(rewards, groups, eps=1e-8))
    leaf = tree_advantages(rewards, groups, anc, "leaf", eps=1e-8)
    la = group_advantages(rewards, groups, eps=1e-8)
    torch.testing.assert_close(leaf[1], torch.stack([la[:2].mean(), la[2:].mean()]))
    torch.testing.assert_close(leaf[0], torch.zeros(1), atol=1e-6, rtol=0)
    # no branching: equals plain group advantages
    flat = tree_advantages(rewards, torch.tensor([0, 0, 1, 1]), [torch.arange(4)])
    torch.testing.assert_close(flat[0], group_advantages(rewards, torch.tensor([0, 0, 1, 1])))


def test_multi_reward_modes():
    g = torch.tensor([0, 0, 0, 0])
    r1 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    r2 = torch.tensor([300.0, 200.0, 100.0, 0.0])  # another scale
    w = {"a": 1.0, "b": 0.01}
    (ws,), combined = rollout_advantages({"a": r1, "b": r2}, w, g, multi_reward="weighted_sum")
    torch.testing.assert_close(combined, r1 + 0.01 * r2)
    assert float(ws.abs().max()) < 1e-3  # the weighted sum is constant here
    (sa,), _ = rollout_advantages({"a": r1, "b": r2}, w, g, multi_reward="sum_of_advantages")
    torch.testing.assert_close(sa, group_advantages(r1, g) + 0.01 * group_advantages(r2, g))
    (cl,), _ = rollout_advantages({"a": r1}, {"a": 1.0}, g, clip=0.5)
    assert float(cl.abs().max()) == 0.5


def test_select_fraction_keeps_a_fraction_of_each_row():
    from diffalign.trainers.trajectory import select_fraction

    n_rows, n_steps = 6, 10
    trans = {"log_prob": torch.zeros(n_rows * n_steps), "depth": torch.zeros(n_rows * n_steps, dtype=torch.long),
             "node": torch.arange(n_rows).repeat(n_steps)}
    sel = select_fraction(trans, 0.6, torch.Generator().manual_seed(0))
    counts = torch.bincount(trans["node"][sel], minlength=n_rows)
    assert counts.tolist() == [6] * n_rows
    assert len(set(sel.tolist())) == sel.numel()
    assert select_fraction(trans, 1.0, torch.Generator()).numel() == n_rows * n_steps


def test_select_fraction_first_keeps_the_earliest_steps_of_each_row():
    """flow_grpo's convention: the first int(n * f) steps of each trajectory, never the last."""
    from diffalign.trainers.trajectory import select_fraction

    n_rows, n_steps = 4, 10
    # transitions stored step-major (as the rollout records them): step i of every row, then i + 1
    step = torch.arange(n_steps).repeat_interleave(n_rows)
    trans = {"log_prob": torch.zeros(n_rows * n_steps), "depth": torch.zeros(n_rows * n_steps, dtype=torch.long),
             "node": torch.arange(n_rows).repeat(n_steps), "step": step}
    sel = select_fraction(trans, 0.35, torch.Generator().manual_seed(0), first=True)
    for r in range(n_rows):
        mine = sel[trans["node"][sel] == r]
        assert sorted(step[mine].tolist()) == [0, 1, 2]  # int(10 * 0.35) = 3: steps 0, 1, 2
    assert select_fraction(trans, 0.01, torch.Generator(), first=True).numel() == n_rows  # at least one per row
