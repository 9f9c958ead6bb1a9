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


def _time_shift(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift ``shift u / (1 + (shift - 1) u)`` (DanceGRPO / MixGRPO ``sd3_time_shift``)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


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
    sig = _time_shift(u, shift).float()
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
    # children of a branch step: mean + std * split_noise_scale * z (BranchGRPO's tree_split_noise_scale)
    split_noise_scale: float = 1.0
    # a stochastic step hands its x0 to the ODE solver's multistep history instead of resetting it
    # (MixGRPO-Flash: DPM-Solver++(2M) continues across the window)
    carry_ode_history: bool = False

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
                 end: int | None = None, mode: str = "slide", generator: torch.Generator | None = None,
                 sweep_end: str = "wrap") -> int:
    """Where the window of training step ``iteration`` (0-based) starts.

    ``slide`` (MixGRPO): ``start + shift * (iteration // interval)``, back to ``start`` after the
    last start ``end``. ``sweep_end="wrap"``: ``end`` defaults to ``num_steps - size`` (the last
    position a whole window fits). ``sweep_end="truncate"`` (MixGRPO's ``GRPOTrainingStates`` with
    ``roll_back``): ``end`` defaults to ``num_steps - 3`` and the window is cut at ``end + 1``
    (:func:`window_stop`), so the last two steps are never in it; MixGRPO's one extra position
    whose window is empty (start ``num_steps - 2``) is skipped. ``random`` (Flow-GRPO-Fast): uniform
    in ``[start, end]`` (``end`` default ``num_steps - size``) from ``generator`` (seed it
    identically on all ranks so they train the same steps).
    """
    last = window_last_start(num_steps, size, end, mode, sweep_end)
    if last < start:
        raise ValueError(f"window of {size} steps starting at {start} does not fit in {num_steps} steps")
    span = last - start + 1
    if mode == "slide" and sweep_end == "truncate":
        positions = (last - start) // shift + 1 if shift > 0 else 1
        return start + shift * ((iteration // max(interval, 1)) % positions)
    if mode == "slide":
        return start + (shift * (iteration // max(interval, 1))) % span
    if mode == "random":
        return start + int(torch.randint(0, span, (1,), generator=generator))
    raise ValueError(f"window mode must be slide or random, got {mode!r}")


def window_last_start(num_steps: int, size: int, end: int | None, mode: str = "slide", sweep_end: str = "wrap") -> int:
    """The last window start (see :func:`window_start`)."""
    if mode == "slide" and sweep_end == "truncate":
        return num_steps - 3 if end is None else min(end, num_steps - 1)
    return num_steps - size if end is None else min(end, num_steps - size)


def window_stop(start: int, num_steps: int, size: int, end: int | None, mode: str = "slide",
                sweep_end: str = "wrap") -> int:
    """One past the window's last step: ``start + size``, cut at ``end + 1`` with ``sweep_end="truncate"``."""
    if mode == "slide" and sweep_end == "truncate":
        return min(start + size, window_last_start(num_steps, size, end, mode, sweep_end) + 1)
    return start + size


def post_window_points(num_steps: int, last: int, ratio: float, to_zero: bool = True) -> int:
    """MixGRPO-Flash: how many sigma points follow the window whose last step is ``last``.

    The release (Tencent-Hunyuan/MixGRPO, ``fastvideo/utils/sampling_utils.py`` ``run_sample_step`` with
    ``dpm_apply_strategy="post"``) keeps ``P = int(max((N - L) * ratio, 1))`` points, counted on the
    ``N + 1``-point schedule (``N`` steps, ``L`` the window's last step), the first of them
    ``sigma_{L+1}``; so ``P - 1`` ODE steps follow the window. Computed in Python floats like there
    (``int(5 * 0.4) = 2``). ``to_zero`` (``schedule.window.post_window_to_zero``): at least 2 points,
    so at least one step takes the sample to the schedule's end; the release (``to_zero=False``) has a
    single point when ``(N - L) * ratio < 2`` and its rollout stops at ``sigma_{L+1} > 0``.
    """
    points = int(max((num_steps - last) * ratio, 1))
    return max(points, 2) if to_zero else points


def post_window_compressed(table: SamplingTable, plan: RolloutPlan, ratio: float, shift: float | None = None,
                           num_train_timesteps: int = 1000, to_zero: bool = True) -> tuple[SamplingTable, RolloutPlan]:
    """MixGRPO-Flash (Li et al., 2025, arXiv:2507.21802): the ODE steps after the plan's last
    stochastic step ``L`` replaced by fewer ones.

    Steps ``0..L`` are kept; after them come the :func:`post_window_points` ``P`` sigma points (the
    first is ``sigma_{L+1}``), i.e. ``P - 1`` ODE steps. Where they lie:

    * ``shift`` given (a :func:`time_shift_table` of that shift, ``sampler.sigma_schedule: time_shift``):
      the release's points, ``sigma_j = shift u_j / (1 + (shift - 1) u_j)`` on
      ``u = linspace(u_{L+1}, 0, P)`` with ``u_{L+1} = 1 - (L + 1) / N`` the unshifted time of
      ``sigma_{L+1}``; model timestep ``sigma * num_train_timesteps``. Flow tables only.
    * ``shift=None`` (any other table, e.g. a checkpoint scheduler's): the table's own grid
      ``L+1 .. N`` subsampled evenly (point ``L + 1 + round(j (N - 1 - L) / (P - 1))``), the nearest
      table points to an even spacing; the release's points where ``N - 1 - L`` is a multiple of
      ``P - 1`` on a time-shift table.

    With ``P = 1`` (``to_zero=False``) the table ends at step ``L`` (``sigma_next = sigma_{L+1} > 0``).
    The plan carries the ODE solver's history across the window (``carry_ode_history``: the
    release's DPM-Solver++(2M) state holds the ``x0`` of step ``L`` at the first post step).
    Returns ``(table, plan)``.
    """
    stochastic = plan.stochastic_steps
    n = table.num_steps
    last = stochastic[-1] if stochastic else n - 1
    carried = lambda stoch: RolloutPlan(stoch, dict(plan.branches), plan.split_noise_scale, True)  # noqa: E731
    if n - 1 - last <= 0:
        return table, carried(list(plan.stochastic))
    points = post_window_points(n, last, ratio, to_zero)
    if shift is not None:
        if table.parametrization != "flow":
            raise ValueError("post_window_compressed(shift=...) needs a rectified-flow table "
                             "(sampler.sigma_schedule: time_shift)")
        u_first = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[last + 1]
        sig = _time_shift(torch.linspace(float(u_first), 0.0, points, dtype=torch.float64), shift).float()
        p_sigma, p_alpha = sig, 1.0 - sig
        p_t = torch.where(sig > 0, sig * num_train_timesteps, torch.full_like(sig, -1.0))
    else:
        idx = [last + 1 + round(j * (n - 1 - last) / (points - 1)) for j in range(points)] if points > 1 else [last + 1]
        on_grid = lambda cur, nxt: torch.cat([cur, nxt[-1:]])[idx]  # noqa: E731  # values at grid points 0..N
        p_t = on_grid(table.timesteps, table.next_timesteps)
        p_alpha, p_sigma = on_grid(table.alpha, table.alpha_next), on_grid(table.sigma, table.sigma_next)
    k = last + 1
    start = lambda kept, pts: torch.cat([kept[:k], pts[:-1].to(kept)])  # noqa: E731  # a step's start: points 0..P-2
    end = lambda kept, pts: torch.cat([kept[:k], pts[1:].to(kept)])  # noqa: E731  # its end: points 1..P-1
    compressed = SamplingTable(
        table.parametrization,
        start(table.timesteps, p_t), end(table.next_timesteps, p_t),
        start(table.alpha, p_alpha), start(table.sigma, p_sigma),
        end(table.alpha_next, p_alpha), end(table.sigma_next, p_sigma), table.sigma_cap,
    )
    return compressed, carried(list(plan.stochastic[:k]) + [False] * (points - 1))


def tree_plan(num_steps: int, branch_steps: list[int], branch_factor: int, sde_between: bool = True,
              split_noise_scale: float = 1.0) -> RolloutPlan:
    """Tree rollouts: branch ``branch_factor`` ways before each of ``branch_steps`` (BranchGRPO).

    Branch steps are always stochastic (the children differ only by that step's noise). With
    ``sde_between`` the other steps are stochastic too (BranchGRPO); without, they are ODE steps
    and all stochasticity sits at the branch points (TempFlow-GRPO's trajectory branching).
    ``split_noise_scale`` multiplies the noise of the branch steps (BranchGRPO: 4.0).
    """
    steps = sorted(set(int(b) for b in branch_steps))
    if not steps or steps[0] < 0 or steps[-1] >= num_steps:
        raise ValueError(f"branch steps {branch_steps} must be within [0, {num_steps})")
    stoch = [sde_between or i in steps for i in range(num_steps)]
    return RolloutPlan(stoch, {b: branch_factor for b in steps}, split_noise_scale)
