"""BranchGRPO's width and depth pruning of tree transitions, against the reference's procedure written out
(Fredreic1849/BranchGRPO train_branchgrpo_flux.py, described in diffalign.trainers.tree_pruning), and the
advantages of what is left against an independent depth-wise computation. No model weights (fast)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffalign.pipelines import SamplingTable, make_step_kind, rollout, tree_plan
from diffalign.trainers.strategy import StepRollout, step_rewards
from diffalign.trainers.grpo_config import GRPOConfig, RewardSpec, SamplerOptions, ScheduleOptions, TreeOptions
from diffalign.trainers.trajectory import TrajectoryStrategy
from diffalign.trainers.tree_pruning import pruned_depth_steps, tree_pruning_mask

STEPS, BRANCH_STEPS = 8, [0, 3]


class _ToyFlowModel:
    def __init__(self):
        self.calls = self.rows = 0

    def __call__(self, x, t, prompt_index, net=None):
        self.calls += 1
        self.rows += x.shape[0]
        return 0.8 * x - (1 - t.float().view(-1, 1, 1, 1) / 1000) * torch.tanh(x.flip(-1)) + 0.1 * prompt_index.view(-1, 1, 1, 1)


def _table(n=STEPS, shift=3.0):
    t = torch.linspace(1, 0, n + 1)
    s = shift * t / (1 + (shift - 1) * t)
    nxt = torch.where(s[1:] > 0, s[1:] * 1000, torch.full((n,), -1.0))
    return SamplingTable("flow", s[:-1] * 1000, nxt, 1 - s[:-1], s[:-1], 1 - s[1:], s[1:], float(s[1]))


def _tree_rollout(roots=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(roots, 4, 4, 4, generator=g)
    return rollout(_ToyFlowModel(), _table(), tree_plan(STEPS, BRANCH_STEPS, 2, split_noise_scale=4.0), make_step_kind("flow_sde"),
                   noise, torch.arange(roots), g)


def _reference_keep(tr, advantage, pruned_depths, mode, ratio):
    """BranchGRPO's filtering of its training_samples: drop child depths (= step + 1) in pruned_depths; then among
    the samples whose parent step is after the last split, mode 1 keeps the best of each last-split branch, mode 2 the
    best and worst overall. A sample's last-split branch is found by following latents back to the split edge."""
    n, last_split = tr["step"].shape[0], max(BRANCH_STEPS)
    samples = [i for i in range(n) if int(tr["step"][i]) + 1 not in pruned_depths]
    if mode == 0:
        return set(samples)

    def branch_of(i):
        while int(tr["step"][i]) > last_split:
            prev = [j for j in range(n) if int(tr["step"][j]) == int(tr["step"][i]) - 1 and torch.equal(tr["x_next"][j], tr["x"][i])]
            i = prev[0]
        return i  # the split edge that created the branch

    other = [i for i in samples if int(tr["step"][i]) <= last_split]
    last_layer = [i for i in samples if int(tr["step"][i]) > last_split]
    if mode == 1:
        groups: dict[int, list[int]] = {}
        for i in last_layer:
            groups.setdefault(branch_of(i), []).append(i)
        kept = []
        for members in groups.values():
            ranked = sorted(members, key=lambda i: float(advantage[i]), reverse=True)
            kept += ranked[:max(1, int(len(members) * ratio))]
    else:
        ranked = sorted(last_layer, key=lambda i: float(advantage[i]), reverse=True)
        keep = max(2, int(len(ranked) * ratio))
        kept = ranked[:keep // 2] + ranked[-(keep - keep // 2):]
    return set(other + kept)


def _advantages(ro, rewards):
    from diffalign.trainers.advantages import rollout_advantages

    per_depth, _ = rollout_advantages({"r": rewards}, {"r": 1.0}, ro.prompt_index, ro.ancestors)
    tr = ro.transitions
    adv = torch.zeros(ro.num_transitions)
    for d, ad in enumerate(per_depth):
        m = tr["depth"] == d
        adv[m] = ad[tr["node"][m]]
    return adv


@pytest.mark.parametrize("mode,name", [(0, "none"), (1, "per_branch"), (2, "best_worst")])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_width_and_depth_pruning_match_the_reference(mode, name, ratio):
    ro = _tree_rollout()
    tr = ro.transitions
    rewards = torch.randn(ro.final.shape[0], generator=torch.Generator().manual_seed(1))
    adv = _advantages(ro, rewards) + 1e-3 * torch.randn(ro.num_transitions, generator=torch.Generator().manual_seed(2))
    for depth_steps in ([], [5, 6]):
        keep = tree_pruning_mask(tr["step"], tr["depth"], tr["node"], adv, max(BRANCH_STEPS), depth_steps, name, ratio)
        expected = _reference_keep(tr, adv, {s + 1 for s in depth_steps}, mode, ratio)
        assert set(torch.nonzero(keep).flatten().tolist()) == expected
        if mode:
            assert keep.sum() < ro.num_transitions - len(depth_steps) * 8


def test_sliding_depth_pruning_moves_earlier_until_the_stop_depth():
    """BranchGRPO: depths base - min(step // interval, base[0] - stop_depth); its depth = step + 1."""
    base_depths, stop_depth, interval = [15, 16, 17, 18], 9, 30
    for t in (1, 29, 30, 95, 179, 180, 181, 300, 10_000):
        shift = min(t // interval, max(0, base_depths[0] - stop_depth))
        expected = [d - shift - 1 for d in base_depths]
        assert pruned_depth_steps([d - 1 for d in base_depths], t, interval, stop_depth - 1) == expected
    assert pruned_depth_steps([14, 15], 500, 0, 0) == [14, 15]  # interval 0: fixed


def test_trainer_prunes_after_computing_tree_advantages():
    """The trained subset after pruning keeps the advantages of the whole tree: a node's value is the mean reward of
    its leaves, normalised among the same prompt's nodes at its depth (population std + 1e-4), written out here."""
    cfg = GRPOConfig(group_size=4, sampler=SamplerOptions(num_steps=STEPS), rewards=[RewardSpec(name="r")],
                     schedule=ScheduleOptions(kind="tree", tree=TreeOptions(
                         branch_steps=BRANCH_STEPS, branch_factor=2, split_noise_scale=4.0, width_pruning="best_worst",
                         depth_pruning_steps=[6], depth_pruning_slide_interval=1, depth_pruning_stop_step=5)))
    cfg.advantage.clip = None
    ro = _tree_rollout()
    rewards = torch.randn(ro.final.shape[0], generator=torch.Generator().manual_seed(3))
    fake = SimpleNamespace(cfg=cfg, accelerator=SimpleNamespace(num_processes=1, process_index=0), table=_table(),
                           generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    rolled = StepRollout(None, ro, {"r": rewards}, {})
    strategy = TrajectoryStrategy(fake)

    def advantages(step):
        return strategy.advantages(rolled, step_rewards(fake.accelerator, cfg, rolled), step)

    step = 1  # depth pruning has slid one step: step 5 is pruned
    got = advantages(step)
    tr = ro.transitions
    sel = got.selected.tolist()
    assert 5 not in {int(tr["step"][i]) for i in sel} and 6 in {int(tr["step"][i]) for i in sel}
    assert len(sel) < ro.num_transitions
    for i in sel:
        d, node = int(tr["depth"][i]), int(tr["node"][i])
        below = ro.ancestors[d] == node
        group = ro.prompt_index[below][0]
        values = [float(rewards[ro.ancestors[d] == j].mean()) for j in range(ro.rows_per_depth[d])
                  if ro.prompt_index[ro.ancestors[d] == j][0] == group]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        expected = (float(rewards[below].mean()) - mean) / (std + 1e-4)
        assert float(got.transitions.advantage[i]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # after pruning_fraction of the run nothing is pruned
    cfg.max_steps, cfg.schedule.tree.pruning_fraction = 10, 0.5
    assert advantages(6).selected.numel() == ro.num_transitions


def _depth_first_transitions(tr, roots: torch.Tensor) -> list[int]:
    """The order of BranchGRPO's training_samples (``collect_all_transitions``), rebuilt from the latents alone: tree
    by tree (roots in prompt order), each node's edges to its children in creation order, every edge followed at
    once by its child's subtree. An edge's children are the next step's transitions that start from its latent."""
    n = tr["step"].shape[0]

    def starting_from(latent, step):
        return [j for j in range(n) if int(tr["step"][j]) == step and torch.equal(tr["x"][j], latent)]

    order: list[int] = []

    def visit(i):
        order.append(i)
        for j in starting_from(tr["x_next"][i], int(tr["step"][i]) + 1):
            visit(j)

    for r in range(roots.shape[0]):
        for j in starting_from(roots[r], 0):
            visit(j)
    assert sorted(order) == list(range(n))
    return order


def _reference_best_worst(tr, advantage, ordered: list[int], ratio: float) -> set[int]:
    """BranchGRPO's --width_pruning_mode 2 on its sample list: Python's stable sort by advantage (descending) of the
    last-layer samples in list order; the first keep // 2 and the last keep - keep // 2."""
    last_split = max(BRANCH_STEPS)
    other = [i for i in ordered if int(tr["step"][i]) <= last_split]
    last_layer = [i for i in ordered if int(tr["step"][i]) > last_split]
    ranked = sorted(last_layer, key=lambda i: float(advantage[i]), reverse=True)
    keep = max(2, int(len(ranked) * ratio))
    return set(other + ranked[:keep // 2] + ranked[-(keep - keep // 2):])


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_best_worst_breaks_ties_in_the_references_depth_first_order(ratio):
    """Binary rewards tie whole chains: the kept transitions among equal advantages are those that come first (best)
    or last (worst) chain by chain, depth-first, as in the reference, not step by step."""
    roots = 3
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(roots, 4, 4, 4, generator=g)
    ro = rollout(_ToyFlowModel(), _table(), tree_plan(STEPS, BRANCH_STEPS, 2, split_noise_scale=4.0),
                 make_step_kind("flow_sde"), noise, torch.arange(roots), g)
    tr = ro.transitions
    rewards = torch.tensor([1., 1., 0., 1., 0., 0., 1., 0., 1., 1., 1., 0.])  # 4 leaves per prompt
    adv = _advantages(ro, rewards)
    keep = tree_pruning_mask(tr["step"], tr["depth"], tr["node"], adv, max(BRANCH_STEPS), [], "best_worst", ratio)
    got = set(torch.nonzero(keep).flatten().tolist())
    depth_first = _depth_first_transitions(tr, noise)
    assert got == _reference_best_worst(tr, adv, depth_first, ratio)
    # the tie order matters here: step-by-step (sampling) order keeps other transitions
    assert got != _reference_best_worst(tr, adv, list(range(ro.num_transitions)), ratio)
