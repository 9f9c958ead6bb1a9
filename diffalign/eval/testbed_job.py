"""``diffalign testbed-compare``: the end-to-end alignment comparison on the testbed world.

1. train (or load the cached) base model (:mod:`diffalign.testbed.base_model`);
2. sample the base model on train prompts and label pairs with the hidden utility
   (:func:`diffalign.testbed.make_pairs`): ``pairs/`` (normal) and ``pairs_mismatch/``
   (chosen images restyled to the target style; same images and labels);
3. train DPO, MaPO, SFT on the normal pairs, DPO and MaPO on the mismatch pairs, and GRPO
   on the ``testbed`` reward over the full trajectory and in a sliding window (MixGRPO);
   DanceGRPO on request;
4. ``eval`` the base and every run on held-out prompts with ``testbed`` and ``testbed_style``;
5. ``compare`` them into ``report/``.

Budgets (``quick``, ``full``) are in ``configs/testbed/job.yaml``.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from ..errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "testbed"


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


def grpo_available() -> bool:
    try:
        from ..trainers import CONFIG_CLASSES

        return "grpo" in CONFIG_CLASSES
    except Exception:
        return False


def _finished(run_dir: Path, cfg) -> bool:
    """A run of exactly this config already finished in ``run_dir`` (so a re-run resumes)."""
    import yaml

    from ..config import to_dict

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return (run_dir / "final_state.json").is_file() and saved == yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def run_testbed_compare(out: str, budget: str = "quick", methods: list[str] | None = None, force_base: bool = False, log=print) -> dict:
    from tqdm.auto import tqdm

    from ..config import load_config
    from ..testbed import heldout_prompts, make_pairs, train_prompts, write_prompts
    from ..testbed.base_model import BUDGETS, PipelineSampler, get_base_model
    from ..trainers import train
    from .compare import compare
    from .generate import EvalConfig, load_pipeline, run_eval

    b = load_budget(budget)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. base
    t0 = time.perf_counter()
    base = str(get_base_model(b["base"], force=force_base, log=log))
    times["base"] = time.perf_counter() - t0
    log(f"[testbed-compare] base model: {base} ({times['base']:.0f}s)")

    # 2. prompts + pairs
    t0 = time.perf_counter()
    scene = BUDGETS[b["base"]].scene  # prompts from the world the base was trained on
    train_p = train_prompts(int(b["n_train_prompts"]), **scene)
    held_p = heldout_prompts(int(b["eval_prompts"]), **scene)
    train_file = write_prompts(train_p, out_dir / "prompts" / "train.txt")
    held_file = write_prompts(held_p, out_dir / "prompts" / "heldout.txt")
    pipe = load_pipeline(base)
    sampler = CachingSampler(PipelineSampler(pipe, steps=int(b["pair_steps"]), guidance=float(b["pair_guidance"]), name="testbed-base"))
    pairs = {}
    for variant, mismatch in (("pairs", False), ("pairs_mismatch", True)):
        path = out_dir / "data" / variant / "train.parquet"
        if not path.is_file():
            make_pairs(sampler, train_p, int(b["n_pairs"]), seed=0, style_mismatch=mismatch, out_path=path,
                       tie_margin=float(b.get("tie_margin", 0.05)), images_per_prompt=int(b.get("images_per_prompt", 2)))
        pairs[variant] = str(path.parent)
    times["pairs"] = time.perf_counter() - t0
    log(f"[testbed-compare] pairs: {b['n_pairs']} x 2 variants ({times['pairs']:.0f}s)")

    # 3. runs: name -> (config, overrides); the budget adds its overrides per kind and per name
    pair_ov = [str(o) for o in b.get("pair_overrides", [])]
    grpo_ov = [f"data={train_file}", *[str(o) for o in b.get("grpo_overrides", [])]]
    plan: dict[str, tuple[str, list[str]]] = {
        "dpo": ("dpo.yaml", [f"data={pairs['pairs']}", *pair_ov]),
        "mapo": ("mapo.yaml", [f"data={pairs['pairs']}", *pair_ov]),
        "sft": ("sft.yaml", [f"data={pairs['pairs']}", *pair_ov]),
        "dpo_mismatch": ("dpo.yaml", [f"data={pairs['pairs_mismatch']}", *pair_ov]),
        "mapo_mismatch": ("mapo.yaml", [f"data={pairs['pairs_mismatch']}", *pair_ov]),
    }
    if grpo_available():
        for name in ("grpo", "mixgrpo", "dancegrpo"):
            plan[name] = (f"{name}.yaml", list(grpo_ov))
    for name, extra in (b.get("method_overrides") or {}).items():
        if name in plan:
            plan[name][1].extend(str(o) for o in extra)
    wanted = methods or b.get("methods") or list(plan)
    unknown = [m for m in wanted if m not in plan]
    if unknown:
        raise UserError(f"methods: unknown {', '.join(unknown)}; available: {', '.join(plan)}")
    plan = {k: plan[k] for k in wanted}
    status: dict[str, str] = {}
    for name, (cfg_file, overrides) in tqdm(list(plan.items()), desc="testbed-compare: train", leave=True):
        run_dir = out_dir / "runs" / name
        t0 = time.perf_counter()
        try:
            cfg = load_config(CONFIG_DIR / cfg_file, [f"model={base}", f"output_dir={run_dir}", *overrides])
            if _finished(run_dir, cfg):
                log(f"[testbed-compare] {name}: reusing the finished run in {run_dir}")
            else:
                train(cfg)
            status[name] = "ok"
        except Exception as e:  # one failing method must not sink the comparison
            status[name] = f"failed: {type(e).__name__}: {e}"
            (out_dir / "runs").mkdir(exist_ok=True)
            (out_dir / "runs" / f"{name}.error.txt").write_text(traceback.format_exc())
            log(f"[testbed-compare] {name} failed: {type(e).__name__}: {e}")
        times[f"train_{name}"] = time.perf_counter() - t0

    # 4. eval
    evals = []
    common = dict(prompts=str(held_file), rewards=["testbed", "testbed_style"], seeds=int(b["eval_seeds"]),
                  steps=int(b["eval_steps"]), guidance=float(b["eval_guidance"]))
    todo = [("base", None)] + [(n, str(out_dir / "runs" / n)) for n, s in status.items() if s == "ok"]
    for name, lora in tqdm(todo, desc="testbed-compare: eval", leave=True):
        t0 = time.perf_counter()
        ev_dir = out_dir / "eval" / name
        try:
            run_eval(EvalConfig(model=base, lora=lora, out=str(ev_dir), label=name, **common))
            evals.append(str(ev_dir))
        except Exception as e:
            if name == "base":
                raise
            status[name] = f"eval failed: {type(e).__name__}: {e}"
            log(f"[testbed-compare] eval of {name} failed: {type(e).__name__}: {e}")
        times[f"eval_{name}"] = time.perf_counter() - t0

    # 5. report
    res = compare(evals, str(out_dir / "report"), base="base")
    times["total"] = time.perf_counter() - t_all
    summary = {"budget": budget, "base_model": base, "status": status, "seconds": {k: round(v, 1) for k, v in times.items()},
               "table": res["rows"]}
    (out_dir / "testbed_compare.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log(res["table_md"])
    log(f"[testbed-compare] report: {res['report_md']} ({times['total']:.0f}s total)")
    return summary
