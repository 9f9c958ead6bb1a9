"""The online GRPO trainer: DDPO, Flow-GRPO, DanceGRPO, MixGRPO, BranchGRPO / TempFlow-GRPO.

One loop for every model family and every variant; the variants differ only in config
(step kind, schedule, advantage options). Per training step (``max_steps`` of them):

1. ``prompts_per_step`` prompts (per process), ``group_size`` samples each, rolled out in
   batches of ``batch_size`` images with :func:`diffalign.pipelines.rollout` along this step's
   plan (all steps stochastic, a sliding window, or a tree); CFG batched into one forward.
2. Each batch's final latents are decoded and scored on a worker thread while the next batch
   rolls out; rewards are gathered over processes.
3. Advantages per prompt group (per tree depth for trees), several rewards combined
   (:mod:`diffalign.trainers.advantages`).
4. ``inner_epochs`` passes over the recorded transitions (optionally a random
   ``timestep_fraction`` of them), ``updates_per_epoch`` optimizer updates each: recompute the
   log-prob of every transition with the trained model (same code path as the rollout), the
   clipped GRPO loss, the closed-form KL to the reference (LoRA disabled) on the step means.
5. Log ``metrics.jsonl``; at the end evaluate with ODE sampling at ``sampler.eval_num_steps``,
   save the LoRA, model card and ``reward_curve.png``.

``logprob_mismatch`` is the max |recomputed - recorded| log-prob over the transitions of the
first optimizer update of each step, which is on-policy: it must be ~0 (fp32).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import BaseTrainConfig, ConfigError, _check
from ..errors import UserError
from ..losses.grpo import REDUCTIONS, gaussian_kl_same_std, gaussian_log_prob, grpo_clip_loss, ratio_norm_log_ratio
from ..pipelines import (
    ODE_SOLVERS, STEP_KINDS, GuidedModel, RolloutPlan, cat_rollouts, full_plan, make_ode_solver, make_step_kind,
    rollout, sample, sampling_table, split_prediction, tree_plan, window_plan, window_start,
)
from ..logging import is_quiet
from .checkpoint import Checkpointer
from .advantages import MULTI_REWARD_MODES, STD_MODES, TREE_MODES, rollout_advantages, zero_std_group_fraction
from .common import (
    MetricsLogger, Timer, build_trainable, make_optimizer, mean_across_processes, rank_generator, save_final,
    setup_accelerator,
)

BUILTIN_PROMPTS = [
    "a photo of a cat", "a red apple on a table", "a mountain lake at sunrise", "a bowl of fruit",
    "a city street at night", "a portrait of an old man", "a small boat on the sea", "a field of sunflowers",
    "a dog running on the beach", "a cup of coffee", "a castle on a hill", "a forest in autumn",
    "a bicycle leaning on a wall", "a plate of pasta", "a snowy village", "a hot air balloon in the sky",
]


# ------------------------------------------------------------------------------------ config
@dataclass
class SamplerOptions:
    num_steps: int = 10  # denoising steps of training rollouts
    eval_num_steps: int = 40  # denoising steps of evaluation sampling (ODE); usually more than num_steps
    guidance_scale: float = 4.5
    cfg: bool = True  # false: train and sample without classifier-free guidance (no uncond forward)
    step: str = "auto"  # auto (flow_sde for flow models, ddim for UNets) | ddim | flow_sde | cps | dance
    noise_level: float | None = None  # eta (ddim, cps, dance) or a (flow_sde); None: the kind's paper default
    ode_solver: str = "euler"  # deterministic steps (outside the window, between branches, eval): euler | heun | dpm2m
    resolution: int = 512
    shared_noise: bool = False  # one initial noise per prompt group (DanceGRPO; TempFlow's seed groups)
    logprob_reduction: str = "mean"  # mean | sum over latent elements (rollout, loss and KL alike)


@dataclass
class WindowOptions:
    """MixGRPO / Flow-GRPO-Fast: ``size`` stochastic steps, the rest ODE."""

    size: int = 4
    start: int = 0  # first window position
    shift: int = 1  # steps the window moves ...
    interval: int = 25  # ... every this many training steps
    end: int | None = None  # last window start (default num_steps - size); then it wraps to start
    mode: str = "slide"  # slide | random (uniform in [start, end] each training step)


@dataclass
class TreeOptions:
    """BranchGRPO / TempFlow-GRPO: rows split ``branch_factor`` ways before each branch step."""

    branch_steps: list[int] = field(default_factory=lambda: [0, 2])
    branch_factor: int = 2
    sde_between: bool = True  # false: only the branch steps are stochastic (TempFlow-GRPO)


@dataclass
class ScheduleOptions:
    kind: str = "full"  # full | window | tree
    timestep_fraction: float = 1.0  # train on a random fraction of each row's stochastic steps (DanceGRPO 0.6)
    window: WindowOptions = field(default_factory=WindowOptions)
    tree: TreeOptions = field(default_factory=TreeOptions)


@dataclass
class AdvantageOptions:
    std: str = "group"  # group | global | none
    eps: float = 1e-4
    clip: float | None = 5.0  # clamp |A| (Flow-GRPO's adv_clip_max); null: no clamp
    multi_reward: str = "weighted_sum"  # weighted_sum | sum_of_advantages (DanceGRPO)
    tree: str = "depth"  # tree rollouts: depth (node values normalised per depth) | leaf


@dataclass
class GRPOLossOptions:
    clip_range: float = 1e-4  # PPO clip of the importance ratio
    kl_beta: float = 0.0  # weight of the closed-form KL to the reference (LoRA disabled)
    ratio_norm: bool = False  # GRPO-Guard's RatioNorm of the log-ratio
    step_weighting: str = "none"  # none | noise (TempFlow: ~ step std) | inverse_dt (GRPO-Guard: ~ 1/ds)
    max_nonfinite_steps: int = 5  # abort after this many consecutive NaN/inf updates


@dataclass
class RewardSpec:
    name: str = "pickscore"  # any diffalign.rewards name (NAME or NAME=PATH) or a simple reward (redness, ...)
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # kwargs of the reward factory


@dataclass
class EvalOptions:
    every: int = 0  # evaluate every this many steps (0: only after the last step; -1: never)
    num_prompts: int = 8  # the first prompts of the prompt list
    seed: int = 1234
    data: str | None = None  # prompt file (.txt/.jsonl) to evaluate on; null: the training prompts


@dataclass
class GRPOConfig(BaseTrainConfig):
    """Config of ``method: grpo``. ``data``: a ``.txt`` (one prompt a line) or ``.jsonl`` (``prompt``
    plus metadata for rewards) prompt file; null uses a built-in list. ``batch_size``: images per
    rollout batch per process (a multiple of ``group_size``). ``max_steps``: rollout+train steps."""

    method: str = "grpo"
    batch_size: int = 8
    group_size: int = 8
    prompts_per_step: int = 4  # per process
    inner_epochs: int = 1
    updates_per_epoch: int = 1  # optimizer updates per pass over the transitions
    train_batch_size: int | None = None  # transitions per training forward (null: batch_size)
    reward_threads: int = 1  # score rewards on this many threads, overlapping the next rollout (0: inline)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    advantage: AdvantageOptions = field(default_factory=AdvantageOptions)
    loss: GRPOLossOptions = field(default_factory=GRPOLossOptions)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    eval: EvalOptions = field(default_factory=EvalOptions)

    @property
    def needs_reference(self) -> bool:
        return self.loss.kl_beta > 0

    def validate(self) -> None:
        super().validate()
        s, sch, w, t = self.sampler, self.schedule, self.schedule.window, self.schedule.tree
        _check(self.method == "grpo", "method", "the GRPO trainer runs method: grpo")
        _check(self.group_size >= 2, "group_size", "must be >= 2 (advantages are relative within a group)")
        _check(self.batch_size % self.group_size == 0, "batch_size",
               f"must be divisible by group_size={self.group_size} (images per rollout batch, whole groups)")
        _check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        _check((self.prompts_per_step * self.group_size) % self.batch_size == 0, "prompts_per_step",
               f"prompts_per_step * group_size ({self.prompts_per_step * self.group_size}) must be a multiple of batch_size={self.batch_size}")
        _check(self.inner_epochs >= 1, "inner_epochs", "must be >= 1")
        _check(self.updates_per_epoch >= 1, "updates_per_epoch", "must be >= 1")
        _check(self.train_batch_size is None or self.train_batch_size >= 1, "train_batch_size", "must be >= 1")
        _check(self.gradient_accumulation_steps == 1, "gradient_accumulation_steps",
               "must be 1 for grpo: use updates_per_epoch and train_batch_size")
        _check(self.reward_threads >= 0, "reward_threads", "must be >= 0")
        _check(s.num_steps >= 1, "sampler.num_steps", "must be >= 1")
        _check(s.eval_num_steps >= 1, "sampler.eval_num_steps", "must be >= 1")
        _check(s.guidance_scale >= 0, "sampler.guidance_scale", "must be >= 0")
        _check(s.step == "auto" or s.step in STEP_KINDS, "sampler.step", f"must be auto or one of {', '.join(STEP_KINDS)}")
        _check(s.noise_level is None or s.noise_level >= 0, "sampler.noise_level", "must be >= 0")
        _check(s.noise_level is None or s.step not in ("cps",) or s.noise_level <= 1, "sampler.noise_level", "cps needs eta in [0, 1]")
        _check(s.ode_solver in ODE_SOLVERS, "sampler.ode_solver", f"must be one of {', '.join(ODE_SOLVERS)}")
        _check(s.resolution >= 8 and s.resolution % 8 == 0, "sampler.resolution", "must be a positive multiple of 8")
        _check(s.logprob_reduction in REDUCTIONS, "sampler.logprob_reduction", "must be mean or sum")
        _check(sch.kind in ("full", "window", "tree"), "schedule.kind", "must be full, window or tree")
        _check(0 < sch.timestep_fraction <= 1, "schedule.timestep_fraction", "must be in (0, 1]")
        if sch.kind == "window":
            _check(1 <= w.size <= s.num_steps, "schedule.window.size",
                   f"must be in [1, sampler.num_steps={s.num_steps}] (window larger than the number of steps)")
            _check(0 <= w.start <= s.num_steps - w.size, "schedule.window.start",
                   f"window [{w.start}, {w.start + w.size}) does not fit in sampler.num_steps={s.num_steps}")
            _check(w.end is None or w.start <= w.end <= s.num_steps - w.size, "schedule.window.end",
                   f"must be in [window.start, num_steps - size = {s.num_steps - w.size}]")
            _check(w.shift >= 0, "schedule.window.shift", "must be >= 0")
            _check(w.interval >= 1, "schedule.window.interval", "must be >= 1")
            _check(w.mode in ("slide", "random"), "schedule.window.mode", "must be slide or random")
        if sch.kind == "tree":
            _check(len(t.branch_steps) >= 1, "schedule.tree.branch_steps", "must list at least one step")
            _check(len(set(t.branch_steps)) == len(t.branch_steps), "schedule.tree.branch_steps", "must not repeat a step")
            _check(all(0 <= b < s.num_steps for b in t.branch_steps), "schedule.tree.branch_steps",
                   f"every branch step must be in [0, sampler.num_steps={s.num_steps})")
            _check(t.branch_factor >= 2, "schedule.tree.branch_factor", "must be >= 2")
            leaves = t.branch_factor ** len(t.branch_steps)
            _check(self.group_size % leaves == 0, "group_size",
                   f"must be a multiple of branch_factor ** len(branch_steps) = {leaves} (leaves per tree)")
        a = self.advantage
        _check(a.std in STD_MODES, "advantage.std", f"must be one of {', '.join(STD_MODES)}")
        _check(a.eps >= 0, "advantage.eps", "must be >= 0")
        _check(a.clip is None or a.clip > 0, "advantage.clip", "must be > 0 or null")
        _check(a.multi_reward in MULTI_REWARD_MODES, "advantage.multi_reward", f"must be one of {', '.join(MULTI_REWARD_MODES)}")
        _check(a.tree in TREE_MODES, "advantage.tree", f"must be one of {', '.join(TREE_MODES)}")
        lo = self.loss
        _check(lo.clip_range > 0, "loss.clip_range", "must be > 0")
        _check(lo.kl_beta >= 0, "loss.kl_beta", "must be >= 0")
        _check(lo.step_weighting in ("none", "noise", "inverse_dt"), "loss.step_weighting", "must be none, noise or inverse_dt")
        _check(len(self.rewards) >= 1, "rewards", "must list at least one reward ({name, weight})")
        for i, r in enumerate(self.rewards):
            _check(bool(r.name), f"rewards[{i}].name", "must be a reward name")
            _check(math.isfinite(r.weight), f"rewards[{i}].weight", "must be a finite number")
        _check(len({r.name for r in self.rewards}) == len(self.rewards), "rewards", "names must be unique")
        _check(self.eval.every >= -1, "eval.every", "must be >= -1")
        _check(self.eval.num_prompts >= 0, "eval.num_prompts", "must be >= 0")


# ------------------------------------------------------------------------------------ prompts
def load_prompts(data: str | None) -> tuple[list[str], list[dict] | None]:
    """``None`` -> built-in prompts; ``.txt`` -> one prompt a line; ``.jsonl`` -> ``prompt`` + metadata."""
    if data is None:
        return list(BUILTIN_PROMPTS), None
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"config key 'data': prompt file '{data}' does not exist (a .txt or .jsonl file, or null for built-in prompts)")
    if path.suffix == ".jsonl":
        prompts, meta = [], []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"data={data}: line {i + 1} is not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"data={data}: line {i + 1} has no string 'prompt' field")
            prompts.append(row["prompt"])
            meta.append(row)
    else:
        prompts = [p.strip() for p in path.read_text().splitlines() if p.strip()]
        meta = None
    if not prompts:
        raise UserError(f"data={data}: no prompts in the file")
    return prompts, meta


# ------------------------------------------------------------------------------------ rewards
def resolve_reward(name: str, args: dict | None = None):
    """A reward callable by name: ``diffalign.rewards.get_reward``, else the simple rewards."""
    from ..rewards import simple

    args = dict(args or {})
    try:
        from ..rewards import get_reward
    except ImportError:
        get_reward = None
    if get_reward is not None:
        try:
            return get_reward(name, **args)
        except UserError:
            if name not in simple.SIMPLE_REWARDS:
                raise
    if name in simple.SIMPLE_REWARDS:
        fn = simple.SIMPLE_REWARDS[name]
        return fn
    raise UserError(f"unknown reward '{name}'; simple rewards: {', '.join(simple.SIMPLE_REWARDS)}")


def reward_scores(out, n: int, name: str) -> torch.Tensor:
    """A reward's return value (an object with ``.scores``, a tensor, or a list) -> float32 CPU [n]."""
    scores = getattr(out, "scores", out)
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if scores.shape[0] != n:
        raise UserError(f"reward '{name}' returned {scores.shape[0]} scores for {n} images")
    return scores


def score_images(adapter, latents: torch.Tensor, prompts: list[str], metadata, rewards) -> dict[str, torch.Tensor]:
    """Decode latents and score them with every reward (runs on the reward thread)."""
    t0 = time.perf_counter()
    images = adapter.decode_latents(latents)
    out = {name: reward_scores(fn(images, prompts, metadata), len(prompts), name) for name, _, fn in rewards}
    out["_seconds"] = torch.tensor(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------ schedule
def make_plan(cfg: GRPOConfig, iteration: int, generator: torch.Generator) -> tuple[RolloutPlan, dict]:
    s, sch = cfg.sampler, cfg.schedule
    if sch.kind == "full":
        return full_plan(s.num_steps), {}
    if sch.kind == "window":
        w = sch.window
        start = window_start(iteration, s.num_steps, w.size, w.start, w.shift, w.interval, w.end, w.mode, generator)
        return window_plan(s.num_steps, start, w.size), {"window_start": start}
    t = sch.tree
    return tree_plan(s.num_steps, t.branch_steps, t.branch_factor, t.sde_between), {}


def select_fraction(trans: dict, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a random ``fraction`` of each row's transitions (DanceGRPO's timestep fraction).

    A row is a tree node segment ``(depth, node)``; at least one transition per row is kept.
    """
    n = trans["log_prob"].shape[0]
    if fraction >= 1.0:
        return torch.arange(n)
    row = (trans["depth"].cpu() * (int(trans["node"].max()) + 1) + trans["node"].cpu())
    key = torch.rand(n, generator=generator)
    order = torch.argsort(key)
    order = order[torch.argsort(row[order], stable=True)]
    sorted_rows = row[order]
    _, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - torch.repeat_interleave(starts, counts)
    keep_n = torch.repeat_interleave(torch.clamp((counts.float() * fraction).round().long(), min=1), counts)
    return torch.sort(order[rank < keep_n]).values


def initial_noise(prompts: int, per_prompt: int, shape, shared: bool, generator: torch.Generator) -> torch.Tensor:
    """Initial latents [prompts * per_prompt, *shape] (CPU), grouped by prompt; ``shared``: one
    draw per prompt repeated over its group (DanceGRPO, TempFlow-GRPO's seed groups)."""
    if shared:
        return torch.randn((prompts, *shape), generator=generator).repeat_interleave(per_prompt, dim=0)
    return torch.randn((prompts * per_prompt, *shape), generator=generator)


def step_weights(table, steps: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Per-transition loss weights, normalised to mean 1 over the given transitions."""
    if mode == "none":
        return None
    co = table.coeffs(steps)
    if mode == "noise":  # TempFlow-GRPO: ~ the injected noise std (in flow space)
        w = std.float().cpu() / co.scale_next.cpu()
    else:  # GRPO-Guard: ~ 1 / ds (flow-space step size)
        w = 1.0 / (co.s - co.s_next).clamp_min(1e-8).cpu()
    return (w / w.mean()).to(std.device)


# ------------------------------------------------------------------------------------ train
def _gather_leaf_data(accelerator, scores: dict[str, torch.Tensor], groups: torch.Tensor, ancestors, rows_per_depth):
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


def evaluate(cfg, adapter, net, rewards, prompts, metadata, uncond, eval_table, solver) -> dict[str, float]:
    """ODE samples of the first ``eval.num_prompts`` prompts with fixed noise; mean rewards."""
    n = min(cfg.eval.num_prompts, len(prompts))
    eval_prompts = prompts[:n]
    meta = metadata[:n] if metadata else None
    cond = adapter.encode_prompt(eval_prompts)
    model = GuidedModel(adapter, cond, uncond, cfg.sampler.guidance_scale, max_rows=cfg.batch_size)
    g = torch.Generator().manual_seed(cfg.eval.seed)
    shape = adapter.latent_shape(cfg.sampler.resolution, cfg.sampler.resolution)
    noise = torch.randn((n, *shape), generator=g).to(adapter.device)
    final = sample(model, eval_table, noise, torch.arange(n, device=adapter.device), solver=solver, net=net)
    scores = score_images(adapter, final, eval_prompts, meta, rewards)
    combined = sum(w * scores[name] for name, w, _ in rewards)
    out = {"eval_reward_mean": float(combined.mean())}
    if len(rewards) > 1:
        out.update({f"eval_reward/{name}": float(scores[name].mean()) for name, _, _ in rewards})
    return out


def save_reward_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = lambda v: isinstance(v, (int, float))  # noqa: E731 - NaN/inf are logged as strings
    history = [h for h in history if num(h.get("reward_mean")) and num(h.get("reward_std"))]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    ax.plot(steps, mean, label="train reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ev = [(h["step"], h["eval_reward_mean"]) for h in history if num(h.get("eval_reward_mean"))]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval reward (ODE)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("GRPO reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_grpo(cfg: GRPOConfig) -> dict:
    accelerator = setup_accelerator(cfg)
    adapter, params, reference = build_trainable(cfg, accelerator)
    optimizer, lr_scheduler = make_optimizer(cfg, params, accelerator)
    net, optimizer, lr_scheduler = accelerator.prepare(adapter.denoiser, optimizer, lr_scheduler)
    policy = accelerator.unwrap_model(net)  # rollouts: no DDP wrapper, no grad
    device = accelerator.device
    s = cfg.sampler

    prompts, metadata = load_prompts(cfg.data)
    eval_prompts, eval_metadata = load_prompts(cfg.eval.data) if cfg.eval.data else (prompts, metadata)
    rewards = [(r.name, r.weight, resolve_reward(r.name, r.args)) for r in cfg.rewards]
    weights = {name: w for name, w, _ in rewards}
    kind = make_step_kind(s.step, s.noise_level, adapter.is_flow)
    solver = make_ode_solver(s.ode_solver)
    table = sampling_table(adapter, s.num_steps)
    step_std = kind.std(table.coeffs(torch.arange(s.num_steps)))
    if cfg.schedule.kind == "tree":
        for b in cfg.schedule.tree.branch_steps:
            _check(float(step_std[b]) > 0, "schedule.tree.branch_steps",
                   f"step {b} has no noise with sampler.step={kind.name} (e.g. the last step of cps/ddim): its branches would be identical")
    if not any(float(x) > 0 for x in step_std):
        raise ConfigError(f"config key 'sampler.noise_level': {kind.name} with noise level {kind.noise_level} has no stochastic step")
    shape = adapter.latent_shape(s.resolution, s.resolution)
    use_cfg = s.cfg and s.guidance_scale > 1.0
    uncond = adapter.encode_prompt([""]) if use_cfg else None
    reduction = s.logprob_reduction
    gen = rank_generator(cfg.seed, accelerator)  # prompts, noise, subsets: differ per rank
    ckpt = Checkpointer(cfg, accelerator, net, optimizer, lr_scheduler, gen)
    start_step, resumed = ckpt.resume()
    logger = MetricsLogger(accelerator, cfg.output_dir, resume=start_step > 1)
    executor = ThreadPoolExecutor(max_workers=cfg.reward_threads) if cfg.reward_threads > 0 else None
    eval_table = None
    history: list[dict] = []
    train_rows = cfg.train_batch_size or cfg.batch_size
    nonfinite_in_a_row = resumed.get("nonfinite_in_a_row", 0)

    progress = tqdm(range(start_step, cfg.max_steps + 1), desc="grpo", disable=not accelerator.is_main_process or is_quiet())
    for step in progress:
        timer = Timer()
        # window positions: a function of (seed, step) alone, identical on all ranks and after a resume
        plan, plan_info = make_plan(cfg, step - 1, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        # ---- 1-2. rollouts, reward scoring overlapped with the next rollout batch
        pick = torch.randint(0, len(prompts), (cfg.prompts_per_step,), generator=gen).tolist()
        step_prompts = [prompts[i] for i in pick]
        step_meta = [metadata[i] for i in pick] if metadata else None
        cond = adapter.encode_prompt(step_prompts)
        model = GuidedModel(adapter, cond, uncond, s.guidance_scale)
        roots_per_prompt = cfg.group_size // plan.leaves_per_root
        per_batch = cfg.batch_size // cfg.group_size
        parts, pending = [], []
        for p0 in range(0, cfg.prompts_per_step, per_batch):
            pidx = torch.arange(p0, p0 + per_batch)
            noise = initial_noise(per_batch, roots_per_prompt, shape, s.shared_noise, gen)
            part = rollout(model, table, plan, kind, noise.to(device), pidx.repeat_interleave(roots_per_prompt).to(device),
                           generator=gen, solver=solver, reduction=reduction, net=policy)
            leaf_prompts = [step_prompts[i] for i in part.prompt_index.tolist()]
            leaf_meta = [step_meta[i] for i in part.prompt_index.tolist()] if step_meta else None
            if executor is not None:
                pending.append(executor.submit(score_images, adapter, part.final, leaf_prompts, leaf_meta, rewards))
            else:
                pending.append(score_images(adapter, part.final, leaf_prompts, leaf_meta, rewards))
            parts.append(part)
        wait_t = Timer()
        scored = [p.result() if executor is not None else p for p in pending]
        reward_wait = wait_t.lap()
        ro = cat_rollouts(parts)
        scores = {name: torch.cat([sc[name] for sc in scored]) for name, _, _ in rewards}
        reward_seconds = float(sum(sc["_seconds"] for sc in scored))
        rollout_seconds = timer.lap()

        # ---- 3. advantages (gathered over processes, sliced back)
        g_scores, g_groups, g_anc = _gather_leaf_data(accelerator, scores, ro.prompt_index.cpu(), [a.cpu() for a in ro.ancestors], ro.rows_per_depth)
        a = cfg.advantage
        per_depth, combined = rollout_advantages(g_scores, weights, g_groups, g_anc, a.multi_reward, a.tree, a.std, a.eps, a.clip)
        rank = accelerator.process_index
        per_depth = [x[rank * r:(rank + 1) * r] for x, r in zip(per_depth, ro.rows_per_depth)]
        tr = ro.transitions
        adv = torch.zeros(ro.num_transitions)
        for d, ad in enumerate(per_depth):
            mask = (tr["depth"] == d).cpu()
            adv[mask] = ad[tr["node"].cpu()[mask]]
        adv = adv.to(device)
        sel = select_fraction(tr, cfg.schedule.timestep_fraction, gen).to(device)
        w_all = step_weights(table, tr["step"], tr["std"], cfg.loss.step_weighting)

        # ---- 4. policy updates
        net.train()
        sums: dict[str, float] = {}
        n_micro = 0
        mismatch = 0.0
        skipped = 0
        first_update = True
        for _epoch in range(cfg.inner_epochs):
            perm = sel[torch.randperm(sel.shape[0], generator=gen).to(device)]
            for uidx in torch.tensor_split(perm, cfg.updates_per_epoch):
                if uidx.numel() == 0:
                    continue
                micro = torch.split(uidx, train_rows)
                finite = True
                for j, midx in enumerate(micro):
                    sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(net)
                    with sync:
                        loss, m, log_prob = transition_loss(cfg, adapter, model, net, policy, reference, table, kind, tr, midx,
                                                            adv, None if w_all is None else w_all[midx])
                        if not torch.isfinite(loss):
                            finite = False
                        accelerator.backward(loss * (midx.numel() / uidx.numel()))
                    if first_update:
                        mismatch = max(mismatch, float((log_prob.detach() - tr["log_prob"][midx]).abs().max()))
                    for k, v in {"loss": loss.detach(), **m}.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n_micro += 1
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                    finite = False
                finite = accelerator.reduce(torch.tensor([float(finite)], device=device), reduction="mean").item() == 1.0
                if finite:
                    optimizer.step()
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if grad_norm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) * len(micro)
                first_update = False
        lr_scheduler.step()
        train_seconds = timer.lap()
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        if nonfinite_in_a_row >= cfg.loss.max_nonfinite_steps:
            raise FloatingPointError(
                f"{nonfinite_in_a_row} steps in a row had a NaN/inf loss or gradient; try a lower optim.learning_rate, "
                "mixed_precision=no/bf16, or a smaller sampler.noise_level"
            )

        # ---- 5. metrics
        local = {k: v / max(n_micro, 1) for k, v in sums.items()}
        local.update({
            "advantage_abs_mean": float(adv[sel].abs().mean()) if sel.numel() else 0.0,
            "rollout_seconds": rollout_seconds, "train_seconds": train_seconds,
            "reward_seconds": reward_seconds, "reward_wait_seconds": reward_wait,
        })
        values = mean_across_processes(accelerator, local)
        if accelerator.num_processes > 1:
            mismatch = float(accelerator.gather(torch.tensor([mismatch], device=device)).max())
        values.update({
            "reward_mean": float(combined.mean()),
            "reward_std": float(combined.std(unbiased=False)),
            **({f"reward/{k}": float(v.mean()) for k, v in g_scores.items()} if len(g_scores) > 1 else {}),
            "zero_std_group_fraction": zero_std_group_fraction(combined, g_groups),
            "logprob_mismatch": mismatch,
            "lr": lr_scheduler.get_last_lr()[0],
            "stochastic_steps": len([i for i in plan.stochastic_steps if float(step_std[i]) > 0]),
            "transitions": int(sel.numel()),
            "model_rows": ro.model_rows,
            "nonfinite_skipped": skipped,
            "images_seen": step * cfg.prompts_per_step * cfg.group_size * accelerator.num_processes,
            **plan_info,
        })
        ev = cfg.eval
        if ev.every >= 0 and ev.num_prompts > 0 and (step == cfg.max_steps or (ev.every > 0 and step % ev.every == 0)):
            if eval_table is None:
                eval_table = sampling_table(adapter, s.eval_num_steps)
            values.update(evaluate(cfg, adapter, policy, rewards, eval_prompts, eval_metadata, uncond, eval_table, solver))
        values["step_seconds"] = rollout_seconds + train_seconds + timer.lap()
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logger.log(step, values)
        history.append({"step": step, **values})
        progress.set_postfix(reward=f"{values['reward_mean']:.4g}", kl=f"{values.get('approx_kl', 0.0):.2g}")
        ckpt.maybe_save(step, {"nonfinite_in_a_row": nonfinite_in_a_row}, 0)

    if executor is not None:
        executor.shutdown(wait=True)
    if accelerator.is_main_process:
        metrics_path = Path(cfg.output_dir) / "metrics.jsonl"  # the whole run, resumed parts included
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.is_file() else []
        if rows:
            save_reward_curve(rows, Path(cfg.output_dir) / "reward_curve.png")
    info = save_final(cfg, accelerator, adapter, net, logger.last, "grpo")
    accelerator.end_training()
    return {"final": logger.last, "history": history, **info}


def transition_loss(cfg, adapter, model: GuidedModel, net, policy, reference, table, kind, tr: dict, idx: torch.Tensor,
                    adv: torch.Tensor, weights: torch.Tensor | None):
    """GRPO loss of the transitions ``idx``: recompute their log-probs with the trained model."""
    reduction = cfg.sampler.logprob_reduction
    x, x_next, old = tr["x"][idx], tr["x_next"][idx], tr["log_prob"][idx]
    co = table.coeffs(tr["step"][idx])
    ts, pr = tr["timestep"][idx], tr["prompt"][idx]
    out = model(x, ts, pr, net)
    x0, eps = split_prediction(out, x, co.alpha, co.sigma, table.parametrization)
    mean, std = kind.mean(x, x0, eps, co), kind.std(co)
    log_prob = gaussian_log_prob(x_next, mean, std, reduction)
    kl = None
    if cfg.loss.kl_beta > 0:
        with torch.no_grad():
            if reference is None:
                with adapter.adapters_disabled(policy):
                    ref_out = model(x, ts, pr, policy)
            else:
                ref_out = model(x, ts, pr, reference)
            rx0, reps = split_prediction(ref_out, x, co.alpha, co.sigma, table.parametrization)
            ref_mean = kind.mean(x, rx0, reps, co)
        kl = gaussian_kl_same_std(mean, ref_mean, std, reduction)
    log_ratio = ratio_norm_log_ratio(log_prob, old, mean, tr["mean"][idx], std, reduction) if cfg.loss.ratio_norm else None
    loss, metrics = grpo_clip_loss(log_prob, old, adv[idx], cfg.loss.clip_range, log_ratio=log_ratio,
                                   weights=weights, kl=kl, kl_beta=cfg.loss.kl_beta)
    return loss, metrics, log_prob
