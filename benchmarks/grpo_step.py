"""Time GRPO steps: rollout vs train seconds per step, per variant config, on one model.

    python benchmarks/grpo_step.py --model DIR [--configs grpo mixgrpo branchgrpo dancegrpo] [--steps 3]
    python benchmarks/grpo_step.py --tiny sd15 sd3          # builds tiny models in a temp dir

Runs ``diffalign.trainers.grpo.train_grpo`` with ``diffalign/configs/tiny/<name>.yaml`` (plus ``--set
key=value`` overrides) and prints the mean ``rollout_seconds`` / ``train_seconds`` over the steps
after the first (warm-up), the model rows per step and ``logprob_mismatch``. ``--json`` writes the
table. Runs on a GPU when one is visible (accelerate's default device), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(model: str, config: str, steps: int, overrides: list[str], out_root: Path) -> dict:
    from diffalign.config import load_config
    from diffalign.trainers.grpo import train_grpo

    out = out_root / f"{Path(model).name}-{config}"
    cfg = load_config(ROOT / "diffalign" / "configs" / "tiny" / f"{config}.yaml",
                      [f"model={model}", f"output_dir={out}", f"max_steps={steps}", "eval.every=-1", *overrides])
    t0 = time.perf_counter()
    hist = train_grpo(cfg)["history"]
    wall = time.perf_counter() - t0
    timed = hist[1:] if len(hist) > 1 else hist
    mean = lambda k: sum(h[k] for h in timed) / len(timed)  # noqa: E731
    return {
        "model": model, "config": config, "steps": steps, "wall_seconds": round(wall, 2),
        "rollout_seconds": round(mean("rollout_seconds"), 3), "train_seconds": round(mean("train_seconds"), 3),
        "reward_wait_seconds": round(mean("reward_wait_seconds"), 3), "transitions": timed[-1]["transitions"],
        "model_rows": timed[-1]["model_rows"], "logprob_mismatch": max(h["logprob_mismatch"] for h in hist),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="*", default=[], help="diffusers model dirs / hub ids")
    p.add_argument("--tiny", nargs="*", default=[], help="tiny model kinds to build (sd15, sd21, sdxl, sd3)")
    p.add_argument("--configs", nargs="*", default=["grpo", "mixgrpo", "branchgrpo", "dancegrpo"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="extra key=value config overrides")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sd15, full vs window, 3 steps (< 1 minute on CPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.tiny, args.configs, args.steps = args.tiny or ["sd15"], ["grpo", "mixgrpo"], 3
    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    models = list(args.model)
    if args.tiny:
        from diffalign.models.tiny import BUILDERS

        models += [str(BUILDERS[k](tmp / f"tiny-{k}")) for k in args.tiny]
    if not models:
        p.error("give --model DIR or --tiny KIND")
    rows = []
    for m in models:
        for c in args.configs:
            r = bench(m, c, args.steps, args.overrides, tmp)
            rows.append(r)
            print(f"{Path(m).name:>12} {c:>11}: rollout {r['rollout_seconds']:.2f}s  train {r['train_seconds']:.2f}s  "
                  f"rows {r['model_rows']}  transitions {r['transitions']}  mismatch {r['logprob_mismatch']:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
