"""Timestep tables and rollout plans (which steps are stochastic, where trees branch).

* :class:`SamplingTable` holds, for each of the ``S`` sampling steps, the model timestep and the
  coefficients ``(alpha, sigma) -> (alpha_next, sigma_next)`` of :mod:`.steps`. The model adapter
  computes them (``adapter.sampling_schedule``): UNets use diffusers' ``DDIMScheduler`` timesteps
  of the checkpoint's own scheduler config, flow models ``FlowMatchEulerDiscreteScheduler``'s
  shifted sigmas, so an ODE rollout is exactly the pipeline's default sampler.
* :class:`RolloutPlan` marks each step stochastic (a recorded transition with a log-prob) or
  deterministic (ODE solver), and optionally branches rows before some steps (trees).
  Plans: :func:`full_plan` (Flow-GRPO / DanceGRPO / DDPO), :func:`window_plan` with
  :func:`window_start` (MixGRPO's sliding window, Flow-GRPO-Fast), :func:`tree_plan`
  (BranchGRPO; TempFlow-GRPO when ``sde_between=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..models.base import SamplingSchedule
from .steps import StepCoeffs


@dataclass
class SamplingTable(SamplingSchedule):
    """The adapter's :class:`~diffalign.models.SamplingSchedule` with the lookups of the rollout engine."""

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def coeffs(self, steps: torch.Tensor) -> StepCoeffs:
        """Coefficients of the given step indices (a LongTensor [B]), on the indices' device."""
        idx = steps.long().cpu()
        dev = steps.device
        pick = lambda t: t[idx].to(dev)  # noqa: E731
        return StepCoeffs(pick(self.alpha), pick(self.sigma), pick(self.alpha_next), pick(self.sigma_next),
                          torch.full((idx.shape[0],), self.sigma_cap, dtype=torch.float32, device=dev))

    def coeffs_at(self, i: int, n: int, device=None) -> StepCoeffs:
        return self.coeffs(torch.full((n,), i, dtype=torch.long, device=device))


def sampling_table(adapter, num_steps: int, height: int | None = None, width: int | None = None) -> SamplingTable:
    """The ``num_steps``-step sampling schedule of ``adapter``'s checkpoint (CPU tensors) for images of
    ``height`` x ``width`` pixels: the adapter owns it (:meth:`~diffalign.models.DiffusionAdapter.sampling_schedule`),
    as a diffusers pipeline owns its ``retrieve_timesteps`` / ``calculate_shift``."""
    schedule = adapter.sampling_schedule(num_steps, height=height, width=width)
    return SamplingTable(**{f.name: getattr(schedule, f.name) for f in fields(SamplingSchedule)})


SIGMA_SCHEDULES = ("scheduler", "time_shift")


def time_shift_table(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> SamplingTable:
    """The rectified-flow table of DanceGRPO, MixGRPO and BranchGRPO (their ``sd3_time_shift``):
    ``s_k = shift u_k / (1 + (shift - 1) u_k)`` on ``u = linspace(1, 0, num_steps + 1)``, model
    timestep ``s * num_train_timesteps`` (``sampler.sigma_schedule: time_shift``).

    The checkpoint scheduler's table (``sampler.sigma_schedule: scheduler``, the adapter's
    :meth:`~diffalign.models.DiffusionAdapter.sampling_schedule`) shifts
    ``linspace(1, 1/num_train_timesteps, num_steps)`` and appends 0, so its last step is much
    shorter (max |delta sigma| 0.24 against this one at 10 steps, shift 3). DanceGRPO feeds the model
    ``int(s * 1000)``; here the model sees the float timestep, as for the scheduler's table.
    Flow models only (``alpha = 1 - s``).
    """
    if num_steps < 1 or shift <= 0:
        raise ValueError(f"time_shift_table needs num_steps >= 1 and shift > 0, got {num_steps}, {shift}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sig = (shift * u / (1.0 + (shift - 1.0) * u)).float()
    s, s_next = sig[:-1], sig[1:]
    nxt = torch.where(s_next > 0, s_next * num_train_timesteps, torch.full_like(s_next, -1.0))
    return SamplingTable("flow", s * num_train_timesteps, nxt, 1.0 - s, s, 1.0 - s_next, s_next, float(s_next[0]))


# --------------------------------------------------------------------------------- plans
@dataclass
class RolloutPlan:
    """Per step: stochastic (recorded, log-prob) or deterministic (ODE); ``branches`` maps a step
    index to a branch factor: every row is copied that many times just before the step."""

    stochastic: list[bool]
    branches: dict[int, int] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.stochastic)

    @property
    def leaves_per_root(self) -> int:
        n = 1
        for k in self.branches.values():
            n *= k
        return n

    @property
    def stochastic_steps(self) -> list[int]:
        return [i for i, s in enumerate(self.stochastic) if s]


def full_plan(num_steps: int) -> RolloutPlan:
    """Every step stochastic (DDPO, Flow-GRPO, DanceGRPO)."""
    return RolloutPlan([True] * num_steps)


def ode_plan(num_steps: int) -> RolloutPlan:
    """No stochastic step: deterministic sampling (evaluation)."""
    return RolloutPlan([False] * num_steps)


def window_plan(num_steps: int, start: int, size: int) -> RolloutPlan:
    """Steps ``start .. start+size-1`` stochastic, the rest ODE (MixGRPO, Flow-GRPO-Fast)."""
    if not (0 <= start and size >= 1 and start + size <= num_steps):
        raise ValueError(f"window [{start}, {start + size}) does not fit in {num_steps} steps")
    return RolloutPlan([start <= i < start + size for i in range(num_steps)])


def window_start(iteration: int, num_steps: int, size: int, start: int = 0, shift: int = 1, interval: int = 1,
                 end: int | None = None, mode: str = "slide", generator: torch.Generator | None = None) -> int:
    """Where the window of training step ``iteration`` (0-based) starts.

    ``slide`` (MixGRPO): ``start + shift * (iteration // interval)``, wrapping back to ``start``
    after ``end`` (default ``num_steps - size``, the last position that fits). ``random``
    (Flow-GRPO-Fast): uniform in ``[start, end]`` from ``generator`` (seed it identically on all
    ranks so they train the same steps).
    """
    last = num_steps - size if end is None else min(end, num_steps - size)
    if last < start:
        raise ValueError(f"window of {size} steps starting at {start} does not fit in {num_steps} steps")
    span = last - start + 1
    if mode == "slide":
        return start + (shift * (iteration // max(interval, 1))) % span
    if mode == "random":
        return start + int(torch.randint(0, span, (1,), generator=generator))
    raise ValueError(f"window mode must be slide or random, got {mode!r}")


def tree_plan(num_steps: int, branch_steps: list[int], branch_factor: int, sde_between: bool = True) -> RolloutPlan:
    """Tree rollouts: branch ``branch_factor`` ways before each of ``branch_steps`` (BranchGRPO).

    Branch steps are always stochastic (the children differ only by that step's noise). With
    ``sde_between`` the other steps are stochastic too (BranchGRPO); without, they are ODE steps
    and all stochasticity sits at the branch points (TempFlow-GRPO's trajectory branching).
    """
    steps = sorted(set(int(b) for b in branch_steps))
    if not steps or steps[0] < 0 or steps[-1] >= num_steps:
        raise ValueError(f"branch steps {branch_steps} must be within [0, {num_steps})")
    stoch = [sde_between or i in steps for i in range(num_steps)]
    return RolloutPlan(stoch, {b: branch_factor for b in steps})
