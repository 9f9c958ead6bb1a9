"""Step kinds, ODE solvers and sampling tables: pure math, no model weights (fast)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Normal

from diffalign.losses import gaussian_log_prob
from diffalign.models import SD3Adapter, UNetAdapter
from diffalign.pipelines import (
    CPSStep, DanceSDEStep, DDIMStep, DPMSolver2M, EulerODE, FlowSDEStep, HeunODE, StepCoeffs, full_plan, make_step_kind,
    sampling_table, split_prediction, tree_plan, window_plan, window_start,
)

SHAPE = (3, 4, 6, 6)


def _unet_adapter(prediction_type="epsilon", set_alpha_to_one=None):
    from diffusers import DDPMScheduler

    kw = {} if set_alpha_to_one is None else {"set_alpha_to_one": set_alpha_to_one}
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    if kw:
        sched.register_to_config(**kw)
    return _bare(UNetAdapter, sched)


def _flow_adapter(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return _bare(SD3Adapter, sched)


def _bare(cls, sched):
    """The family's adapter with only its schedulers (no networks): the schedule is the adapter's."""
    adapter = cls.__new__(cls)
    adapter.noise_scheduler, adapter.pipe = sched, SimpleNamespace(scheduler=sched)
    return adapter


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _normal_lp(x, mean, std):
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1, 1).expand_as(x)
    return Normal(mean, std).log_prob(x).flatten(1).mean(1)


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_torch_normal(reduction):
    x, mean = _rand(*SHAPE), _rand(*SHAPE, seed=1)
    std = torch.tensor([0.1, 0.5, 2.0])
    ref = Normal(mean, std.view(-1, 1, 1, 1).expand_as(x)).log_prob(x).flatten(1)
    ref = ref.mean(1) if reduction == "mean" else ref.sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction), ref)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3, reduction),
                               (Normal(mean, 0.3).log_prob(x).flatten(1).mean(1) if reduction == "mean" else Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)))


def _flow_case(i=1, steps=6):
    table = sampling_table(_flow_adapter(), steps)
    co = table.coeffs_at(i, SHAPE[0])
    x, v = _rand(*SHAPE), _rand(*SHAPE, seed=2)
    return table, co, x, v


def test_flow_sde_log_prob_is_flow_grpo_gaussian():
    """Flow-GRPO's update written as in its paper, density by torch.distributions.Normal."""
    _, co, x, v = _flow_case(2)
    a = 0.7
    sigma, sigma_next = co.sigma.view(-1, 1, 1, 1), co.sigma_next.view(-1, 1, 1, 1)
    dt = sigma_next - sigma
    std_t = a * torch.sqrt(sigma / (1 - sigma))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = (std_t * torch.sqrt(-dt)).flatten()
    x_next = mean + std.view(-1, 1, 1, 1) * _rand(*SHAPE, seed=3)
    kind = FlowSDEStep(a)
    x0, eps = split_prediction(v, x, co.alpha, co.sigma, "flow")
    torch.testing.assert_close(kind.std(co), std)
    torch.testing.assert_close(kind.log_prob(x_next, x, x0, eps, co), _normal_lp(x_next, mean, std), rtol=1e-5, atol=1e-5)


def test_flow_sde_first_step_uses_second_sigma():
    table, co, x, v = _flow_case(0)
    assert float(co.sigma[0]) == pytest.approx(1.0)
    a = 0.7
    dt = co.sigma_next - co.sigma
    expect = a * torch.sqrt(co.sigma / (1 - table.sigma_next[0])) * torch.sqrt(-dt)
    torch.testing.assert_close(FlowSDEStep(a).std(co), expect)
    assert torch.isfinite(FlowSDEStep(a).mean(x, *split_prediction(v, x, co.alpha, co.sigma, "flow"), co)).all()


def test_dance_sde_log_prob_is_dancegrpo_gaussian():
    _, co, x, v = _flow_case(3)
    eta = 0.3
    sigma, sigma_next = co.sigma.view(-1, 1, 1, 1), co.sigma_next.view(-1, 1, 1, 1)
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = (eta * torch.sqrt(sigma - sigma_next)).flatten()
    x_next = mean + std.view(-1, 1, 1, 1) * _rand(*SHAPE, seed=4)
    kind = DanceSDEStep(eta)
    x0h, eps = split_prediction(v, x, co.alpha, co.sigma, "flow")
    torch.testing.assert_close(kind.std(co), std)
    torch.testing.assert_close(kind.log_prob(x_next, x, x0h, eps, co), _normal_lp(x_next, mean, std), rtol=1e-5, atol=1e-5)


def test_cps_log_prob_and_preserved_coefficients():
    _, co, x, v = _flow_case(1)
    eta = 0.8
    s, sn = co.sigma.view(-1, 1, 1, 1), co.sigma_next.view(-1, 1, 1, 1)
    x0, noise_est = x - s * v, x + v * (1 - s)
    std = (sn * math.sin(eta * math.pi / 2)).flatten()
    mean = x0 * (1 - sn) + noise_est * torch.sqrt(sn**2 - std.view(-1, 1, 1, 1) ** 2)
    x_next = mean + std.view(-1, 1, 1, 1) * _rand(*SHAPE, seed=5)
    kind = CPSStep(eta)
    x0h, eps = split_prediction(v, x, co.alpha, co.sigma, "flow")
    torch.testing.assert_close(kind.log_prob(x_next, x, x0h, eps, co), _normal_lp(x_next, mean, std), rtol=1e-5, atol=1e-5)
    # coefficients preserved: x0 weight (1 - sigma_next), total noise variance sigma_next^2
    torch.testing.assert_close(kind.std(co) ** 2 + (co.sigma_next * math.cos(eta * math.pi / 2)) ** 2, co.sigma_next**2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers_and_normal(prediction_type):
    from diffusers import DDIMScheduler

    adapter = _unet_adapter(prediction_type)
    table = sampling_table(adapter, 10)
    ddim = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    ddim.set_timesteps(10)
    x, out, z = _rand(*SHAPE), _rand(*SHAPE, seed=6), _rand(*SHAPE, seed=7)
    for i in (0, 4, 9):
        co = table.coeffs_at(i, SHAPE[0])
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, table.parametrization)
        kind = DDIMStep(1.0)
        ref = ddim.step(out, int(ddim.timesteps[i]), x, eta=1.0, variance_noise=z).prev_sample
        x_next, lp, mean, std = kind.sample(x, x0, eps, co, z)
        torch.testing.assert_close(x_next, ref, rtol=1e-4, atol=1e-5)
        if float(std[0]) > 0:
            torch.testing.assert_close(lp, _normal_lp(x_next, mean, std), rtol=1e-5, atol=1e-4)
            # the trainer's recomputation path gives the rollout's numbers exactly
            lp2, mean2, std2 = kind.log_prob_and_moments(x_next, x, x0, eps, co)
            assert torch.equal(lp2, lp) and torch.equal(mean2, mean) and torch.equal(std2, std)


# ----------------------------------------------------------------------------- zero noise = ODE
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind_name", ["ddim", "cps", "flow_sde", "dance"])
def test_zero_noise_is_deterministic_ddim_for_unets(prediction_type, kind_name):
    from diffusers import DDIMScheduler

    adapter = _unet_adapter(prediction_type)
    table = sampling_table(adapter, 8)
    ddim = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    ddim.set_timesteps(8)
    x, out = _rand(*SHAPE), _rand(*SHAPE, seed=8)
    kind = make_step_kind(kind_name, 0.0)
    for i in range(8):
        co = table.coeffs_at(i, SHAPE[0])
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, table.parametrization)
        ref = ddim.step(out, int(ddim.timesteps[i]), x, eta=0.0).prev_sample
        assert float(kind.std(co).abs().max()) == 0.0
        torch.testing.assert_close(kind.mean(x, x0, eps, co), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(EulerODE().step(x, x0, eps, co, {}), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind_name", ["ddim", "cps", "flow_sde", "dance"])
def test_zero_noise_is_flow_match_euler_for_flows(kind_name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = _flow_adapter()
    table = sampling_table(adapter, 6)
    sched = FlowMatchEulerDiscreteScheduler.from_config(adapter.noise_scheduler.config)
    sched.set_timesteps(6)
    x, v = _rand(*SHAPE), _rand(*SHAPE, seed=9)
    kind = make_step_kind(kind_name, 0.0)
    for i, t in enumerate(sched.timesteps):
        co = table.coeffs_at(i, SHAPE[0])
        torch.testing.assert_close(table.timesteps[i], t.float())
        x0, eps = split_prediction(v, x, co.alpha, co.sigma, "flow")
        ref = sched.step(v, t, x).prev_sample
        assert float(kind.std(co).abs().max()) == 0.0
        torch.testing.assert_close(kind.mean(x, x0, eps, co), ref, rtol=1e-5, atol=1e-5)


def test_split_prediction_reconstructs_x():
    x, out = _rand(*SHAPE), _rand(*SHAPE, seed=10)
    for param, table in (("epsilon", sampling_table(_unet_adapter(), 5)), ("v_prediction", sampling_table(_unet_adapter("v_prediction"), 5)),
                         ("flow", sampling_table(_flow_adapter(), 5))):
        co = table.coeffs_at(2, SHAPE[0])
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, param)
        torch.testing.assert_close(co.alpha.view(-1, 1, 1, 1) * x0 + co.sigma.view(-1, 1, 1, 1) * eps, x, rtol=1e-5, atol=1e-5)


def test_stochastic_kinds_sample_with_their_std():
    """Empirical check: x_next - mean has the kind's std (all kinds, UNet and flow tables)."""
    n = 4000
    for table in (sampling_table(_unet_adapter(), 6), sampling_table(_flow_adapter(), 6)):
        co = table.coeffs_at(2, n)
        x = _rand(n, 2, 2, 2)
        x0, eps = split_prediction(_rand(n, 2, 2, 2, seed=1), x, co.alpha, co.sigma, table.parametrization)
        for kind in (DDIMStep(1.0), CPSStep(0.8), FlowSDEStep(0.7), DanceSDEStep(0.3)):
            x_next, _, mean, std = kind.sample(x, x0, eps, co, _rand(n, 2, 2, 2, seed=2))
            assert float((x_next - mean).std()) == pytest.approx(float(std[0]), rel=0.05)


# ----------------------------------------------------------------------------- ODE solvers
def _gaussian_data_ode(table, solver, c=0.5, n=64):
    """Data N(0, c^2 I): exact x0-predictor known; PF-ODE maps x_T to x_T * c / sqrt(a_T^2 c^2 + s_T^2)."""
    x = _rand(n, 1, 2, 2, seed=11)
    x_init = x.clone()
    state: dict = {}

    def predict(xx, alpha, sigma):
        a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        x0 = a * c**2 / (a**2 * c**2 + s**2) * xx
        return x0, (xx - a * x0) / s

    for i in range(table.num_steps):
        co = table.coeffs_at(i, n)
        x0, eps = predict(x, co.alpha, co.sigma)
        nxt = (lambda xe, co=co: predict(xe, co.alpha_next, co.sigma_next)) if float(co.sigma_next[0]) > 0 else None
        x = solver.step(x, x0, eps, co, state, nxt)
    co0 = table.coeffs_at(0, 1)
    m_T = math.sqrt(float(co0.alpha) ** 2 * c**2 + float(co0.sigma) ** 2)
    last = table.coeffs_at(table.num_steps - 1, 1)
    m_end = math.sqrt(float(last.alpha_next) ** 2 * c**2 + float(last.sigma_next) ** 2)
    return float((x - x_init * m_end / m_T).abs().max())


@pytest.mark.parametrize("adapter_fn", [_unet_adapter, _flow_adapter])
def test_higher_order_solvers_beat_euler(adapter_fn):
    table = sampling_table(adapter_fn(), 6)
    err_euler = _gaussian_data_ode(table, EulerODE())
    err_heun = _gaussian_data_ode(table, HeunODE())
    err_dpm = _gaussian_data_ode(table, DPMSolver2M())
    assert err_heun < 0.5 * err_euler
    assert err_dpm < err_euler


# ----------------------------------------------------------------------------- tables & plans
def test_tables_follow_diffusers_timesteps():
    from diffusers import DDIMScheduler

    adapter = _unet_adapter()
    table = sampling_table(adapter, 10)
    ddim = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    ddim.set_timesteps(10)
    assert table.timesteps.long().tolist() == ddim.timesteps.tolist()
    assert float(table.alpha_next[-1]) == pytest.approx(1.0)  # set_alpha_to_one default
    table2 = sampling_table(_unet_adapter(set_alpha_to_one=False), 10)
    assert float(table2.alpha_next[-1]) == pytest.approx(math.sqrt(float(adapter.noise_scheduler.alphas_cumprod[0])))
    ft = sampling_table(_flow_adapter(), 4)
    assert float(ft.sigma[0]) == pytest.approx(1.0) and float(ft.sigma_next[-1]) == 0.0
    assert float(ft.next_timesteps[-1]) < 0


def test_plans():
    assert full_plan(4).stochastic == [True] * 4
    assert window_plan(6, 2, 3).stochastic == [False, False, True, True, True, False]
    with pytest.raises(ValueError):
        window_plan(4, 2, 3)
    t = tree_plan(6, [1, 3], 3, sde_between=False)
    assert t.stochastic == [False, True, False, True, False, False] and t.leaves_per_root == 9
    assert tree_plan(6, [0], 2).stochastic == [True] * 6


def test_window_start_slides_and_wraps():
    starts = [window_start(i, num_steps=6, size=2, start=0, shift=1, interval=2) for i in range(12)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
    g = torch.Generator().manual_seed(0)
    rs = {window_start(i, 6, 2, start=1, end=3, mode="random", generator=g) for i in range(50)}
    assert rs == {1, 2, 3}


def test_coeffs_index():
    co = sampling_table(_flow_adapter(), 4).coeffs(torch.tensor([0, 1, 2, 3]))
    sub = co.index(torch.tensor([1, 3]))
    assert isinstance(sub, StepCoeffs) and sub.sigma.shape == (2,)


def test_a_family_with_dynamic_shifting_only_overrides_its_adapter():
    """FLUX-style sampling (``set_timesteps`` needs ``mu`` from the image sequence length) is one
    adapter override: ``sampling_table`` passes the image size through and the table follows it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class DynamicShiftAdapter(SD3Adapter):
        def set_timesteps_kwargs(self, num_steps, height, width):
            seq_len = (height // 16) * (width // 16)  # 2x2-patchified latents of an 8x VAE
            return {"mu": 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)}

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    small, large = (sampling_table(_bare(DynamicShiftAdapter, sched), 4, height=h, width=h) for h in (256, 1024))
    assert float(small.sigma[0]) == pytest.approx(1.0) and float(small.sigma_next[-1]) == 0.0
    assert (large.sigma[1:] > small.sigma[1:]).all()  # bigger images: more shift toward noise
    with pytest.raises(ValueError, match="mu"):  # the plain flow adapter has no mu to give
        sampling_table(_bare(SD3Adapter, sched), 4)


# ----------------------------------------------------------------------------- MixGRPO windows and Flash
def _mixgrpo_windows(iterations, num_steps, size, shift, interval):
    """MixGRPO's GRPOTrainingStates (progressive, prog_overlap, roll_back) as written in its repo's description:
    window range(cur, min(cur + size, max_timesteps)) with max_timesteps = num_steps - 2; every `interval`
    iterations cur += shift; past max_timesteps back to 0. Empty windows (cur == max_timesteps) are dropped."""
    cur, it, out = 0, 0, []
    while len(out) < iterations:
        window = list(range(cur, min(cur + size, num_steps - 2)))
        it += 1
        if it >= interval:
            it, cur = 0, cur + shift
        if cur > num_steps - 2:
            it, cur = 0, 0
        if window:
            out.append(window)
    return out


@pytest.mark.parametrize("num_steps,size,shift,interval", [(6, 2, 1, 2), (10, 4, 1, 1), (25, 4, 2, 3)])
def test_window_truncates_at_the_end_of_a_sweep_as_mixgrpo(num_steps, size, shift, interval):
    from diffalign.trainers.rollout_schedule import make_plan
    from diffalign.trainers.grpo_config import GRPOConfig, SamplerOptions, ScheduleOptions, WindowOptions

    cfg = GRPOConfig(sampler=SamplerOptions(num_steps=num_steps), schedule=ScheduleOptions(
        kind="window", window=WindowOptions(size=size, start=0, shift=shift, interval=interval)))
    n = 3 * num_steps * interval
    ours = [make_plan(cfg, i, torch.Generator())[0].stochastic_steps for i in range(n)]
    assert ours == _mixgrpo_windows(n, num_steps, size, shift, interval)
    assert all(num_steps - 1 not in w and num_steps - 2 not in w for w in ours)  # never the last two steps
    cfg.schedule.window.sweep_end = "wrap"  # the old convention: whole windows, the last step trained
    wrapped = [make_plan(cfg, i, torch.Generator())[0].stochastic_steps for i in range(n)]
    assert all(len(w) == size for w in wrapped) and max(map(max, wrapped)) > max(map(max, ours))


class _ToyFlowModel:
    """A smooth stand-in for a flow network (velocity from x and the timestep), counting rows like GuidedModel."""

    def __init__(self):
        self.calls = self.rows = 0

    def __call__(self, x, t, prompt_index, net=None):
        self.calls += 1
        self.rows += x.shape[0]
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return 0.8 * x - (1 - s) * torch.tanh(x.flip(-1))


def test_mixgrpo_flash_shortens_the_post_window_ode_and_carries_dpm_history():
    """Window [0, 2) of 10 steps, ratio 0.4: MixGRPO puts int((10 - 1) * 0.4) = 3 sigma points after the window (2 steps),
    and its DPM-Solver++(2M) state holds the x0 of the window's last SDE step, so the first post step is 2nd order.
    Written out here: Flow-SDE steps, then x_next = (s_n/s) x - a_n (e^-h - 1) D, D = x0 + (x0 - x0_prev) / (2 r)."""
    from diffalign.pipelines import post_window_compressed, rollout

    table = sampling_table(_flow_adapter(), 10)
    kind = make_step_kind("flow_sde")
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    prompts = torch.tensor([0, 1])
    ctable, cplan = post_window_compressed(table, window_plan(10, 0, 2), 0.4)
    assert ctable.num_steps == 4 and cplan.stochastic == [True, True, False, False] and cplan.carry_ode_history
    grid = torch.cat([table.sigma, table.sigma_next[-1:]])  # sigma points 0..10
    torch.testing.assert_close(ctable.sigma_next, grid[[1, 2, 6, 10]])
    torch.testing.assert_close(ctable.sigma, grid[[0, 1, 2, 6]])
    torch.testing.assert_close(ctable.timesteps[2:], table.timesteps[[2, 6]])

    model = _ToyFlowModel()
    got = rollout(model, ctable, cplan, kind, noise, prompts, torch.Generator().manual_seed(1), solver=DPMSolver2M())
    assert got.model_rows == 2 * 4  # vs 2 * 10 without Flash

    # the reference
    g = torch.Generator().manual_seed(1)
    x, hist = noise.clone(), None
    ref_model = _ToyFlowModel()
    for i in range(2):
        co = table.coeffs_at(i, 2)
        x0, eps = split_prediction(ref_model(x, table.timesteps[i].expand(2), prompts), x, co.alpha, co.sigma, "flow")
        x, _, _, _ = kind.sample(x, x0, eps, co, torch.randn(x.shape, generator=g))
        lam = lambda s: math.log((1 - s) / s)  # noqa: E731
        hist = (x0, lam(float(grid[i + 1])) - lam(float(grid[i]))) if float(grid[i]) < 1 else None  # step 1's is used
    for a, b in ((2, 6), (6, 10)):
        s, s_n = float(grid[a]), float(grid[b])
        v = ref_model(x, table.timesteps[a].expand(2), prompts)
        x0 = x - s * v
        if s_n == 0:
            x = x0
            break
        h = math.log((1 - s_n) / s_n) - math.log((1 - s) / s)
        r = hist[1] / h
        d = x0 + (x0 - hist[0]) / (2 * r)
        x = (s_n / s) * x - (1 - s_n) * math.expm1(-h) * d
        hist = (x0, h)
    torch.testing.assert_close(got.final, x, rtol=1e-5, atol=1e-5)
    # without the carried history the first post step is first order: a different sample
    cplan.carry_ode_history = False
    fresh = rollout(_ToyFlowModel(), ctable, cplan, kind, noise, prompts, torch.Generator().manual_seed(1), solver=DPMSolver2M())
    assert not torch.allclose(fresh.final, x, atol=1e-4)
