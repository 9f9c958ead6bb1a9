"""BranchGRPO's pruning of the trained transitions of tree rollouts (Li et al., 2025, arXiv:2509.06040;
Fredreic1849/BranchGRPO ``fastvideo/train_branchgrpo_flux.py``). Rollouts, rewards and advantages are
computed on the whole tree first; pruning only drops transitions from the update (less backward work).

* **Depth pruning**: transitions at the given step indices are not trained. Sliding: the pruned steps
  move one step earlier every ``slide_interval`` training steps (``shift = step // interval``,
  1-based training step, as BranchGRPO's ``current_step // depth_pruning_slide_interval``) until the
  earliest one reaches ``stop_step``. BranchGRPO counts tree depth = step index + 1.
* **Width pruning**, among the transitions after the last branch step that depth pruning left
  (BranchGRPO's "last layer": parent step > last split step): ``per_branch`` (mode 1) keeps, for
  each node of the last branch, the best ``max(1, int(n * ratio))`` of its transitions by advantage;
  ``best_worst`` (mode 2) keeps the best ``keep // 2`` and the worst ``keep - keep // 2`` of all of
  them, ``keep = max(2, int(n * ratio))``. Ties keep the reference's list order (its Python ``sorted``
  is stable): ``collect_all_transitions`` walks each tree depth-first, so the last layer comes chain by
  chain (trees in prompt order, a node's children in creation order), each chain in step order.
"""

from __future__ import annotations

import torch


def pruned_depth_steps(steps: list[int], training_step: int, slide_interval: int, stop_step: int) -> list[int]:
    """The step indices depth pruning drops at ``training_step`` (1-based)."""
    if not steps or slide_interval <= 0:
        return sorted(steps)
    base = sorted(steps)
    shift = min(training_step // slide_interval, max(0, base[0] - stop_step))
    return [s - shift for s in base]


def tree_pruning_mask(step: torch.Tensor, depth: torch.Tensor, node: torch.Tensor, advantage: torch.Tensor,
                      last_branch_step: int, depth_steps: list[int], width: str, ratio: float) -> torch.Tensor:
    """Which transitions are trained ([N] bool) after depth then width pruning.

    ``step``/``depth``/``node``: each transition's step index, tree depth and node at that depth
    (:func:`diffalign.pipelines.rollout`); ``advantage`` [N].
    """
    step, depth, node, advantage = step.cpu(), depth.cpu(), node.cpu(), advantage.detach().float().cpu()
    keep = torch.ones(step.shape[0], dtype=torch.bool)
    for s in depth_steps:
        keep &= step != s
    if width == "none":
        return keep
    last = torch.nonzero(keep & (step > last_branch_step)).flatten()
    if last.numel() == 0:
        return keep
    # the reference's depth-first order: chain by chain (node at the last depth; children of node p are
    # p * k + j, so node order is the depth-first leaf order), each chain in step order
    chain = depth[last] * (int(node.max()) + 1) + node[last]
    last = last[torch.argsort(chain * (int(step.max()) + 1) + step[last], stable=True)]
    keep[last] = False
    if width == "per_branch":
        group = depth[last] * (int(node.max()) + 1) + node[last]
        for g in torch.unique(group):
            members = last[group == g]
            order = torch.sort(advantage[members], descending=True, stable=True).indices
            keep[members[order[:max(1, int(members.numel() * ratio))]]] = True
    elif width == "best_worst":
        order = last[torch.sort(advantage[last], descending=True, stable=True).indices]
        n_keep = min(max(2, int(order.numel() * ratio)), order.numel())
        best = n_keep // 2
        keep[order[:best]] = True
        keep[order[order.numel() - (n_keep - best):]] = True
    else:
        raise ValueError(f"width pruning must be none, per_branch or best_worst, got {width!r}")
    return keep
