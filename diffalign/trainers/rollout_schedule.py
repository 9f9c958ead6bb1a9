"""Rollout scheduling for the online loop: which plan a training step rolls out (all steps, a
sliding window, a tree) on which table, the prompt order of ``prompt_sampling: epoch``, the initial
noise, and how the evaluation prompts are shared out over processes. Functions of the config, the
step and a generator alone, so every rank and a resumed run agree on them.
"""

from __future__ import annotations

import functools

import torch

from ..pipelines import (
    RolloutPlan, SamplingTable, full_plan, post_window_compressed, tree_plan, window_plan, window_start, window_stop,
)
from .grpo_config import GRPOConfig


def make_plan(cfg: GRPOConfig, iteration: int, generator: torch.Generator) -> tuple[RolloutPlan, dict]:
    """The rollout plan of training step ``iteration`` (0-based) and its metrics (window start)."""
    s, sch = cfg.sampler, cfg.schedule
    if sch.kind == "full":
        return full_plan(s.num_steps), {}
    if sch.kind == "window":
        w = sch.window
        start = window_start(iteration, s.num_steps, w.size, w.start, w.shift, w.interval, w.end, w.mode, generator,
                             w.sweep_end)
        stop = window_stop(start, s.num_steps, w.size, w.end, w.mode, w.sweep_end)
        return window_plan(s.num_steps, start, stop - start), {"window_start": start}
    t = sch.tree
    return tree_plan(s.num_steps, t.branch_steps, t.branch_factor, t.sde_between, t.split_noise_scale), {}


def rollout_table(cfg: GRPOConfig, table: SamplingTable, plan: RolloutPlan,
                  num_train_timesteps: int = 1000) -> tuple[SamplingTable, RolloutPlan]:
    """The table and plan a training rollout runs: ``(table, plan)`` unchanged, or with MixGRPO-Flash
    (``schedule.window.post_window_ratio``) the post-window steps compressed by
    :func:`~diffalign.pipelines.post_window_compressed`: on a ``time_shift`` table at the release's
    time-shifted points, ``post_window_to_zero`` choosing whether a rollout always ends at sigma 0."""
    w = cfg.schedule.window
    if cfg.schedule.kind != "window" or w.post_window_ratio is None:
        return table, plan
    shift = cfg.sampler.shift if cfg.sampler.sigma_schedule == "time_shift" else None
    return post_window_compressed(table, plan, w.post_window_ratio, shift, num_train_timesteps, w.post_window_to_zero)


def initial_noise(prompts: int, per_prompt: int, shape, shared: bool, generator: torch.Generator) -> torch.Tensor:
    """Initial latents [prompts * per_prompt, *shape] (CPU), grouped by prompt; ``shared``: one
    draw per prompt repeated over its group (DanceGRPO, TempFlow-GRPO's seed groups)."""
    if shared:
        return torch.randn((prompts, *shape), generator=generator).repeat_interleave(per_prompt, dim=0)
    return torch.randn((prompts * per_prompt, *shape), generator=generator)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """``prompt_sampling: epoch``: the prompt order of pass ``epoch`` over ``n`` prompts (a function
    of ``seed`` and ``epoch`` alone, so every rank and a resumed run see the same order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * (epoch + 1)))


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """The eval prompt indices process ``rank`` of ``world`` samples: a contiguous block of
    ``ceil(n / world)``, the last blocks padded with prompt ``n - 1`` so every process holds the same
    count (the gather needs it); gathered rank by rank and cut to ``n`` they are ``0 .. n-1``."""
    if n <= 0:
        return []
    per = -(-n // world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
