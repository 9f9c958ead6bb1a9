"""``diffalign testbed-compare``: the end-to-end alignment comparison on the testbed world.

1. the two shipped (or cached, or freshly trained) base models
   (:mod:`diffalign.testbed.base_model`): a UNet (``sd15`` family, epsilon prediction) for
   the offline pair methods and DDPO, and an SD3-layout MMDiT trained with rectified flow
   for the flow-matching online methods (Flow-GRPO, MixGRPO, DanceGRPO), as their papers use;
2. three prompt sets (:func:`diffalign.testbed.prompts.job_prompt_splits`): ``train`` (pairs
   and rollouts), ``indist`` (the primary evaluation: same distribution, scenes never used for
   pairs or rollouts) and ``compositional`` (held-out colour x shape pairs);
3. pairs sampled from the UNet base on train prompts and labelled with the hidden utility
   (:func:`diffalign.testbed.make_pairs`): ``pairs/`` and ``pairs_mismatch/`` (chosen images
   restyled to the full warm target style, MaPO's reference-mismatch setting);
4. the methods of the budget (:data:`METHODS`), each judged on its *target* reward: the hidden
   utility ``testbed_style`` for pair methods, the verifiable ``testbed`` reward for online ones;
5. ``eval`` of each base and each run on both splits with shared seeds, and a report:
   ``report/report.md`` (+ HTML) with the headline table, DPO - SFT, the GRPO training-reward
   slope, reward against wall-clock, and one detailed ``compare`` report per base and split.

Work runs in ``workers`` processes with one torch thread each (a tiny model gains little from
a second thread, and one thread per process cannot be oversubscribed by a busy neighbour);
tasks start as soon as what they read exists, longest first. Budgets (``quick``, ``full``,
``long``) are in ``diffalign/testbed/configs/job.yaml``; ``--seed`` changes the pairs, every
training seed and the eval noise, never the prompt sets.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "testbed" / "configs"
REWARDS = ("testbed", "testbed_style")
SPLITS = ("indist", "compositional")


@dataclass(frozen=True)
class JobMethod:
    """A method of the job: its training config, which base it starts from, what it reads
    and the reward it is judged on."""

    config: str  # a file in CONFIG_DIR
    base: str  # "unet" | "flow"
    data: str  # "pairs" | "pairs_mismatch" | "prompts"
    target: str  # "testbed_style" (pair methods) | "testbed" (online methods)

    @property
    def online(self) -> bool:
        return self.data == "prompts"


METHODS: dict[str, JobMethod] = {
    "dpo": JobMethod("dpo.yaml", "unet", "pairs", "testbed_style"),
    "mapo": JobMethod("mapo.yaml", "unet", "pairs", "testbed_style"),
    "sft": JobMethod("sft.yaml", "unet", "pairs", "testbed_style"),
    "dpo_mismatch": JobMethod("dpo.yaml", "unet", "pairs_mismatch", "testbed_style"),
    "mapo_mismatch": JobMethod("mapo.yaml", "unet", "pairs_mismatch", "testbed_style"),
    "grpo": JobMethod("grpo.yaml", "flow", "prompts", "testbed"),  # Flow-GRPO (Flow-SDE, every step)
    "mixgrpo": JobMethod("mixgrpo.yaml", "flow", "prompts", "testbed"),  # sliding SDE window, ODE elsewhere
    "dancegrpo": JobMethod("dancegrpo.yaml", "flow", "prompts", "testbed"),
    "ddpo": JobMethod("grpo.yaml", "unet", "prompts", "testbed"),  # DDIM-eta GRPO on the UNet base
    "nft": JobMethod("nft.yaml", "flow", "prompts", "testbed"),  # DiffusionNFT: ODE rollouts, forward-process loss
    "awm": JobMethod("awm.yaml", "flow", "prompts", "testbed"),  # Advantage Weighted Matching
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


def load_budget(budget: str, config_dir: Path = CONFIG_DIR) -> dict:
    import yaml

    path = config_dir / "job.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing (the testbed-compare budgets)")
    budgets = yaml.safe_load(path.read_text())
    if budget not in budgets:
        raise UserError(f"--budget {budget!r}: not in {path} (has: {', '.join(budgets)})")
    return budgets[budget]


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (from ``/proc/stat`` over ``seconds``;
    None where it cannot be read). The load average lags by a minute, so it would blame, say,
    the ``pip install`` that just finished."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    n = os.cpu_count() or 1
    return n * (1.0 - (i1 - i0) / max(t1 - t0, 1))


def cpu_plan(workers: int | None = None) -> tuple[int, str]:
    """How many worker processes to run (one torch thread each), and a line saying why."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is not None:
        return max(1, int(workers)), f"{workers} worker process(es) x 1 torch thread (--workers)"
    n = max(1, min(cores, 4))
    why = f"{n} worker process(es) x 1 torch thread on {cores} core(s)"
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        why += (f"; other processes keep {busy:.1f} core(s) busy, so this run will be slower (one torch thread per "
                "process keeps it from collapsing; --workers 1 leaves a core to the neighbour)")
    return n, why


# ------------------------------------------------------------------------------------ worker tasks
# Top-level functions: they run in spawned worker processes (see ``_init_worker``).


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_MININTERVAL", "10")
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, have the kernel stop this worker when the job process dies (a ``kill`` of the job
    would otherwise leave its workers training on, taking the cores from the next run)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _logged(log_path: str):
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def _task(fn, log_path: str, *args) -> dict:
    """Run ``fn(*args)`` with its output in ``log_path``; never raises (one failure must not sink the job)."""
    t0 = time.perf_counter()
    try:
        with _logged(log_path):
            value = fn(*args)
        return {"ok": True, "seconds": time.perf_counter() - t0, "value": value}
    except BaseException as e:  # noqa: BLE001 - reported as the task's status
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}


def _make_pairs(base: str, prompts: list[str], n_pairs: int, seed: int, out_dir: str, b: dict) -> int:
    from ..testbed import make_pairs
    from ..testbed.base_model import PipelineSampler
    from .generate import load_pipeline

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

    from .generate import EvalConfig, run_eval

    cfg = EvalConfig(**kwargs)
    done = Path(cfg.out) / "summary.json"
    if done.is_file():  # an earlier run of the job evaluated exactly this (and the run has not changed since)
        fresh = cfg.lora is None or (Path(cfg.lora) / "final_state.json").stat().st_mtime < done.stat().st_mtime
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


# ------------------------------------------------------------------------------------ scheduling
@dataclass
class Task:
    name: str
    fn: object
    args: tuple
    deps: tuple[str, ...] = ()
    weight: float = 1.0  # expected cost: heavier tasks start first
    result: dict | None = None
    log: str = ""


@dataclass
class Scheduler:
    """Run tasks in a process pool as soon as their dependencies finished, heaviest first."""

    workers: int
    tasks: dict[str, Task] = field(default_factory=dict)

    def add(self, task: Task) -> None:
        self.tasks[task.name] = task

    def run(self, log) -> None:
        import multiprocessing as mp

        from tqdm.auto import tqdm

        done: set[str] = set()
        running: dict = {}
        bar = tqdm(total=len(self.tasks), desc="testbed-compare", unit="task", leave=True)
        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
            while len(done) < len(self.tasks):
                blocked = [t for t in self.tasks.values() if t.name not in done and t.name not in running.values()]
                failed_deps = [t for t in blocked if any(self.tasks[d].result and not self.tasks[d].result["ok"] for d in t.deps)]
                for t in failed_deps:
                    t.result = {"ok": False, "seconds": 0.0, "error": "skipped: " + ", ".join(
                        d for d in t.deps if not self.tasks[d].result["ok"]) + " failed"}
                    done.add(t.name)
                    bar.update(1)
                ready = sorted((t for t in blocked if t not in failed_deps and all(d in done for d in t.deps)), key=lambda t: -t.weight)
                for t in ready[: max(0, self.workers - len(running))]:
                    running[pool.submit(_task, t.fn, t.log, *t.args)] = t.name
                if not running:
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    t = self.tasks[running.pop(fut)]
                    t.result = fut.result()
                    done.add(t.name)
                    bar.update(1)
                    state = "ok" if t.result["ok"] else f"FAILED ({t.result['error']}; log: {t.log})"
                    log(f"[testbed-compare] {t.name}: {state} in {t.result['seconds']:.0f}s")
                bar.set_postfix_str(", ".join(running.values())[:60])
        bar.close()


# ------------------------------------------------------------------------------------ the job
def budget_methods(b: dict, budget: str) -> tuple[dict[str, JobMethod], dict[str, list[str]]]:
    """The methods a budget can run: :data:`METHODS` plus its ``variants`` (a method under another
    name with extra overrides and, optionally, another ``target`` reward: hyper-parameter grids,
    diagnostics), and the variants' extra overrides."""
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


def run_testbed_compare(out: str, budget: str = "quick", methods: list[str] | None = None, force_base: bool = False,
                        seed: int = 0, workers: int | None = None, log=print) -> dict:
    from ..testbed import write_prompts
    from ..testbed.base_model import BUDGETS, get_base_model
    from ..testbed.prompts import job_prompt_splits
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
    # prompts from the world each base was trained on: the flow base's captions may also name a
    # background tone (BUDGETS["flow_tone"]); then its methods get their own prompt sets, under prompts/flow
    prompt_sets: dict[str, dict[str, list[str]]] = {}
    files: dict[str, dict[str, str]] = {}
    for kind, cfg_name in (("unet", b["base"]), ("flow", b["flow_base"])):
        scene = BUDGETS[cfg_name].scene
        if kind == "flow" and scene == BUDGETS[b["base"]].scene:
            prompt_sets[kind], files[kind] = prompt_sets["unet"], files["unet"]
            continue
        sets = job_prompt_splits(int(b["n_train_prompts"]), int(b["indist_prompts"]), int(b["compositional_prompts"]), **scene)
        where = out_dir / "prompts" / ("" if kind == "unet" else kind)
        sets["eval_subset"] = sets["indist"][: int(b.get("curve_prompts", 16))]
        prompt_sets[kind] = sets
        files[kind] = {k: str(write_prompts(v, where / f"{k}.txt")) for k, v in sets.items()}
    splits = prompt_sets["unet"]

    sched = Scheduler(n_workers)
    logs = out_dir / "logs"
    # 3. pairs, in ``workers`` shards (different pair seeds, one parquet file each)
    need_pairs = any(not table[m].online for m in wanted)
    n_shards = max(1, min(n_workers, 4)) if need_pairs else 0
    per_shard = -(-int(b["n_pairs"]) // max(n_shards, 1))
    for k in range(n_shards):
        sched.add(Task(f"pairs{k}", _make_pairs, (bases["unet"], splits["train"], per_shard, 1000 * seed + k, str(out_dir / "data"), b),
                       weight=per_shard * int(b.get("images_per_prompt", 2)) / 40, log=str(logs / f"pairs{k}.log")))
    pair_tasks = tuple(f"pairs{k}" for k in range(n_shards))

    # 4. training runs
    common_ov = [f"seed={seed}"]
    for name in wanted:
        m = table[name]
        run_dir = out_dir / "runs" / name
        kind_ov = b.get("grpo_overrides" if m.online else "pair_overrides") or []
        if m.online:
            data_ov = [f"data={files[m.base]['train']}", f"eval.data={files[m.base]['eval_subset']}"]
        else:
            data_ov = [f"data={out_dir / 'data' / m.data}"]
        overrides = [f"model={bases[m.base]}", f"output_dir={run_dir}", *data_ov, *common_ov,
                     *map(str, kind_ov), *map(str, (b.get("method_overrides") or {}).get(name, [])), *extra_ov.get(name, [])]
        sched.add(Task(f"train:{name}", _train, (str(CONFIG_DIR / m.config), overrides), deps=() if m.online else pair_tasks,
                       weight=float(b.get("weights", {}).get(name, 30 if m.online else 10)), log=str(run_dir.with_suffix(".log"))))

    # 5. evals: each base and each run on both splits, shared seeds
    eval_common = dict(rewards=list(REWARDS), seeds=0, base_seed=10_000 + seed, steps=int(b["eval_steps"]),
                       guidance=float(b["eval_guidance"]), batch_size=32, grid_prompts=8)
    base_kinds = sorted({table[m].base for m in wanted})
    evals: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        seeds = int(b[f"{split}_seeds"])
        for who in [f"base_{k}" for k in base_kinds] + wanted:
            kind = who[5:] if who.startswith("base_") else table[who].base
            ev_dir = out_dir / "eval" / split / who
            kw = {**eval_common, "seeds": seeds, "model": bases[kind], "prompts": files[kind][split], "out": str(ev_dir),
                  "label": who, "lora": None if who.startswith("base_") else str(out_dir / "runs" / who)}
            n_img = len(prompt_sets[kind][split]) * seeds
            sched.add(Task(f"eval:{split}:{who}", _eval, (kw,), deps=() if who.startswith("base_") else (f"train:{who}",),
                           weight=n_img / 100, log=str(ev_dir.with_suffix(".log"))))
            evals[(split, who)] = str(ev_dir)

    sched.run(log)
    seconds = {"bases": base_seconds, **{t.name: t.result["seconds"] for t in sched.tasks.values()}}
    seconds["total"] = time.perf_counter() - t_all
    status = {name: ("ok" if sched.tasks[f"train:{name}"].result["ok"] else sched.tasks[f"train:{name}"].result["error"])
              for name in wanted}

    # 6. report
    ok_evals = {k: v for k, v in evals.items() if sched.tasks[f"eval:{k[0]}:{k[1]}"].result["ok"]}
    res = write_testbed_report(out_dir / "report", budget=budget, seed=seed, methods={n: table[n] for n in wanted},
                               evals=ok_evals, runs={n: out_dir / "runs" / n for n in wanted if status[n] == "ok"},
                               seconds=seconds, status=status, plumbing=bool(b.get("plumbing", False)), why_cpu=why)
    summary = {"budget": budget, "seed": seed, "bases": bases, "status": status,
               "seconds": {k: round(v, 1) for k, v in seconds.items()}, "headline": res["headline"]}
    (out_dir / "testbed_compare.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    log(res["headline_md"])
    log(f"[testbed-compare] report: {res['report_md']} ({seconds['total']:.0f}s total)")
    return summary

