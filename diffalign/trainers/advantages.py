"""Advantages for GRPO over denoising trajectories. Pure tensor functions.

* :func:`group_advantages`: per-prompt group normalisation (GRPO; Flow-GRPO, DanceGRPO),
  ``A = (r - mean_group) / (std + eps)`` with the std of the group (``group``), of the whole
  batch (``global``, Flow-GRPO's option) or none (``none``: mean-centred only); then clamped.
  ``std_ddof``: 0 is the population std (flow_grpo's ``np.std``, with ``eps = 1e-4``); 1 the
  unbiased std (``torch.std``: DanceGRPO, MixGRPO and BranchGRPO, with ``eps = 1e-8``), which is
  ``sqrt(n / (n - 1))`` larger (1.155 at n = 4; 1.414 for a pair of tree nodes). A group of one
  (or a depth with one node per group) gets zero advantages under both.
* :func:`tree_advantages`: tree rollouts (BranchGRPO; TempFlow-GRPO). A node's value is the mean
  reward of the leaves below it; ``depth`` normalises node values among the nodes of the same
  group at the same depth (BranchGRPO's depth-wise advantage), ``leaf`` gives each node the mean
  of its leaves' group-normalised advantages.
* :func:`rollout_advantages`: several rewards, either summed with weights *before* the
  advantage (``weighted_sum``) or one advantage per reward, summed with weights (DanceGRPO's
  ``sum_of_advantages``).

Groups are given as integer ids per sample (any labels; equal id = same prompt/tree).
"""

from __future__ import annotations

import torch

STD_MODES = ("group", "global", "none")
MULTI_REWARD_MODES = ("weighted_sum", "sum_of_advantages")
TREE_MODES = ("depth", "leaf")


def _group_stats(values: torch.Tensor, groups: torch.Tensor, ddof: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and std of its group (divisor ``n - ddof``; 0 where ``n <= ddof``)."""
    _, inv = torch.unique(groups, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    v = values.double()
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv.cpu(), torch.ones_like(v).cpu())
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv.cpu(), v.cpu())
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv.cpu(), (v.cpu() - mean[inv.cpu()]) ** 2)
    std = (sq / (count - ddof).clamp_min(1.0)).sqrt()
    return mean[inv.cpu()].to(values.device).float(), std[inv.cpu()].to(values.device).float()


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std: str = "group", eps: float = 1e-4,
                     clip: float | None = None, std_ddof: int = 0) -> torch.Tensor:
    """``(r - mean of the sample's group) / (std + eps)``, clamped to ``[-clip, clip]``: [N] -> [N].

    ``std``: ``group`` (the group's std: GRPO), ``global`` (the std of all ``rewards``), ``none``;
    ``std_ddof``: 0 population std, 1 unbiased (see the module docstring).
    A group whose rewards are all equal gets zero advantages (any std mode).
    """
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    rewards = rewards.float()
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    mean, gstd = _group_stats(rewards, groups, std_ddof)
    centred = rewards - mean
    if std == "group":
        adv = centred / (gstd + eps)
    elif std == "global":
        glob = rewards.std(unbiased=bool(std_ddof)) if rewards.numel() > std_ddof else rewards.new_zeros(())
        adv = centred / (glob + eps)
    else:
        adv = centred
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def zero_std_group_fraction(rewards: torch.Tensor, groups: torch.Tensor, tol: float = 1e-6) -> float:
    """Fraction of groups whose rewards are all (nearly) equal: they carry no learning signal."""
    _, gstd = _group_stats(rewards.float(), groups)
    _, inv = torch.unique(groups, return_inverse=True)
    # scatter_reduce_ is index_reduce_'s stable twin (index_reduce_ warns "is in beta" on every call)
    per_group = torch.zeros(int(inv.max()) + 1).scatter_reduce_(0, inv.cpu(), gstd.cpu().float(), "amax", include_self=False)
    return float((per_group <= tol).float().mean())


def tree_advantages(leaf_rewards: torch.Tensor, leaf_groups: torch.Tensor, ancestors: list[torch.Tensor],
                    mode: str = "depth", std: str = "group", eps: float = 1e-4, clip: float | None = None,
                    std_ddof: int = 0) -> list[torch.Tensor]:
    """Per-depth node advantages of tree rollouts: returns ``[A_0, ..., A_m]``, ``A_d`` [nodes at depth d].

    ``ancestors[d][leaf]`` is the node at depth ``d`` above each leaf (node ids ``0..n_d-1``; the
    last depth are the leaves themselves). A node's value is the mean reward of its leaves and
    its group is its leaves' group. ``depth``: node values normalised among same-group nodes of
    the same depth (a depth with one node per group gets zeros: its transition is shared by every
    leaf). ``leaf``: a node's advantage is the mean group-normalised advantage of its leaves, so the
    leaves get plain GRPO advantages and a shared prefix gets zero. Without branching
    (``ancestors = [arange(L)]``) both equal :func:`group_advantages`.
    """
    if mode not in TREE_MODES:
        raise ValueError(f"tree mode must be one of {TREE_MODES}, got {mode!r}")
    leaf_rewards = leaf_rewards.float()
    leaf_adv = group_advantages(leaf_rewards, leaf_groups, std, eps, None, std_ddof) if mode == "leaf" else None
    out = []
    for anc in ancestors:
        anc = anc.long().cpu()
        n = int(anc.max()) + 1
        count = torch.zeros(n).index_add_(0, anc, torch.ones(anc.shape[0]))
        node_groups = torch.zeros(n, dtype=torch.long).index_copy_(0, anc, leaf_groups.long().cpu())
        if mode == "leaf":
            adv = torch.zeros(n).index_add_(0, anc, leaf_adv.cpu()) / count
        else:
            value = torch.zeros(n).index_add_(0, anc, leaf_rewards.cpu()) / count
            adv = group_advantages(value, node_groups, std, eps, None, std_ddof)
        if clip is not None:
            adv = adv.clamp(-clip, clip)
        out.append(adv.to(leaf_rewards.device))
    return out


def rollout_advantages(rewards: dict[str, torch.Tensor], weights: dict[str, float], leaf_groups: torch.Tensor,
                       ancestors: list[torch.Tensor] | None = None, multi_reward: str = "weighted_sum",
                       tree_mode: str = "depth", std: str = "group", eps: float = 1e-4,
                       clip: float | None = None, std_ddof: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Advantages of every tree depth from several per-leaf rewards; also the weighted reward.

    ``weighted_sum``: ``r = sum_k w_k r_k``, then advantages of ``r``. ``sum_of_advantages``
    (DanceGRPO): ``A = sum_k w_k A(r_k)``, each reward normalised on its own scale. ``clip``
    applies to the final sum. ``ancestors`` None means flat groups (one depth).
    """
    if multi_reward not in MULTI_REWARD_MODES:
        raise ValueError(f"multi_reward must be one of {MULTI_REWARD_MODES}, got {multi_reward!r}")
    names = list(rewards)
    n = rewards[names[0]].shape[0]
    ancestors = ancestors if ancestors is not None else [torch.arange(n)]
    combined = sum(weights.get(k, 1.0) * rewards[k].float() for k in names)
    if multi_reward == "weighted_sum" or len(names) == 1:
        per_depth = tree_advantages(combined, leaf_groups, ancestors, tree_mode, std, eps, None, std_ddof)
    else:
        per_depth = None
        for k in names:
            a = tree_advantages(rewards[k], leaf_groups, ancestors, tree_mode, std, eps, None, std_ddof)
            a = [weights.get(k, 1.0) * x for x in a]
            per_depth = a if per_depth is None else [p + q for p, q in zip(per_depth, a)]
    if clip is not None:
        per_depth = [a.clamp(-clip, clip) for a in per_depth]
    return per_depth, combined
