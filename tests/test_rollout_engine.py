"""The rollout engine on tiny models: CFG batching, recorded log-probs, trees, diffusers parity."""

from __future__ import annotations

import pytest
import torch

from diffalign.models import FAMILIES, load_adapter
from diffalign.pipelines import (
    GuidedModel, cat_rollouts, full_plan, make_step_kind, rollout, sample, sampling_table, split_prediction,
    tree_plan, window_plan,
)

PROMPTS = ["a red apple", "a blue car"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_adapter(tiny_model(kind))
        return cache[kind]

    return get


class CallCounter:
    """Forward hook on the denoiser: number of calls and rows (batch entries) it saw."""

    def __init__(self, module):
        self.calls, self.rows, self.batches = 0, 0, []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.calls += 1
        self.rows += x.shape[0]
        self.batches.append(x.shape[0])

    def remove(self):
        self.handle.remove()


def _model(adapter, cfg=True, scale=4.5, max_rows=None):
    cond = adapter.encode_prompt(PROMPTS)
    uncond = adapter.encode_prompt([""]) if cfg else None
    return GuidedModel(adapter, cond, uncond, scale, max_rows=max_rows)


def _noise(adapter, n, seed=0):
    return torch.randn((n, *adapter.latent_shape(32, 32)), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cfg_is_one_batched_forward_per_step(tiny, kind):
    adapter = tiny(kind)
    counter = CallCounter(adapter.denoiser)
    try:
        ro = rollout(_model(adapter), sampling_table(adapter, 3), full_plan(3), make_step_kind("auto", None, adapter.is_flow),
                     _noise(adapter, 4), torch.tensor([0, 0, 1, 1]), torch.Generator().manual_seed(1))
    finally:
        counter.remove()
    # cond + uncond rows together; a distilled-guidance family (FLUX) has no unconditional pass
    rows = 4 if adapter.distilled_guidance else 8
    assert counter.calls == 3 and counter.batches == [rows] * 3
    assert ro.final.shape == (4, *adapter.latent_shape(32, 32))
    no_cfg = CallCounter(adapter.denoiser)
    try:
        rollout(_model(adapter, cfg=False), sampling_table(adapter, 3), full_plan(3), make_step_kind("auto", None, adapter.is_flow),
                _noise(adapter, 4), torch.tensor([0, 0, 1, 1]), torch.Generator().manual_seed(1))
    finally:
        no_cfg.remove()
    assert no_cfg.batches == [4, 4, 4]


@pytest.mark.parametrize("kind,step", [("sd15", "ddim"), ("sd21", "ddim"), ("sd3", "flow_sde"), ("sd3", "cps"), ("sd3", "dance"), ("sd15", "flow_sde"),
                                       ("qwenimage", "flow_sde"), ("qwenimage", "cps"), ("qwenimage", "dance"),
                                       *((k, s) for k in ("flux", "flux2", "flux2-klein") for s in ("flow_sde", "cps", "dance"))])
def test_recorded_log_probs_match_recomputation(tiny, kind, step):
    """Every recorded transition: fp32 log-prob, recomputed by a fresh (differently batched) forward."""
    adapter = tiny(kind)
    model = _model(adapter)
    table = sampling_table(adapter, 4)
    k = make_step_kind(step, None)
    ro = rollout(model, table, full_plan(4), k, _noise(adapter, 4), torch.tensor([0, 1, 0, 1]), torch.Generator().manual_seed(2))
    tr = ro.transitions
    stochastic = [i for i in range(4) if float(k.std(table.coeffs_at(i, 1))[0]) > 0]
    assert ro.num_transitions == 4 * len(stochastic) and tr["log_prob"].dtype == torch.float32
    assert sorted(set(tr["step"].tolist())) == stochastic
    with torch.no_grad():
        idx = torch.randperm(ro.num_transitions, generator=torch.Generator().manual_seed(0))
        out = model(tr["x"][idx], tr["timestep"][idx], tr["prompt"][idx])
        co = table.coeffs(tr["step"][idx])
        x0, eps = split_prediction(out, tr["x"][idx], co.alpha, co.sigma, table.parametrization)
        lp = k.log_prob(tr["x_next"][idx], tr["x"][idx], x0, eps, co)
    assert float((lp - tr["log_prob"][idx]).abs().max()) < 1e-4
    # x_next of a step is x of the next step, for every row
    for s_prev, s_next in zip(stochastic, stochastic[1:]):
        if s_next == s_prev + 1:
            torch.testing.assert_close(tr["x_next"][tr["step"] == s_prev], tr["x"][tr["step"] == s_next])


def test_tree_rollout_calls_the_model_less_than_independent_trajectories(tiny):
    adapter = tiny("sd3")
    table = sampling_table(adapter, 4)
    kind = make_step_kind("flow_sde")
    roots = torch.tensor([0, 1])
    plan = tree_plan(4, [1, 2], 2)  # 2 roots -> 8 leaves
    counter = CallCounter(adapter.denoiser)
    try:
        tree = rollout(_model(adapter, max_rows=4), table, plan, kind, _noise(adapter, 2), roots, torch.Generator().manual_seed(3))
        tree_calls, tree_rows = counter.calls, counter.rows
        counter.calls = counter.rows = 0
        flat = rollout(_model(adapter, max_rows=4), table, full_plan(4), kind, _noise(adapter, 8), roots.repeat_interleave(4),
                       torch.Generator().manual_seed(3))
        flat_calls, flat_rows = counter.calls, counter.rows
    finally:
        counter.remove()
    assert tree.final.shape[0] == flat.final.shape[0] == 8
    # one forward per node: the branch steps 1 and 2 run the 2 and 4 parents, not their 4 and 8 children
    assert tree_rows == 2 * (2 + 2 + 4 + 8) and flat_rows == 2 * 8 * 4  # CFG doubles both
    assert tree_calls < flat_calls and tree_rows < flat_rows
    # structure: prompts follow the roots; ancestors per depth; one transition per row and step
    assert tree.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert tree.rows_per_depth == [2, 4, 8]
    assert tree.ancestors[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert tree.ancestors[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert tree.num_transitions == 2 + 4 + 8 + 8
    tr = tree.transitions
    assert tr["depth"].tolist() == [0] * 2 + [1] * 4 + [2] * 16
    # siblings share their parent's latent before the branch step but differ after it
    at_branch = tr["step"] == 1
    torch.testing.assert_close(tr["x"][at_branch][0], tr["x"][at_branch][1])
    assert not torch.allclose(tr["x_next"][at_branch][0], tr["x_next"][at_branch][1])


def _copy_then_step_tree(model, table, kind, noise, prompts, branches, scale, generator):
    """Reference tree rollout written out: copy every row k ways before a branch step, run the model
    on every copy, noise * scale at branch steps (BranchGRPO's split noise). Returns (final, rows)."""
    x, rows_prompt, rows = noise.float(), prompts.long(), 0
    for i in range(table.num_steps):
        k = branches.get(i, 1)
        x, rows_prompt = x.repeat_interleave(k, dim=0), rows_prompt.repeat_interleave(k)
        n = x.shape[0]
        co = table.coeffs_at(i, n)
        out = model(x, table.timesteps[i].expand(n), rows_prompt)
        rows += n
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, table.parametrization)
        z = torch.randn(x.shape, generator=generator) * (scale if k > 1 else 1.0)
        x = kind.mean(x, x0, eps, co) + kind.std(co).view(-1, 1, 1, 1) * z
    return x, rows


def test_branch_steps_run_the_model_once_per_node_with_published_split_points(tiny):
    """BranchGRPO's split points 0,3,6,9 of 20 steps, 2 ways, one root (16 leaves): copying before the
    forward costs 218 rows, one forward per node 203; the samples are the same."""
    adapter = tiny("sd3")
    table, kind = sampling_table(adapter, 20), make_step_kind("flow_sde")
    branches = {0: 2, 3: 2, 6: 2, 9: 2}
    noise, prompts = _noise(adapter, 1, seed=9), torch.tensor([0])
    with torch.no_grad():
        ref, ref_rows = _copy_then_step_tree(_model(adapter, cfg=False), table, kind, noise, prompts, branches, 4.0,
                                             torch.Generator().manual_seed(11))
    ro = rollout(_model(adapter, cfg=False), table, tree_plan(20, [0, 3, 6, 9], 2, split_noise_scale=4.0), kind, noise,
                 prompts, torch.Generator().manual_seed(11))
    assert ref_rows == 218 and ro.model_rows == 203
    assert ro.final.shape[0] == 16
    torch.testing.assert_close(ro.final, ref, rtol=1e-4, atol=1e-4)


def test_split_noise_scale_scales_only_the_branch_noise_and_keeps_the_step_std(tiny):
    adapter = tiny("sd3")
    table, kind = sampling_table(adapter, 4), make_step_kind("flow_sde")
    gen_noise = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    runs = {s: rollout(_model(adapter, cfg=False), table, tree_plan(4, [1], 2, split_noise_scale=s), kind, _noise(adapter, 2),
                       torch.tensor([0, 1]), gen_noise()) for s in (1.0, 4.0)}
    for scale, ro in runs.items():
        tr = ro.transitions
        z = (tr["x_next"] - tr["mean"]) / tr["std"].view(-1, 1, 1, 1)
        at_branch = tr["step"] == 1
        base = (runs[1.0].transitions["x_next"] - runs[1.0].transitions["mean"]) / runs[1.0].transitions["std"].view(-1, 1, 1, 1)
        # same generator draws: the branch step's noise is scale times the unscaled run's, the step before is untouched
        torch.testing.assert_close(z[at_branch], scale * base[at_branch], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z[tr["step"] == 0], base[runs[1.0].transitions["step"] == 0])
        # the log-prob is the Gaussian of the step's own std (BranchGRPO's convention), not of scale * std
        lp = kind.log_prob(tr["x_next"], tr["x"], *split_prediction(
            _model(adapter, cfg=False)(tr["x"], tr["timestep"], tr["prompt"]), tr["x"], table.coeffs(tr["step"]).alpha,
            table.coeffs(tr["step"]).sigma, table.parametrization), table.coeffs(tr["step"]))
        assert float((lp - tr["log_prob"]).abs().max()) < 1e-4


def test_tempflow_tree_has_noise_only_at_branch_steps(tiny):
    adapter = tiny("sd3")
    ro = rollout(_model(adapter, cfg=False), sampling_table(adapter, 4), tree_plan(4, [1], 4, sde_between=False),
                 make_step_kind("flow_sde"), _noise(adapter, 2), torch.tensor([0, 1]), torch.Generator().manual_seed(4))
    assert set(ro.transitions["step"].tolist()) == {1} and ro.num_transitions == 8
    assert ro.final.shape[0] == 8


def test_cat_rollouts_offsets_nodes(tiny):
    adapter = tiny("sd3")
    table, plan, kind = sampling_table(adapter, 3), tree_plan(3, [1], 2), make_step_kind("flow_sde")
    parts = [rollout(_model(adapter, cfg=False), table, plan, kind, _noise(adapter, 1, seed=s), torch.tensor([s]),
                     torch.Generator().manual_seed(s)) for s in (0, 1)]
    ro = cat_rollouts(parts)
    assert ro.rows_per_depth == [2, 4]
    assert ro.ancestors[0].tolist() == [0, 0, 1, 1] and ro.ancestors[1].tolist() == [0, 1, 2, 3]
    d1 = ro.transitions["depth"] == 1
    assert sorted(ro.transitions["node"][d1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_window_rollout_records_only_the_window(tiny):
    adapter = tiny("sd15")
    ro = rollout(_model(adapter, cfg=False), sampling_table(adapter, 5), window_plan(5, 1, 2), make_step_kind("ddim"),
                 _noise(adapter, 2), torch.tensor([0, 1]), torch.Generator().manual_seed(5))
    assert sorted(set(ro.transitions["step"].tolist())) == [1, 2] and ro.num_transitions == 4


def test_ode_sampling_matches_diffusers_sd_pipeline(tiny):
    from diffusers import DDIMScheduler

    adapter = tiny("sd15")
    pipe = adapter.pipe
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config)
    noise = _noise(adapter, 2, seed=7)
    try:
        ref = pipe(prompt=PROMPTS, num_inference_steps=5, guidance_scale=4.5, latents=noise.clone(), height=32, width=32,
                   output_type="latent").images
    finally:
        pipe.scheduler = original
    ours = sample(_model(adapter), sampling_table(adapter, 5), noise, torch.tensor([0, 1]))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_ode_sampling_matches_diffusers_sd3_pipeline(tiny):
    adapter = tiny("sd3")
    noise = _noise(adapter, 2, seed=8)
    ref = adapter.pipe(prompt=PROMPTS, num_inference_steps=5, guidance_scale=4.5, latents=noise.clone(), height=32, width=32,
                       output_type="latent").images
    ours = sample(_model(adapter), sampling_table(adapter, 5), noise, torch.tensor([0, 1]))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def test_ode_sampling_matches_diffusers_qwenimage_pipeline(tiny):
    """True CFG with the empty negative prompt (and the pipeline's norm rescale), dynamic-shift sigmas at
    32 px; the pipeline samples packed 2x2-patch tokens, the engine unpacked latents."""
    adapter = tiny("qwenimage")
    noise = _noise(adapter, 2, seed=8)
    c, h, w = noise.shape[1:]

    def packed(x):  # [B, C, h, w] -> [B, h/2 * w/2, 4C], channel-major within each 2x2 patch
        return x.view(2, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, h * w // 4, 4 * c)

    for scale in (4.5, 1.0):  # 1.0: the pipeline runs no negative branch
        ref = adapter.pipe(prompt=PROMPTS, negative_prompt="" if scale > 1 else None, true_cfg_scale=scale, num_inference_steps=5,
                           latents=packed(noise).clone(), height=32, width=32, output_type="latent").images
        ours = sample(_model(adapter, cfg=scale > 1, scale=scale), sampling_table(adapter, 5, height=32, width=32), noise,
                      torch.tensor([0, 1]))
        torch.testing.assert_close(packed(ours), ref.float(), rtol=1e-4, atol=1e-4)
    # the rescale matters: plain CFG lands elsewhere
    plain = GuidedModel(adapter, adapter.encode_prompt(PROMPTS), adapter.encode_prompt([""]), 4.5)
    plain.adapter = type("PlainCFG", (), {"predict": adapter.predict,
                                          "guide": staticmethod(lambda c_, u_, s_: u_ + s_ * (c_ - u_))})()
    other = sample(plain, sampling_table(adapter, 5, height=32, width=32), noise, torch.tensor([0, 1]))
    assert not torch.allclose(other, ours, atol=1e-3)


def test_qwenimage_schedule_follows_the_image_size_as_its_pipeline_does(tiny):
    """Dynamic shifting: ``mu`` grows with the image token count (Qwen-Image: 0.5 at 256 tokens to 0.9 at
    8192); the table at 128 px (32 x 32 = 1024 tokens) is the pipeline's own sigmas at that size."""
    import math

    adapter = tiny("qwenimage")
    pipe = adapter.pipe
    size = 128
    pipe(prompt=PROMPTS[:1], true_cfg_scale=1.0, num_inference_steps=4, height=size, width=size, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    table = sampling_table(adapter, 4, height=size, width=size)
    torch.testing.assert_close(table.sigma, pipe.scheduler.sigmas[:-1].float())
    torch.testing.assert_close(table.timesteps, pipe.scheduler.timesteps.float())
    # independently: mu on the line through (256, 0.5) and (8192, 0.9), exponential time shift of the
    # first non-trivial sigma (3/4), then shift_terminal=0.02 stretches the tail so the last sigma is 0.02
    mu = 0.5 + (0.9 - 0.5) * (1024 - 256) / (8192 - 256)
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in (1.0, 0.75, 0.5, 0.25)]
    one_minus = [1 - s for s in shifted]
    stretched = [1 - z * (1 - 0.02) / one_minus[-1] for z in one_minus]
    torch.testing.assert_close(table.sigma, torch.tensor(stretched), rtol=1e-5, atol=1e-5)
    small = sampling_table(adapter, 4, height=32, width=32)
    assert (table.sigma[1:-1] > small.sigma[1:-1]).all()  # more tokens: more time at high noise (both end at 0.02)


def _flux_pipeline_latents(adapter, noise):
    """FluxPipeline's packed latents: each 2x2 patch of [B, C, H, W] one token of 4C features (c, dy, dx)."""
    b, c, h, w = noise.shape
    return noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def _flux_from_pipeline(adapter, out, h, w):
    b, n, d = out.shape
    return out.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _flux2_from_pipeline(adapter, out, h, w):
    """Flux2Pipeline returns the token sequence [B, H*W, C]; Flux2KleinPipeline the raw VAE latents
    (BatchNorm undone, 2x2 patches unfolded), which we map back with the VAE's statistics."""
    if out.ndim == 3:
        return out.transpose(1, 2).reshape(out.shape[0], -1, h, w)
    bn = adapter.vae.bn
    b, c, hh, ww = out.shape
    patches = out.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, hh // 2, ww // 2)
    std = torch.sqrt(bn.running_var + adapter.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    return (patches - bn.running_mean.view(1, -1, 1, 1)) / std


@pytest.mark.parametrize("kind,to_pipe,from_pipe", [
    ("flux", _flux_pipeline_latents, _flux_from_pipeline),
    ("flux2", lambda a, n: n, _flux2_from_pipeline),
    ("flux2-klein", lambda a, n: n, _flux2_from_pipeline),
])
def test_ode_sampling_matches_diffusers_flux_pipelines(tiny, kind, to_pipe, from_pipe):
    """Same noise, prompts, steps and guidance: FLUX's packing, ids, dynamic-shift mu (from the image
    size) and guidance (embedded for dev, true CFG for klein) all as the pipeline computes them."""
    adapter = tiny(kind)
    noise = _noise(adapter, 2, seed=9)
    ref = adapter.pipe(prompt=PROMPTS, num_inference_steps=5, guidance_scale=3.5, latents=to_pipe(adapter, noise.clone()),
                       height=32, width=32, max_sequence_length=adapter.opts.max_sequence_length, output_type="latent").images
    ours = sample(_model(adapter, scale=3.5), sampling_table(adapter, 5, height=32, width=32), noise, torch.tensor([0, 1]))
    torch.testing.assert_close(ours, from_pipe(adapter, ref.float(), *noise.shape[-2:]), rtol=1e-4, atol=1e-4)
    # the guidance value matters (embedded or CFG) and the schedule follows the image size (mu)
    other = sample(_model(adapter, scale=1.5), sampling_table(adapter, 5, height=32, width=32), noise, torch.tensor([0, 1]))
    assert (other - ours).abs().max() > 1e-3
    assert not torch.allclose(sampling_table(adapter, 5, height=64, width=64).sigma, sampling_table(adapter, 5, height=32, width=32).sigma)
