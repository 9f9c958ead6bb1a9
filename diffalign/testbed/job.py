"""``diffalign testbed-compare``: the end-to-end alignment comparison on the testbed world.

1. the two shipped (or cached, or freshly trained) base models
   (:mod:`diffalign.testbed.base_model`): a UNet (``sd15`` family, epsilon prediction) for
   the offline pair methods and DDPO, and an SD3-layout MMDiT trained with rectified flow
   for the flow-matching online methods (Flow-GRPO, MixGRPO, DanceGRPO, DiffusionNFT, AWM);
2. four prompt sets (:func:`diffalign.testbed.prompts.job_prompt_splits`): ``train`` (pairs
   and rollouts), ``indist`` (the primary evaluation: same distribution, scenes never used for
   pairs or rollouts), ``compositional`` (held-out colour x shape pairs) and ``curve`` (the fixed
   evaluation subset the online methods are scored on while they train: curves, the efficiency
   race, checkpoint choice; disjoint from the other three);
3. pairs sampled from the UNet base on train prompts and labelled with the hidden human taste
   (:func:`diffalign.testbed.make_pairs`): ``pairs/`` and ``pairs_mismatch/`` (chosen images
   restyled to the full warm target style, MaPO's reference-mismatch setting);
4. the methods of the budget (:data:`METHODS`), every main row judged on the hidden taste
   ``testbed_style``: pair methods learn it from the labelled pairs, online methods get it as
   their reward, and ``grpo_rm`` (RLHF) gets a reward model trained on the same pairs
   (:func:`train_reward_model`); the faithfulness-only rows (``*_faith``: the verifiable
   ``testbed`` reward) run in ``long``;
5. ``eval`` of each base and each run on both splits with shared seeds, and a report
   (:mod:`diffalign.testbed.report`).

Tasks run on the process runner of :mod:`diffalign.testbed.runner` (one torch thread per
worker, critical path first). Budgets are in ``diffalign/testbed/configs/job.yaml``; ``--seed``
changes the pairs, every training seed and the eval noise, never the prompt sets.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError
from .runner import Scheduler, Task, cpu_plan

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REWARDS = ("testbed", "testbed_style")
SPLITS = ("indist", "compositional")
REWARD_MODEL = "reward_model"  # JobMethod.reward of the RLHF row: a reward model trained on the job's pairs


@dataclass(frozen=True)
class JobMethod:
    """A method of the job: its training config, which base it starts from, what it learns from,
    the reward it is judged on (``target``) and, for online methods, the reward it trains on."""

    config: str  # a file in CONFIG_DIR
    base: str  # "unet" | "flow"
    data: str  # "pairs" | "pairs_mismatch" | "prompts"
    target: str  # "testbed_style" (the hidden taste) | "testbed" (faithfulness only)
    reward: str | None = None  # online: "testbed_style" | "testbed" | REWARD_MODEL

    @property
    def online(self) -> bool:
        return self.data == "prompts"

    @property
    def reads_pairs(self) -> bool:
        return not self.online or self.reward == REWARD_MODEL


_TASTE, _FAITH = "testbed_style", "testbed"
METHODS: dict[str, JobMethod] = {
    "dpo": JobMethod("dpo.yaml", "unet", "pairs", _TASTE),
    "mapo": JobMethod("mapo.yaml", "unet", "pairs", _TASTE),
    "sft": JobMethod("sft.yaml", "unet", "pairs", _TASTE),
    "dpo_mismatch": JobMethod("dpo.yaml", "unet", "pairs_mismatch", _TASTE),
    "mapo_mismatch": JobMethod("mapo.yaml", "unet", "pairs_mismatch", _TASTE),
    # online methods on the hidden taste as their reward (the testbed's PickScore)
    "grpo": JobMethod("grpo.yaml", "flow", "prompts", _TASTE, _TASTE),  # Flow-GRPO (Flow-SDE, every step)
    "mixgrpo": JobMethod("mixgrpo.yaml", "flow", "prompts", _TASTE, _TASTE),  # SDE window, ODE elsewhere
    "dancegrpo": JobMethod("dancegrpo.yaml", "flow", "prompts", _TASTE, _TASTE),
    "branchgrpo": JobMethod("branchgrpo.yaml", "flow", "prompts", _TASTE, _TASTE),  # tree rollouts
    "ddpo": JobMethod("grpo.yaml", "unet", "prompts", _TASTE, _TASTE),  # DDIM-eta GRPO on the UNet base
    "nft": JobMethod("nft.yaml", "flow", "prompts", _TASTE, _TASTE),  # DiffusionNFT: ODE rollouts, forward-process loss
    "awm": JobMethod("awm.yaml", "flow", "prompts", _TASTE, _TASTE),  # Advantage Weighted Matching
    # RLHF from the same labels DPO gets: Flow-GRPO on a reward model trained on the job's pairs
    "grpo_rm": JobMethod("grpo.yaml", "flow", "prompts", _TASTE, REWARD_MODEL),
    # faithfulness only (GenEval-style verifiable reward): bounded at CPU scale (docs/testbed_results.md), in `long`
    "grpo_faith": JobMethod("grpo.yaml", "flow", "prompts", _FAITH, _FAITH),
    "mixgrpo_faith": JobMethod("mixgrpo.yaml", "flow", "prompts", _FAITH, _FAITH),
    "nft_faith": JobMethod("nft.yaml", "flow", "prompts", _FAITH, _FAITH),
}


class CachingSampler:
    """Memoise ``sampler(prompts, seeds)`` per (prompt, seed): the normal and the mismatch
    pair sets are drawn from the same images, so sample them once."""

    def __init__(self, sampler):
        self.sampler, self.cache, self.name = sampler, {}, getattr(sampler, "name", "base")

    def __call__(self, prompts, seeds):
        import torch

        todo = [(p, int(s)) for p, s in zip(prompts, seeds) if (p, int(s)) not in self.cache]
        todo = list(dict.fromkeys(todo))
        if todo:
            imgs = self.sampler([p for p, _ in todo], [s for _, s in todo])
            for k, im in zip(todo, imgs):
                self.cache[k] = im
        return torch.stack([self.cache[(p, int(s))] for p, s in zip(prompts, seeds)])


# ------------------------------------------------------------------------------------ budgets
def read_budgets(config_dir: Path = CONFIG_DIR) -> dict[str, dict]:
    """Every budget of ``job.yaml``, each merged over the file's ``defaults`` block."""
    import yaml

    path = config_dir / "job.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing (the testbed-compare budgets)")
    raw = yaml.safe_load(path.read_text()) or {}
    defaults = raw.pop("defaults", {}) or {}
    return {name: {**defaults, **(b or {})} for name, b in raw.items()}


def budget_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The ``--budget`` choices: the budgets of ``job.yaml`` (yaml only: no torch import)."""
    return list(read_budgets(config_dir))


def load_budget(budget: str, config_dir: Path = CONFIG_DIR) -> dict:
    budgets = read_budgets(config_dir)
    if budget not in budgets:
        raise UserError(f"--budget {budget!r}: not in {config_dir / 'job.yaml'} (has: {', '.join(budgets)})")
    return budgets[budget]


def budget_methods(b: dict, budget: str) -> tuple[dict[str, JobMethod], dict[str, list[str]]]:
    """The methods a budget can run: :data:`METHODS` plus its ``variants`` (a method under another
    name with extra overrides and, optionally, another ``target`` reward), and the variants' extra
    overrides."""
    table = dict(METHODS)
    extra_ov: dict[str, list[str]] = {}
    for name, v in (b.get("variants") or {}).items():
        if v.get("of") not in METHODS:
            raise UserError(f"budget {budget!r}: variant {name!r} needs 'of: <method>' (one of {', '.join(METHODS)})")
        target = v.get("target", METHODS[v["of"]].target)
        if target not in REWARDS:
            raise UserError(f"budget {budget!r}: variant {name!r} has target {target!r} (one of {', '.join(REWARDS)})")
        table[name] = replace(METHODS[v["of"]], target=target)
        extra_ov[name] = [str(o) for o in v.get("overrides", [])]
    return table, extra_ov


# ------------------------------------------------------------------------------------ worker tasks
# Top-level functions: they run in the runner's spawned worker processes.
def _make_pairs(base: str, prompts: list[str], n_pairs: int, seed: int, out_dir: str, b: dict) -> int:
    from ..eval.generate import load_pipeline
    from . import make_pairs
    from .base_model import PipelineSampler

    sampler = CachingSampler(PipelineSampler(load_pipeline(base), steps=int(b["pair_steps"]), guidance=float(b["pair_guidance"]),
                                             name="testbed-base"))
    made_by = {"base": base, "prompts": prompts, "n": n_pairs, "seed": seed,
               **{k: b.get(k) for k in ("pair_steps", "pair_guidance", "tie_margin", "images_per_prompt")}}
    for variant, mismatch in (("pairs", False), ("pairs_mismatch", True)):
        path = Path(out_dir) / variant / f"train-{seed}.parquet"
        if path.is_file() and json.loads(path.with_suffix(".json").read_text()) == made_by:
            continue  # the same pairs were made by an earlier run of this job
        make_pairs(sampler, prompts, n_pairs, seed=seed, style_mismatch=mismatch, tie_margin=float(b.get("tie_margin", 0.05)),
                   images_per_prompt=int(b.get("images_per_prompt", 2)), out_path=path)
        path.with_suffix(".json").write_text(json.dumps(made_by))
    return n_pairs


def is_reward_model_val(prompt: str, fraction: float) -> bool:
    """Whether a pair of ``prompt`` is held out from reward-model training (a stable hash of the
    prompt: all pairs of one prompt fall on the same side, so validation prompts are unseen)."""
    return (zlib.crc32(prompt.encode("utf-8")) % 10_000) / 10_000 < fraction


def split_reward_model_pairs(pairs_dir: Path, out_dir: Path, val_fraction: float) -> dict[str, int]:
    """Split the job's pairs by prompt into ``out_dir/train.parquet`` and ``out_dir/val.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(pairs_dir).glob("*.parquet"))
    if not files:
        raise UserError(f"{pairs_dir}: no pairs (*.parquet) for the reward model")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    val = [is_reward_model_val(p, val_fraction) for p in table.column("caption").to_pylist()]
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"train": table.filter(pa.array([not v for v in val])), "val": table.filter(pa.array(val))}
    for name, part in parts.items():
        if part.num_rows == 0:
            raise UserError(f"{pairs_dir}: the prompt split left no {name} pairs for the reward model "
                            f"(val_fraction {val_fraction}, {table.num_rows} pairs)")
        pq.write_table(part, out_dir / f"{name}.parquet")
    return {name: part.num_rows for name, part in parts.items()}


def train_reward_model(pairs_dir: str, out_dir: str, seed: int, settings: dict) -> dict:
    """RLHF's first half on the testbed: a small PickScore-shaped reward model (a tiny CLIP, random
    init, 32 px) trained with the PickScore objective on the job's pairs, the labels DPO gets.
    Pairs are split by prompt (``val_fraction`` of the prompts held out) so its reported accuracy
    is on unseen prompts. Writes ``out_dir/model`` (loads as ``pickscore=DIR``) and
    ``out_dir/reward_model.json`` (accuracy, pair counts)."""
    from ..rewards.tiny import build_pickscore
    from ..trainers.reward_model import RewardTrainConfig, train_reward

    out = Path(out_dir)
    done = out / "reward_model.json"
    made_by = {"pairs": str(pairs_dir), "seed": seed, "settings": settings,
               "pairs_mtime": max(f.stat().st_mtime for f in Path(pairs_dir).glob("*.parquet"))}
    if done.is_file() and json.loads(done.read_text()).get("made_by") == made_by:
        return json.loads(done.read_text())
    counts = split_reward_model_pairs(Path(pairs_dir), out / "pairs", float(settings.get("val_fraction", 0.15)))
    init = build_pickscore(out / "init", seed=seed)
    cfg = RewardTrainConfig(model=str(init), data=str(out / "pairs" / "train.parquet"), val_data=str(out / "pairs" / "val.parquet"),
                            output_dir=str(out / "model"), max_steps=int(settings.get("steps", 300)),
                            batch_size=int(settings.get("batch_size", 16)), learning_rate=float(settings.get("learning_rate", 1e-3)),
                            weight_decay=0.0, warmup_steps=int(settings.get("warmup_steps", 10)),
                            eval_every=int(settings.get("steps", 300)), log_every=50, shuffle_buffer=1000,
                            train_logit_scale=bool(settings.get("train_logit_scale", False)), seed=seed, device="cpu")
    res = train_reward(cfg)
    info = {"made_by": made_by, "model": str(out / "model"), "train_pairs": counts["train"], "val_pairs": counts["val"],
            "val_accuracy": res["val_accuracy"], "val_accuracy_initial": res["val_accuracy_initial"],
            "val_accuracy_strict": res["history"][-1].get("accuracy_strict") if res.get("history") else None}
    done.write_text(json.dumps(info, indent=2, default=float))
    return info


def _train(config_file: str, overrides: list[str]) -> dict:
    from ..config import load_config
    from ..trainers import train

    cfg = load_config(config_file, overrides)
    if _finished(Path(cfg.output_dir), cfg):
        return {"reused": True}
    # the job owns its run directories: an earlier run of another config (seed, budget) is replaced
    train(load_config(config_file, [*overrides, "overwrite=true"]))
    return {"reused": False}


def _eval(kwargs: dict) -> dict:
    from dataclasses import asdict

    from ..eval.generate import EvalConfig, run_eval

    cfg = EvalConfig(**kwargs)
    done = Path(cfg.out) / "summary.json"
    if done.is_file():  # an earlier run of the job evaluated exactly this (and the run has not changed since)
        fresh = cfg.lora is None or max(f.stat().st_mtime for f in Path(cfg.lora).glob("*.safetensors")) < done.stat().st_mtime
        saved = json.loads(done.read_text()).get("config", {})
        if fresh and all(saved.get(k) == v for k, v in asdict(cfg).items() if k not in ("extra", "num_prompts")):
            return json.loads(done.read_text())
    return run_eval(cfg)


def _finished(run_dir: Path, cfg) -> bool:
    """A run of exactly this config already finished in ``run_dir`` (so a re-run reuses it)."""
    import yaml

    from ..config import to_dict

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    wanted = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    for d in (saved, wanted):  # how a run was started is not part of what it is
        if isinstance(d, dict):
            d.pop("overwrite", None)
    return (run_dir / "final_state.json").is_file() and saved == wanted


# ------------------------------------------------------------------------------------ the job
def online_reward_overrides(m: JobMethod, reward_model_dir: Path | None) -> list[str]:
    """The training reward of an online row and the rewards watched on the fixed eval subset: the
    taste and faithfulness always (the efficiency race and the reward-hacking guard read them)."""
    if m.reward == REWARD_MODEL:
        if reward_model_dir is None:
            raise ValueError("the reward-model row needs the reward model's directory")
        train_reward = f"{{name: 'pickscore={reward_model_dir}', weight: 1.0}}"
    else:
        train_reward = f"{{name: {m.reward}, weight: 1.0}}"
    keep = ["eval.keep_best=testbed_style"] if m.reward == REWARD_MODEL else []
    return [f"rewards=[{train_reward}]", "eval.rewards=[{name: testbed_style}, {name: testbed}]", "eval.at_start=true", *keep]


def evaluated_weights(m: JobMethod, run_dir: Path) -> Path:
    """The weights a row is judged by: the final ones, except for the RLHF row, whose checkpoint is
    the evaluation with the highest true taste on the fixed eval subset (``best/``, chosen on the
    ``curve`` prompts, never on ``indist``): a learned reward can be over-optimised, and the
    curve shows where."""
    return run_dir / "best" if m.reward == REWARD_MODEL else run_dir


def eval_seeds(b: dict, split: str, base_kind: str) -> int:
    """Images per caption of a split for the rows of one base (``{kind}_{split}_seeds``, else
    ``{split}_seeds``): a base and its rows always share them, so every comparison stays paired."""
    return int(b.get(f"{base_kind}_{split}_seeds", b[f"{split}_seeds"]))


def expected_seconds(b: dict, name: str, kind: str, default: float) -> float:
    """A task's expected seconds on the reference machine: ``seconds`` in the budget (measured,
    see job.yaml), else ``default``."""
    return float((b.get("seconds") or {}).get(name, (b.get("seconds") or {}).get(kind, default)))


def run_testbed_compare(out: str, budget: str = "quick", methods: list[str] | None = None, force_base: bool = False,
                        seed: int = 0, workers: int | None = None, log=print) -> dict:
    from . import write_prompts
    from .base_model import BUDGETS, get_base_model
    from .prompts import job_prompt_splits
    from .report import write_testbed_report

    b = load_budget(budget)
    table, extra_ov = budget_methods(b, budget)
    wanted = list(methods or b.get("methods") or [])
    unknown = [m for m in wanted if m not in table]
    if unknown:  # before any work
        raise UserError(f"--methods: unknown {', '.join(unknown)}; available: {', '.join(table)}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_workers, why = cpu_plan(workers)
    log(f"[testbed-compare] budget {budget}, seed {seed}: {why}")
    t_all = time.perf_counter()

    # 1. bases (shipped, cached or trained now) and 2. prompt sets
    t0 = time.perf_counter()
    bases = {"unet": str(get_base_model(b["base"], force=force_base, log=log)),
             "flow": str(get_base_model(b["flow_base"], force=force_base, log=log))}
    base_seconds = time.perf_counter() - t0
    log(f"[testbed-compare] bases: UNet {bases['unet']}, flow {bases['flow']} ({base_seconds:.0f}s)")
    if BUDGETS[b["base"]].scene != BUDGETS[b["flow_base"]].scene:
        raise UserError(f"budget {budget!r}: the two bases were trained on different scene distributions; the job's "
                        "prompt sets serve both")
    splits = job_prompt_splits(int(b["n_train_prompts"]), int(b["indist_prompts"]), int(b["compositional_prompts"]),
                               n_curve=int(b.get("curve_prompts", 16)), **BUDGETS[b["base"]].scene)
    files = {k: str(write_prompts(v, out_dir / "prompts" / f"{k}.txt")) for k, v in splits.items()}

    sched = Scheduler(n_workers)
    logs = out_dir / "logs"
    # 3. pairs, in ``workers`` shards (different pair seeds, one parquet file each)
    need_pairs = any(table[m].reads_pairs for m in wanted)
    n_shards = max(1, min(n_workers, 4)) if need_pairs else 0
    per_shard = -(-int(b["n_pairs"]) // max(n_shards, 1))
    n_img = per_shard * int(b.get("images_per_prompt", 2))
    for k in range(n_shards):
        sched.add(Task(f"pairs{k}", _make_pairs, (bases["unet"], splits["train"], per_shard, 1000 * seed + k, str(out_dir / "data"), b),
                       weight=n_img * expected_seconds(b, "pairs", "pair_image", 0.1), log=str(logs / f"pairs{k}.log")))
    pair_tasks = tuple(f"pairs{k}" for k in range(n_shards))
    rm_dir = out_dir / "reward_model" if any(table[m].reward == REWARD_MODEL for m in wanted) else None
    if rm_dir is not None:
        sched.add(Task("reward_model", train_reward_model, (str(out_dir / "data" / "pairs"), str(rm_dir), seed, b.get("reward_model") or {}),
                       deps=pair_tasks, weight=expected_seconds(b, "reward_model", "reward_model", 30), log=str(logs / "reward_model.log")))

    # 4. training runs
    common_ov = [f"seed={seed}"]
    for name in wanted:
        m = table[name]
        run_dir = out_dir / "runs" / name
        kind_ov = b.get("grpo_overrides" if m.online else "pair_overrides") or []
        deps: tuple[str, ...] = pair_tasks
        if m.online:
            data_ov = [f"data={files['train']}", f"eval.data={files['curve']}", f"eval.num_prompts={len(splits['curve'])}",
                       *online_reward_overrides(m, rm_dir / "model" if rm_dir else None)]
            deps = ("reward_model",) if m.reward == REWARD_MODEL else ()
        else:
            data_ov = [f"data={out_dir / 'data' / m.data}"]
        overrides = [f"model={bases[m.base]}", f"output_dir={run_dir}", *data_ov, *common_ov,
                     *map(str, kind_ov), *map(str, (b.get("method_overrides") or {}).get(name, [])), *extra_ov.get(name, [])]
        sched.add(Task(f"train:{name}", _train, (str(CONFIG_DIR / m.config), overrides), deps=deps,
                       weight=expected_seconds(b, name, "online" if m.online else "pair", 250 if m.online else 50),
                       log=str(run_dir.with_suffix(".log"))))

    # 5. evals: each base and each run on both splits, shared seeds
    eval_common = dict(rewards=list(REWARDS), seeds=0, base_seed=10_000 + seed, steps=int(b["eval_steps"]),
                       guidance=float(b["eval_guidance"]), batch_size=32, grid_prompts=8)
    base_kinds = sorted({table[m].base for m in wanted})
    evals: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        for who in [f"base_{k}" for k in base_kinds] + wanted:
            kind = who[5:] if who.startswith("base_") else table[who].base
            seeds = eval_seeds(b, split, kind)
            ev_dir = out_dir / "eval" / split / who
            kw = {**eval_common, "seeds": seeds, "model": bases[kind], "prompts": files[split], "out": str(ev_dir),
                  "label": who, "lora": None if who.startswith("base_") else str(evaluated_weights(table[who], out_dir / "runs" / who))}
            images = len(splits[split]) * seeds
            sched.add(Task(f"eval:{split}:{who}", _eval, (kw,), deps=() if who.startswith("base_") else (f"train:{who}",),
                           weight=images * expected_seconds(b, "eval_image", "eval_image", 0.1), log=str(ev_dir.with_suffix(".log"))))
            evals[(split, who)] = str(ev_dir)

    plan = sched.simulate()
    estimate = max((e for _, e in plan.values()), default=0.0)
    log(f"[testbed-compare] {len(sched.tasks)} tasks; estimate {estimate / 60:.1f} min on the reference machine, "
        f"up to {1.6 * estimate / 60:.0f} min on the slowest measured (1.3-1.6x; job.yaml 'seconds' holds the costs)")
    sched.run(log)
    seconds = {"bases": base_seconds, **{t.name: t.result["seconds"] for t in sched.tasks.values()}}
    seconds["total"] = time.perf_counter() - t_all
    timeline = {t.name: [round(t.started, 1), round(t.ended, 1)] for t in sched.tasks.values() if t.started is not None}
    busy = sched.busy_fraction()
    status = {name: ("ok" if sched.tasks[f"train:{name}"].result["ok"] else sched.tasks[f"train:{name}"].result["error"])
              for name in wanted}
    rm_info = sched.tasks["reward_model"].result.get("value") if rm_dir is not None and sched.tasks["reward_model"].result["ok"] else None

    # 6. report
    ok_evals = {k: v for k, v in evals.items() if sched.tasks[f"eval:{k[0]}:{k[1]}"].result["ok"]}
    res = write_testbed_report(out_dir / "report", budget=budget, seed=seed, methods={n: table[n] for n in wanted},
                               evals=ok_evals, runs={n: out_dir / "runs" / n for n in wanted if status[n] == "ok"},
                               seconds=seconds, status=status, plumbing=bool(b.get("plumbing", False)), why_cpu=why,
                               reward_model=rm_info, pairs_dir=out_dir / "data", estimate=estimate, busy=busy)
    summary = {"budget": budget, "seed": seed, "bases": bases, "status": status, "estimate_seconds": round(estimate, 1),
               "busy_fraction": busy, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "timeline": timeline,
               "reward_model": rm_info, "headline": res["headline"], "race": res["race"]}
    (out_dir / "testbed_compare.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    log(res["headline_md"])
    log(f"[testbed-compare] report: {res['report_md']} ({seconds['total']:.0f}s total, workers busy "
        f"{100 * (busy or 0):.0f}% of the time)")
    return summary
