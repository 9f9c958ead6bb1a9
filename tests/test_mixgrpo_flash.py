"""MixGRPO-Flash's rollout against the release (issue 25 item 1).

The release is Tencent-Hunyuan/MixGRPO (indexed as zqqqqz2000/MixGRPO), ``fastvideo/utils/sampling_utils.py``
``run_sample_step`` with ``--dpm_algorithm_type dpmsolver++ --dpm_apply_strategy post --dpm_post_compress_ratio 0.4
--dpm_solver_order 2 --dpm_solver_type midpoint --flow_grpo_sampling``
(scripts/finetune/finetune_flux_grpo_MixGRPO_Flash.sh).
Its rule, restated here in plain Python floats (independent of diffalign's torch code):

* schedule: ``u = linspace(1, 0, N + 1)``, ``sigma = shift u / (1 + (shift - 1) u)`` (shift 3);
* ``L`` = the window's last step. Steps ``0..L`` keep the schedule; after them come
  ``P = int(max((N - L) * ratio, 1))`` points ``shift(linspace(u_{L+1}, 0, P))``, i.e. ``P - 1`` ODE steps
  (none when ``P = 1``: the sample then stops at ``sigma_{L+1}``);
* before the window: the deterministic flow_grpo step, ``x + (sigma_{i+1} - sigma_i) v`` (Euler);
* in the window: flow_grpo's SDE step,
  ``mean = x (1 + g^2 dt / (2 s)) + v (1 + g^2 (1 - s) / (2 s)) dt``, ``x = mean + g sqrt(-dt) z``,
  ``g = eta sqrt(s / (1 - s))`` (``s = 1`` uses ``sigma_1`` in the denominator), ``dt = sigma_{i+1} - s``;
* after it: DPM-Solver++(2M) (midpoint) on the new points, its history the ``x0 = x - s v`` of every step
  up to ``L``: ``x' = (s'/s) x - (1 - s') (e^{-h} - 1) (x0 + (x0 - x0_prev) / (2 r))``,
  ``lambda = log((1 - s) / s)``, ``h = lambda(s') - lambda(s)``, ``r = h_prev / h``; the last step
  (to ``sigma = 0``) is first order, i.e. ``x' = x0``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError, load_config
from diffalign.pipelines import (
    DPMSolver2M, EulerODE, FlowSDEStep, post_window_compressed, rollout, time_shift_table, window_plan,
)
from diffalign.trainers.rollout_schedule import make_plan, rollout_table

RECIPE = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "recipes" / "flux1_dev_mixgrpo_flash.yaml"
N, SHIFT, RATIO, ETA = 25, 3.0, 0.4, 0.7


def _shift(u: float) -> float:
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def release_sigmas(last: int, num_steps: int = N, ratio: float = RATIO) -> list[float]:
    """The release's sigma points of a rollout whose window ends at step ``last`` (see the module docstring)."""
    u = [1 - k / num_steps for k in range(num_steps + 1)]
    points = int(max((num_steps - last) * ratio, 1))
    post = [u[last + 1] * (1 - j / (points - 1)) for j in range(points)] if points > 1 else [u[last + 1]]
    return [_shift(x) for x in u[:last + 1]] + [_shift(x) for x in post]


def _grid(table) -> torch.Tensor:
    return torch.cat([table.sigma, table.sigma_next[-1:]])


def _recipe_plans():
    """(window start, plan) of every window position of the recipe's sweep (truncated at num_steps - 2)."""
    cfg = load_config(RECIPE, [])
    w = cfg.schedule.window
    seen = {}
    for it in range(0, 30 * w.interval, w.interval):
        plan, info = make_plan(cfg, it, torch.Generator())
        seen.setdefault(info["window_start"], plan)
    return cfg, seen


# the post-window point count at window starts 4, 5, 7, 8 (last steps 7, 8, 10, 11): int((25 - L) * 0.4)
@pytest.mark.parametrize("start,points", [(4, 7), (5, 6), (7, 6), (8, 5), (17, 2), (18, 1), (22, 1)])
def test_recipe_post_window_sigma_grid_is_the_releases(start, points):
    cfg, plans = _recipe_plans()
    assert sorted(plans) == list(range(23))  # MixGRPO's sweep: starts 0..22, the window cut at step 22
    plan = plans[start]
    last = plan.stochastic_steps[-1]
    assert last == min(start + 3, 22)
    want = release_sigmas(last)
    assert len(want) - (last + 1) == points
    table, cplan = rollout_table(cfg, time_shift_table(N, SHIFT), plan)
    assert table.num_steps == len(want) - 1 and cplan.carry_ode_history
    assert cplan.stochastic == [start <= i <= last for i in range(len(want) - 1)]
    torch.testing.assert_close(_grid(table), torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(table.alpha, 1 - table.sigma)
    torch.testing.assert_close(table.timesteps, table.sigma * 1000)
    ends_at = torch.where(table.sigma_next > 0, table.sigma_next * 1000, torch.full_like(table.sigma_next, -1.0))
    torch.testing.assert_close(table.next_timesteps, ends_at)


@pytest.mark.parametrize("start", range(23))
def test_every_window_of_the_sweep_has_the_releases_grid(start):
    cfg, plans = _recipe_plans()
    last = plans[start].stochastic_steps[-1]
    table, _ = rollout_table(cfg, time_shift_table(N, SHIFT), plans[start])
    torch.testing.assert_close(_grid(table), torch.tensor(release_sigmas(last), dtype=torch.float32), rtol=0, atol=1e-6)


def test_post_window_to_zero_adds_the_missing_last_step():
    """post_window_to_zero (diffalign's default): a late window still ends at sigma 0, with one step."""
    cfg = load_config(RECIPE, ["schedule.window.post_window_to_zero=true"])
    table, cplan = rollout_table(cfg, time_shift_table(N, SHIFT), window_plan(N, 19, 4))  # L = 22: one point
    assert table.num_steps == 24 and cplan.stochastic[-1] is False
    torch.testing.assert_close(_grid(table), torch.tensor(release_sigmas(22) + [0.0], dtype=torch.float32),
                               rtol=0, atol=1e-6)
    release, _ = rollout_table(load_config(RECIPE, []), time_shift_table(N, SHIFT), window_plan(N, 19, 4))
    assert release.num_steps == 23 and float(release.sigma_next[-1]) == pytest.approx(_shift(2 / 25))


def test_scheduler_tables_keep_the_count_on_their_own_grid():
    """Without a time-shift table the points are the table's own (evenly subsampled), the count the release's."""
    table = time_shift_table(N, SHIFT)
    for last in range(3, 23):
        ctable, _ = post_window_compressed(table, window_plan(N, last, 1), RATIO, shift=None, to_zero=False)
        grid, full = _grid(ctable), _grid(table)
        assert ctable.num_steps == len(release_sigmas(last)) - 1
        assert all(bool((full == s).any()) for s in grid)  # every point is a table point
        if len(grid) > last + 2:
            assert float(grid[-1]) == 0.0


class _ToyFlow:
    """A smooth stand-in for a flow network: velocity from x and the timestep (nonlinear, so solvers differ)."""

    calls = rows = 0  # GuidedModel's counters, read by rollout

    def __call__(self, x, t, prompt_index=None, net=None):
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return 0.8 * x - (1 - s) * torch.tanh(x.flip(-1))


def release_rollout(noise: torch.Tensor, start: int, last: int, generator: torch.Generator):
    """The release's Flash rollout on ``_ToyFlow`` (module docstring): ``(latent entering the window, final)``."""
    sig = release_sigmas(last)
    model, x, x0_prev, enter = _ToyFlow(), noise.clone(), None, None
    v_at = lambda x, s: model(x, torch.full((x.shape[0],), s * 1000))  # noqa: E731
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        v = v_at(x, s)
        x0 = x - s * v
        if i < start:  # Euler
            x = x + (s_next - s) * v
        elif i <= last:  # flow_grpo's SDE step
            if i == start:
                enter = x.clone()
            dt = s_next - s
            g = ETA * math.sqrt(s / (1 - (sig[1] if s == 1 else s)))
            mean = x * (1 + g**2 / (2 * s) * dt) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
            x = mean + g * math.sqrt(-dt) * torch.randn(x.shape, generator=generator)
        elif s_next == 0:  # DPM-Solver++'s final step: first order
            x = x0
        else:  # DPM-Solver++(2M), midpoint
            lam = lambda q: math.log((1 - q) / q)  # noqa: E731
            h, h_prev = lam(s_next) - lam(s), lam(s) - lam(sig[i - 1])
            d = x0 + (x0 - x0_prev) / (2 * (h_prev / h))
            x = (s_next / s) * x - (1 - s_next) * math.expm1(-h) * d
        x0_prev = x0
    return enter, x


@pytest.mark.parametrize("start", [3, 8, 16, 19])
def test_flash_rollout_latents_are_the_releases(start):
    """Euler before the window (the latent entering it is a plain Euler ODE rollout's), Flow-SDE in it,
    DPM-Solver++(2M) with the carried history after it, on the release's points; start 19 ends at sigma_23."""
    cfg, plans = _recipe_plans()
    plan = plans[start]
    last = plan.stochastic_steps[-1]
    table, cplan = rollout_table(cfg, time_shift_table(N, SHIFT), plan)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = torch.zeros(2, dtype=torch.long)
    run = lambda pre: rollout(_ToyFlow(), table, cplan, FlowSDEStep(ETA), noise, prompts,  # noqa: E731
                              torch.Generator().manual_seed(1), solver=DPMSolver2M(), pre_solver=pre)
    got = run(EulerODE())
    enter, final = release_rollout(noise, start, last, torch.Generator().manual_seed(1))
    tr = got.transitions
    torch.testing.assert_close(tr["x"][tr["step"] == start], enter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.final, final, rtol=1e-5, atol=1e-5)
    # DPM-Solver++(2M) before the window too (pre_window_solver null): another latent enters it
    other = run(None).transitions
    assert not torch.allclose(other["x"][other["step"] == start], enter, atol=1e-5)


def test_pre_window_solver_validates_and_the_recipe_uses_euler():
    assert load_config(RECIPE, []).sampler.pre_window_solver == "euler"
    assert load_config(RECIPE, ["sampler.pre_window_solver=null"]).sampler.pre_window_solver is None
    with pytest.raises(ConfigError, match=r"sampler\.pre_window_solver"):
        load_config(RECIPE, ["sampler.pre_window_solver=rk4"])
