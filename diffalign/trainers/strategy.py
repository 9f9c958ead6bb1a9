"""The contract between the online loop (:class:`~diffalign.trainers.online.OnlineRecipe`) and its
strategies: the data a training step passes along, and what a strategy implements.

One loop runs every online method; what differs between the two families is a strategy object
(:class:`OnlineStrategy`) chosen by ``method``:

* :class:`~diffalign.trainers.trajectory.TrajectoryStrategy` (``method: grpo``: DDPO, Flow-GRPO,
  DanceGRPO, MixGRPO, BranchGRPO, TempFlow-GRPO, GRPO-Guard): stochastic rollouts whose per-step
  transitions and log-probs are trained with the clipped GRPO loss;
* :class:`~diffalign.trainers.forward_process.ForwardProcessStrategy` (``method: nft`` / ``awm``):
  rollouts whose clean final images are re-noised by the forward process and trained with the
  method's flow-matching loss.

A step flows through the types here: the loop rolls out and scores (:class:`StepRollout`), turns the
rewards into group-normalised advantages (:func:`step_rewards` -> :class:`StepRewards`, the same for
both families), the strategy spreads them over what it trains (an :class:`Advantages`), updates
(:class:`UpdateStats`) and adds its own metrics. The loop reads only the fields declared here, never
a strategy's own types.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch

from ..pipelines import GuidedModel, Rollout, RolloutPlan, SamplingTable, StepKind
from .advantages import rollout_advantages


# ------------------------------------------------------------------------------------ data
@dataclass
class Policy:
    """The one trained network, by role (with LoRA the reference is the same network with its
    adapters disabled, so there is no second copy)."""

    wrapped: torch.nn.Module  # accelerate-prepared (DDP when distributed): training forwards, no_sync
    module: torch.nn.Module  # the same network unwrapped: rollouts, evaluation, adapter toggling
    frozen_reference: torch.nn.Module | None  # full fine-tuning with a KL: a frozen copy; else None

    def reference_output(self, adapter, model: GuidedModel, x, timestep, prompt) -> torch.Tensor:
        if self.frozen_reference is not None:
            return model(x, timestep, prompt, self.frozen_reference)
        with adapter.adapters_disabled(self.module):
            return model(x, timestep, prompt, self.module)


@dataclass
class StepRollout:
    """One training step's rollouts and their rewards (this process)."""

    model: GuidedModel  # conditioned on the step's prompts
    rollout: Rollout  # all batches concatenated
    scores: dict[str, torch.Tensor]  # reward name -> [leaves]
    timings: dict[str, float]  # reward_seconds, reward_wait_seconds; rollout_seconds (set by the loop)


@dataclass
class StepRewards:
    """The shared half of every method's advantages: the step's rewards gathered over processes
    (what the reward metrics read) and the advantages of this process's rows."""

    scores: dict[str, torch.Tensor]  # reward name -> [leaves of all processes]
    groups: torch.Tensor  # [leaves of all processes] prompt group ids
    combined: torch.Tensor  # [leaves of all processes] the combined (weighted) reward
    # per tree depth d: [this process's rows at depth d] group-normalised advantage of each node;
    # without a tree one depth, the final images
    per_depth: list[torch.Tensor]


@dataclass
class Advantages(ABC):
    """What every strategy's :meth:`~OnlineStrategy.advantages` returns: the step's rewards, and
    (in a subclass) the rows its update trains with their advantages. The loop reads ``rewards``
    and :attr:`trained_advantages` only."""

    rewards: StepRewards

    @property
    @abstractmethod
    def trained_advantages(self) -> torch.Tensor:
        """[R] the advantage of every row the update trains on (this process; ``advantage_abs_mean``)."""


@dataclass
class UpdateStats:
    """What an update reports to the loop: summed loss metrics (averaged per micro-batch when
    logged), the micro-batch count, and the optimizer steps skipped for a non-finite loss. A
    strategy may subclass it to carry its own measurements."""

    sums: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    skipped: int = 0

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight


def gather_leaf_data(accelerator, scores: dict[str, torch.Tensor], groups: torch.Tensor, ancestors, rows_per_depth):
    """Rewards, groups and tree ancestors of all processes (indices offset per process)."""
    if accelerator.num_processes == 1:
        return scores, groups, ancestors
    dev = accelerator.device
    rank_ids = accelerator.gather(torch.full((groups.shape[0],), accelerator.process_index, device=dev)).cpu()
    g_scores = {k: accelerator.gather(v.to(dev)).cpu() for k, v in scores.items()}
    n_groups = int(groups.max()) + 1
    g_groups = accelerator.gather(groups.to(dev)).cpu() + rank_ids * n_groups
    g_anc = [accelerator.gather(a.to(dev)).cpu() + rank_ids * r for a, r in zip(ancestors, rows_per_depth)]
    return g_scores, g_groups, g_anc


def step_rewards(accelerator, cfg, rolled: StepRollout) -> StepRewards:
    """Rewards gathered over processes; advantages per prompt group (per tree depth for trees),
    several rewards combined (:func:`~diffalign.trainers.advantages.rollout_advantages`), each
    depth sliced back to this process's rows. Advantages are normalised over *all* processes'
    groups before the slice, so a group's statistics do not depend on the number of processes."""
    ro, a = rolled.rollout, cfg.advantage
    scores, groups, ancestors = gather_leaf_data(accelerator, rolled.scores, ro.prompt_index.cpu(),
                                                 [x.cpu() for x in ro.ancestors], ro.rows_per_depth)
    weights = {r.name: r.weight for r in cfg.rewards}
    per_depth, combined = rollout_advantages(scores, weights, groups, ancestors, a.multi_reward, a.tree, a.std,
                                             a.eps, a.clip, a.std_ddof)
    rank = accelerator.process_index
    per_depth = [x[rank * r:(rank + 1) * r] for x, r in zip(per_depth, ro.rows_per_depth)]
    return StepRewards(scores, groups, combined, per_depth)


# ------------------------------------------------------------------------------------ the contract
class Loop(Protocol):
    """What a strategy reads from the online loop (:class:`~diffalign.trainers.online.OnlineRecipe`),
    all set by its ``setup`` before the strategy's :meth:`~OnlineStrategy.setup`."""

    cfg: Any  # GRPOConfig / ForwardRLConfig
    accelerator: Any
    device: torch.device
    adapter: Any  # the model's DiffusionAdapter
    policy: Policy
    params: list[torch.nn.Parameter]  # the trained parameters
    table: SamplingTable  # the rollout sampling table
    kind: StepKind  # the rollout's step rule (from OnlineStrategy.step_kind)
    step_std: torch.Tensor  # [num_steps] the rollout's noise std per table step
    latent_shape: tuple[int, ...]
    generator: torch.Generator  # this process's generator: prompts, noise, subsets (checkpointed)

    def guarded_update(self, uidx: torch.Tensor, micro_loss: Callable, stats: UpdateStats) -> bool: ...


class OnlineStrategy(ABC):
    """The method-specific half of an online step, for one family of methods: the rollout's step
    rule and weights, how advantages reach the trained rows, the update, and the method's metrics.

    Built by the loop with itself (``strategy = Strategy(loop)``); the hooks run in this order:
    :meth:`check_model`, :meth:`step_kind`, :meth:`check_sampling` while the loop sets up its
    sampling; :meth:`setup` at the end of the loop's setup (after a resume); then per step
    :meth:`sampling_weights` around the rollout, :meth:`advantages`, :meth:`update` (between the
    loop's ``train()`` mode and its learning-rate step) and :meth:`metrics`."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def check_model(self) -> None:
        """Reject a model family the method cannot train (before the tables are built)."""

    @abstractmethod
    def step_kind(self) -> StepKind:
        """The rollout's step rule (what the rollout records: stochastic transitions or none)."""

    def check_sampling(self) -> None:
        """Checks on the built sampling table and ``loop.step_std``."""

    def setup(self) -> None:
        """The strategy's own state, from the (possibly resumed) trained weights."""

    def sampling_weights(self) -> ContextManager:
        """The weights the rollouts sample with, swapped in for the block; default: the trained ones."""
        return contextlib.nullcontext()

    @abstractmethod
    def advantages(self, rolled: StepRollout, rewards: StepRewards, step: int) -> Advantages:
        """The rows training step ``step`` (1-based) trains, with their advantages."""

    @abstractmethod
    def update(self, model: GuidedModel, adv: Advantages) -> UpdateStats:
        """The step's optimizer updates (each through ``loop.guarded_update``)."""

    @abstractmethod
    def metrics(self, plan: RolloutPlan, plan_info: dict, adv: Advantages, stats: UpdateStats) -> dict:
        """The method's own ``metrics.jsonl`` keys for the step (after the loop's)."""
