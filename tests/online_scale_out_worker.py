"""The worker of tests/test_online_scale_out.py: run under ``torchrun --nproc_per_node 2`` (CPU, gloo)
or as a plain process (1 process); rank 0 writes what it computed for the test to compare.

``python online_scale_out_worker.py advantages OUT.json``
    A fixed set of leaf rewards (4 prompts x 4 samples, two rewards, group spreads that differ per
    prompt) is split over the processes as the online loop holds them (process ``r`` rolled out
    prompts ``r*P/W ..``, all samples of a prompt on one process, local prompt ids) and passed
    through :func:`diffalign.trainers.strategy.step_rewards` with a real ``accelerate.Accelerator``
    and the tiny GRPO config's ``advantage`` options, flat and as a tree (root / 2 branches / leaves).
    Each case writes the per-depth advantages of all processes (gathered in rank order) and two
    controls that skip one half of the gathering: ``local`` (statistics of this process's rewards
    only) and ``no_offset`` (gathered rewards, but group ids not made unique per process).

``python online_scale_out_worker.py update MODEL OUT_DIR ROLLOUT.pt [overrides...]``
    The GRPO update of one fixed rollout batch. One process rolls the step out itself
    (``OnlineRecipe.rollout``, 4 prompts x 4 samples) and saves it; W processes load it and each
    takes its share (rows of ``prompts_per_step = 4 / W`` prompts, re-indexed as its own rollout),
    then both run the loop's real ``advantages`` and the strategy's ``update``. The gradient the
    optimizer receives (after DDP's all-reduce and clipping) is recorded, and the LoRA weights after
    the step. With W > 1 the default layout, each process rolling out with its own generator, is
    also measured (gradient only, no step) as the control.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROMPTS, GROUP = 4, 4  # the step: 4 prompts x 4 samples, over all processes


def tiny_grpo_config(*overrides: str):
    import diffalign.trainers  # noqa: F401  registers the trainer configs
    from diffalign.config import load_config

    return load_config("tiny/grpo.yaml", list(overrides))


# ------------------------------------------------------------------------------------ advantages
CASES = {  # name -> config overrides
    "flat_group": ["advantage.std=group"],
    "flat_global": ["advantage.std=global"],
    "flat_none": ["advantage.std=none"],
    "flat_global_ddof1": ["advantage.std=global", "advantage.std_ddof=1", "advantage.eps=1e-8"],
    "flat_global_sum_of_advantages": ["advantage.std=global", "advantage.multi_reward=sum_of_advantages"],
    "tree_depth_group": ["advantage.std=group", "advantage.tree=depth"],
    "tree_depth_global": ["advantage.std=global", "advantage.tree=depth"],
    "tree_leaf_global": ["advantage.std=global", "advantage.tree=leaf"],
}
REWARDS = ["rewards=[{name: redness, weight: 1.0}, {name: blueness, weight: 0.5}]"]


def fixed_rewards() -> dict[str, torch.Tensor]:
    """[PROMPTS * GROUP] per reward, identical on every process; prompt p's spread grows with p, so
    the std of one process's rewards is not the std of all of them."""
    g = torch.Generator().manual_seed(1234)
    scale = torch.tensor([0.05, 0.2, 1.0, 3.0]).repeat_interleave(GROUP)
    offset = torch.tensor([0.0, 1.0, -2.0, 0.5]).repeat_interleave(GROUP)
    return {"redness": offset + scale * torch.randn(PROMPTS * GROUP, generator=g),
            "blueness": 2.0 * torch.rand(PROMPTS * GROUP, generator=g)}


def local_rollout(rank: int, world: int, tree: bool):
    """What process ``rank`` of ``world`` holds: its leaves' prompt ids (local), the ancestors per
    depth (local node ids) and its rows per depth."""
    from types import SimpleNamespace

    p = PROMPTS // world
    leaves = p * GROUP
    prompt_index = torch.arange(p).repeat_interleave(GROUP)
    if tree:  # depth 0: one root per prompt; depth 1: two branches of two leaves; depth 2: the leaves
        ancestors = [torch.arange(leaves) // GROUP, torch.arange(leaves) // 2, torch.arange(leaves)]
        rows = [p, leaves // 2, leaves]
    else:
        ancestors, rows = [torch.arange(leaves)], [leaves]
    return SimpleNamespace(prompt_index=prompt_index, ancestors=ancestors, rows_per_depth=rows)


def run_advantages(out: Path) -> None:
    from accelerate import Accelerator

    from diffalign.trainers.advantages import rollout_advantages
    from diffalign.trainers.strategy import StepRollout, step_rewards

    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert PROMPTS % world == 0
    everything = fixed_rewards()
    per = PROMPTS // world * GROUP
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in everything.items()}

    def gathered(xs: list[torch.Tensor]) -> list[list[float]]:
        return [(acc.gather(x.contiguous()) if world > 1 else x).tolist() for x in xs]

    result = {"world": world, "distributed_type": str(acc.distributed_type)}
    for name, overrides in CASES.items():
        cfg = tiny_grpo_config("model=unused", *REWARDS, *overrides)
        tree = name.startswith("tree")
        ro = local_rollout(rank, world, tree)
        rolled = StepRollout(model=None, rollout=ro, scores=mine, timings={})
        got = step_rewards(acc, cfg, rolled)  # the loop's code path
        a, weights = cfg.advantage, {r.name: r.weight for r in cfg.rewards}
        args = (a.multi_reward, a.tree, a.std, a.eps, a.clip, a.std_ddof)
        # control 1: statistics of this process's rewards alone (no gathering)
        local, _ = rollout_advantages(mine, weights, ro.prompt_index, ro.ancestors, *args)
        # control 2: gathered rewards, but every process's local group ids as they are (prompt 0 of
        # each process merged into one group)
        g_scores = {k: acc.gather(v) if world > 1 else v for k, v in mine.items()}
        g_raw = acc.gather(ro.prompt_index) if world > 1 else ro.prompt_index
        g_anc = [acc.gather(x) + acc.gather(torch.full_like(x, rank)) * r if world > 1 else x
                 for x, r in zip(ro.ancestors, ro.rows_per_depth)]
        no_offset, _ = rollout_advantages(g_scores, weights, g_raw, g_anc, *args)
        no_offset = [x[rank * r:(rank + 1) * r] for x, r in zip(no_offset, ro.rows_per_depth)]
        result[name] = {"per_depth": gathered(got.per_depth), "local": gathered(local),
                        "no_offset": gathered(no_offset), "combined": got.combined.tolist(),
                        "groups": got.groups.tolist()}
    if acc.is_main_process:
        out.write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()


# ------------------------------------------------------------------------------------ the update
def share(rollout, rank: int, world: int):
    """Process ``rank``'s share of a one-process rollout of a flat plan (leaves grouped by prompt):
    its leaves, transitions and prompts, re-indexed as if it had rolled them out itself."""
    from diffalign.pipelines.rollout import Rollout

    p = PROMPTS // world
    lo, hi = rank * p * GROUP, (rank + 1) * p * GROUP
    assert len(rollout.rows_per_depth) == 1, "a flat plan"
    tr = rollout.transitions
    m = (tr["node"] >= lo) & (tr["node"] < hi)
    trans = {k: v[m] for k, v in tr.items()}
    trans["node"] = trans["node"] - lo
    trans["prompt"] = trans["prompt"] - rank * p
    return Rollout(rollout.table, rollout.final[lo:hi], rollout.prompt_index[lo:hi] - rank * p,
                   [torch.arange(hi - lo)], [hi - lo], trans, rollout.model_calls, rollout.model_rows,
                   None if rollout.last_x0 is None else rollout.last_x0[lo:hi])


def run_update(model: str, out_dir: Path, rollout_file: Path, overrides: list[str]) -> None:
    from diffalign.pipelines import GuidedModel
    from diffalign.trainers.online import OnlineRecipe
    from diffalign.trainers.rollout_schedule import make_plan
    from diffalign.trainers.strategy import StepRollout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = tiny_grpo_config(f"model={model}", f"output_dir={out_dir}", "eval.every=-1", "max_steps=1",
                           f"prompts_per_step={PROMPTS // world}", f"group_size={GROUP}", "batch_size=8",
                           "train_batch_size=16", *overrides)
    recipe = OnlineRecipe(cfg).setup()
    acc, strategy = recipe.accelerator, recipe.strategy
    rank = acc.process_index
    assert acc.num_processes == world
    plan, _ = make_plan(cfg, 0, torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1))

    record: dict[str, torch.Tensor] = {}
    original_step = recipe.optimizer.step
    take_step = {"on": True}

    def step(*args, **kwargs):  # what the optimizer receives: all-reduced (DDP) and clipped
        record["grad"] = torch.cat([p.grad.detach().flatten().clone() for p in recipe.params])
        if take_step["on"]:
            return original_step(*args, **kwargs)
        return None

    recipe.optimizer.step = step

    def update(rolled: StepRollout) -> dict:
        adv = recipe.advantages(rolled, 1)
        recipe.policy.wrapped.train()
        stats = strategy.update(rolled.model, adv)
        local = torch.tensor([stats.sums["loss"] / stats.micro_batches, stats.mismatch, float(adv.selected.numel())])
        every = acc.gather(local.reshape(1, -1)) if world > 1 else local.reshape(1, -1)
        grad = record.pop("grad")
        grads = acc.gather(grad.reshape(1, -1)) if world > 1 else grad.reshape(1, -1)
        return {"loss": float(every[:, 0].mean()), "logprob_mismatch": float(every[:, 1].max()),
                "transitions": int(every[:, 2].sum()), "grad": grads[0].clone(),
                "ranks_identical": bool((grads == grads[0]).all()),
                "advantages": (acc.gather(adv.trained_advantages.contiguous()) if world > 1
                               else adv.trained_advantages).clone()}

    result: dict = {"world": world, "distributed_type": str(acc.distributed_type)}
    if world == 1:  # the reference: roll the step out here and keep it
        pick = recipe.prompt_indices(1)
        rolled = recipe.rollout(plan, pick)
        torch.save({"pick": pick, "rollout": rolled.rollout, "scores": rolled.scores}, rollout_file)
    else:
        # the control first (gradient only): the default layout, every process rolling out its own prompts
        take_step["on"] = False
        result["own_rollouts"] = update(recipe.rollout(plan, recipe.prompt_indices(1)))
        take_step["on"] = True
        saved = torch.load(rollout_file, weights_only=False)
        p = PROMPTS // world
        pick = saved["pick"][rank * p:(rank + 1) * p]
        prompts = [recipe.prompts[i] for i in pick]
        s = cfg.sampler
        model = GuidedModel(recipe.adapter, recipe.adapter.encode_prompt(prompts), recipe.uncond, s.guidance_scale)
        lo, hi = rank * p * GROUP, (rank + 1) * p * GROUP
        rolled = StepRollout(model, share(saved["rollout"], rank, world),
                             {k: v[lo:hi] for k, v in saved["scores"].items()}, {})
    result["fixed"] = update(rolled)
    result["params"] = torch.cat([q.detach().flatten().clone() for q in recipe.params])
    if acc.is_main_process:
        torch.save(result, out_dir / "update_result.pt")
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "advantages":
        run_advantages(Path(sys.argv[2]))
    elif mode == "update":
        run_update(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
