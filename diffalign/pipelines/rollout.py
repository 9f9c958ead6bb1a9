"""The rollout engine: sample denoising trajectories and record every stochastic transition.

:func:`rollout` runs one plan (:mod:`.schedules`) with one stochastic step kind and one ODE
solver (:mod:`.steps`) over a batch of rows and returns a :class:`Rollout`:

* ``final`` latents of the leaves (one per sample; trees have ``roots * prod(branch factors)``);
* ``last_x0``: the model's x0-prediction at the last step, per leaf (what DanceGRPO and BranchGRPO
  decode and score instead of ``final``; equal to it when the last step lands on ``sigma = 0``
  without noise);
* ``transitions``: for every stochastic step of every row, the latent before (``x``) and after
  (``x_next``), the step index and timestep, the step mean, std and the fp32 Gaussian log-prob of
  the transition (reduction: ``reduction``, see :mod:`diffalign.losses.grpo`), the row's prompt,
  and its tree position (``depth``, ``node``);
* ``ancestors[d][leaf]``: the row at tree depth ``d`` (= number of branch points passed) that
  each leaf descends from; without branching there is one depth and ``ancestors[0] = arange(L)``.

Classifier-free guidance is batched: :class:`GuidedModel` runs cond and uncond rows in one
forward. Transitions are drawn and scored by ``StepKind.sample``; the trainer recomputes
log-probs with the same :class:`GuidedModel` and ``StepKind.log_prob_and_moments`` (the same
mean, std and Gaussian log-prob), so on-policy log-probs match the recorded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..models.base import Cond, cat_cond, index_cond, repeat_cond
from .schedules import RolloutPlan, SamplingTable
from .steps import EulerODE, ODESolver, StepCoeffs, StepKind, split_prediction

TRANSITION_KEYS = ("x", "x_next", "mean", "log_prob", "std", "step", "timestep", "prompt", "depth", "node")


class GuidedModel:
    """``(x, t, prompt_index) -> model output`` (fp32), with CFG batched into one forward.

    ``cond`` holds one row per prompt; ``uncond`` one row (the empty prompt) or None.
    ``guidance_scale <= 1`` or ``uncond=None`` runs the conditional branch only (training without
    CFG). A family with ``adapter.distilled_guidance`` (FLUX) never runs CFG: ``guidance_scale`` goes
    into the conditioning (``adapter.with_guidance``), as its pipeline passes it. ``max_rows`` splits large batches into forwards of at most that many rows (each CFG
    forward holds ``2 * rows``). ``calls`` / ``rows`` count forwards and rows for benchmarks.
    """

    def __init__(self, adapter, cond: Cond, uncond: Cond | None = None, guidance_scale: float = 1.0,
                 max_rows: int | None = None) -> None:
        self.adapter = adapter
        self.cond = adapter.with_guidance(cond, guidance_scale) if adapter.distilled_guidance else cond
        self.uncond = None if adapter.distilled_guidance else uncond
        self.guidance_scale = float(guidance_scale)
        self.max_rows = max_rows
        self.calls = 0
        self.rows = 0

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale > 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, prompt_index: torch.Tensor, net=None) -> torch.Tensor:
        n = x.shape[0]
        if self.max_rows and n > self.max_rows:
            return torch.cat([self(x[i:i + self.max_rows], t[i:i + self.max_rows], prompt_index[i:i + self.max_rows], net)
                              for i in range(0, n, self.max_rows)])
        cond = index_cond(self.cond, prompt_index.to(next(iter(self.cond.values())).device))
        self.calls += 1
        self.rows += n
        if not self.uses_cfg:
            return self.adapter.predict(x, t, cond, denoiser=net).float()
        both = cat_cond(cond, repeat_cond(self.uncond, n))
        out = self.adapter.predict(torch.cat([x, x]), torch.cat([t, t]), both, denoiser=net).float()
        out_c, out_u = out.chunk(2)
        return self.adapter.guide(out_c, out_u, self.guidance_scale)


@dataclass
class Rollout:
    table: SamplingTable
    final: torch.Tensor  # [L, C, H, W]
    prompt_index: torch.Tensor  # [L]
    ancestors: list[torch.Tensor]  # per depth d: [L] row index at depth d
    rows_per_depth: list[int]
    transitions: dict[str, torch.Tensor] = field(default_factory=dict)
    model_calls: int = 0
    model_rows: int = 0
    last_x0: torch.Tensor | None = None  # [L, C, H, W] x0-prediction of the last step

    @property
    def num_transitions(self) -> int:
        return 0 if not self.transitions else int(self.transitions["log_prob"].shape[0])


def _step_coeffs(host: StepCoeffs, on_device: StepCoeffs, i: int, n: int) -> StepCoeffs:
    """Step ``i``'s coefficients for ``n`` rows, the values of ``table.coeffs_at(i, n, device)``, from
    every step's coefficients on the CPU (``host``) and on the device (``on_device``) without a
    transfer; they carry their CPU copy (``.host``) for the solvers' branches."""
    co = StepCoeffs(**{f.name: getattr(on_device, f.name)[i].repeat(n) for f in fields(StepCoeffs)})
    co.host = StepCoeffs(**{f.name: getattr(host, f.name)[i].repeat(n) for f in fields(StepCoeffs)})
    return co


def _repeat_state(state: dict, k: int) -> None:
    for key, v in list(state.items()):
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            state[key] = v.repeat_interleave(k, dim=0)


@torch.no_grad()
def rollout(
    model: GuidedModel,
    table: SamplingTable,
    plan: RolloutPlan,
    kind: StepKind,
    noise: torch.Tensor,
    prompt_index: torch.Tensor,
    generator: torch.Generator | None = None,
    solver: ODESolver | None = None,
    reduction: str = "mean",
    net=None,
    pre_solver: ODESolver | None = None,
) -> Rollout:
    """Sample from ``noise`` (the roots, [R0, C, H, W]) along ``plan``; see the module docstring.

    ODE steps run ``solver``, except those before the plan's first stochastic step, which run
    ``pre_solver`` when given (``sampler.pre_window_solver``; MixGRPO-Flash: Euler before the window,
    DPM-Solver++(2M) after it). A plan without a stochastic step runs ``solver`` throughout.

    Stochastic steps draw their noise from ``generator`` (CPU) in row order. A step the plan
    marks stochastic whose kind has zero std (e.g. CPS's last step) runs as an ODE step. At a
    branch step the model runs once per node, before its rows are copied (BranchGRPO: the children
    share the parent's prediction); their noise is scaled by ``plan.split_noise_scale``.
    """
    if plan.num_steps != table.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps, table {table.num_steps}")
    solver = solver or EulerODE()
    calls0, rows0 = model.calls, model.rows
    x = noise.float()
    device = x.device
    rows_prompt = prompt_index.to(device).long()
    node_at = [torch.arange(x.shape[0], device=device)]
    rows_per_depth = [x.shape[0]]
    rec: dict[str, list] = {k: [] for k in TRANSITION_KEYS}
    state: dict = {}
    x0 = None
    first_stochastic = next((j for j, st in enumerate(plan.stochastic) if st), 0)
    # The loop never waits for the device. Its branches are decided on the host, from the table's
    # CPU coefficients: which planned steps draw noise (a kind with zero std there runs an ODE step)
    # and the solvers' end-of-schedule checks; a bool() of a device tensor would block until the
    # queued forwards finish. The table goes to the device once, here: a blocking host-to-device
    # copy (.to() without non_blocking) waits for the device's queue as well.
    host = table.coeffs(torch.arange(table.num_steps))
    noisy = (kind.std(host) > 0).tolist()
    on_device = host.to(device)
    timesteps, next_timesteps = table.timesteps.to(device), table.next_timesteps.to(device)
    # the noise is drawn on the CPU (one generator, the same draws on every device); into pinned
    # memory on a GPU, so its copy is queued without waiting (pageable memory is staged at once)
    pinned = device.type == "cuda"
    for i in range(table.num_steps):
        n = x.shape[0]
        co = _step_coeffs(host, on_device, i, n)
        t = timesteps[i].repeat(n)
        x0, eps = split_prediction(model(x, t, rows_prompt, net), x, co.alpha, co.sigma, table.parametrization)
        k = plan.branches.get(i, 1)
        if k > 1:  # one forward per node; its k children share the prediction and differ by their noise
            x, x0, eps, t = (v.repeat_interleave(k, dim=0) for v in (x, x0, eps, t))
            rows_prompt = rows_prompt.repeat_interleave(k)
            node_at = [a.repeat_interleave(k) for a in node_at] + [torch.arange(x.shape[0], device=device)]
            rows_per_depth.append(x.shape[0])
            _repeat_state(state, k)
            n = x.shape[0]
            co = _step_coeffs(host, on_device, i, n)
        if plan.stochastic[i] and noisy[i]:
            z = torch.randn(x.shape, generator=generator, dtype=torch.float32, pin_memory=pinned)
            z = z.to(device, non_blocking=True)
            if k > 1:
                z = z * plan.split_noise_scale
            x_next, log_prob, mean, std = kind.sample(x, x0, eps, co, z, reduction)
            depth = len(node_at) - 1
            for key, v in (("x", x), ("x_next", x_next), ("mean", mean), ("log_prob", log_prob), ("std", std),
                           ("step", torch.full((n,), i, dtype=torch.long, device=device)), ("timestep", t.float()),
                           ("prompt", rows_prompt), ("depth", torch.full((n,), depth, dtype=torch.long, device=device)),
                           ("node", torch.arange(n, device=device))):
                rec[key].append(v)
            if plan.carry_ode_history:
                solver.observe(x0, co, state)
            else:
                state.clear()
        else:
            predict_next = None
            if float(table.next_timesteps[i]) >= 0:
                t_next = next_timesteps[i].repeat(n)

                def predict_next(x_tmp, t_next=t_next, co=co):
                    out = model(x_tmp, t_next, rows_prompt, net)
                    return split_prediction(out, x_tmp, co.alpha_next, co.sigma_next, table.parametrization)

            step_solver = pre_solver if pre_solver is not None and i < first_stochastic else solver
            x_next = step_solver.step(x, x0, eps, co, state, predict_next)
        x = x_next
    transitions = {k: torch.cat(v) for k, v in rec.items() if v}
    return Rollout(table, x, rows_prompt, node_at, rows_per_depth, transitions,
                   model.calls - calls0, model.rows - rows0, x0)


class DeterministicStep(StepKind):
    """A step kind with zero std: every step of a rollout with it runs the ODE solver (plain
    sampling; the rollouts of the forward-process methods, which need no log-probs)."""

    name = "ode"

    def std(self, co):
        return torch.zeros_like(co.sigma)

    def mean(self, x, x0, eps, co):  # pragma: no cover - never called (std is 0)
        raise RuntimeError("deterministic step kind")


def sample(model: GuidedModel, table: SamplingTable, noise: torch.Tensor, prompt_index: torch.Tensor,
           solver: ODESolver | None = None, net=None) -> torch.Tensor:
    """Deterministic sampling (every step an ODE step): final latents [R, C, H, W]."""
    from .schedules import ode_plan

    return rollout(model, table, ode_plan(table.num_steps), DeterministicStep(0.0), noise, prompt_index, solver=solver, net=net).final


def cat_rollouts(parts: list[Rollout]) -> Rollout:
    """Concatenate rollouts of the same plan (e.g. prompt chunks): row/node indices are offset per depth."""
    if len(parts) == 1:
        return parts[0]
    depths = len(parts[0].rows_per_depth)
    offsets = [0] * depths
    ancestors = [[] for _ in range(depths)]
    trans: dict[str, list] = {}
    for p in parts:
        for d in range(depths):
            ancestors[d].append(p.ancestors[d] + offsets[d])
        if p.transitions:
            node = p.transitions["node"].clone()
            for d in range(depths):
                node[p.transitions["depth"] == d] += offsets[d]
            for k, v in p.transitions.items():
                trans.setdefault(k, []).append(node if k == "node" else v)
        for d in range(depths):
            offsets[d] += p.rows_per_depth[d]
    return Rollout(
        parts[0].table,
        torch.cat([p.final for p in parts]),
        torch.cat([p.prompt_index for p in parts]),
        [torch.cat(a) for a in ancestors],
        offsets,
        {k: torch.cat(v) for k, v in trans.items()},
        sum(p.model_calls for p in parts),
        sum(p.model_rows for p in parts),
        None if any(p.last_x0 is None for p in parts) else torch.cat([p.last_x0 for p in parts]),
    )
