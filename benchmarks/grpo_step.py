"""Time GRPO steps: rollout vs train seconds per step, per variant config, on one model.

    python benchmarks/grpo_step.py --model DIR [--configs grpo mixgrpo branchgrpo dancegrpo] [--steps 3]
    python benchmarks/grpo_step.py --tiny sd15 sd3 flux     # builds tiny models in a temp dir
    python benchmarks/grpo_step.py --arch flux --configs grpo --set sampler.resolution=1024 mixed_precision=bf16 \
        sampler.num_steps=6 batch_size=4 group_size=4 prompts_per_step=1 train_batch_size=4 \
        model_opts.gradient_checkpointing=true                  # GPU: the real FLUX.1-dev transformer
    python benchmarks/grpo_step.py --arch flux --layers 1 --configs grpo --steps 2 --set sampler.resolution=64 \
        batch_size=2 group_size=2 prompts_per_step=1 train_batch_size=2 sampler.num_steps=2   # CPU smoke run

Runs ``diffalign.trainers.online.train_online`` with ``diffalign/configs/tiny/<name>.yaml`` (plus ``--set
key=value`` overrides) and prints the mean ``rollout_seconds`` / ``train_seconds`` over the steps
after the first (warm-up), the model rows per step and ``logprob_mismatch``. ``--json`` writes the
table. Runs on a GPU when one is visible (accelerate's default device), else on the CPU.
``--arch flux`` (or ``sd35m``, SD3.5-Medium) trains the real FLUX.1-dev architecture with random weights, built in memory by
``pair_step.build_adapter`` (no checkpoint needed; ``--layers N`` keeps N blocks of each kind); the
table then adds the peak GPU memory.
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
    import torch

    from diffalign.config import load_config
    from diffalign.trainers.online import train_online

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    out = out_root / f"{Path(model).name}-{config}"
    cfg = load_config(ROOT / "diffalign" / "configs" / "tiny" / f"{config}.yaml",
                      [f"model={model}", f"output_dir={out}", f"max_steps={steps}", "eval.every=-1", *overrides])
    t0 = time.perf_counter()
    hist = train_online(cfg)["history"]
    wall = time.perf_counter() - t0
    timed = hist[1:] if len(hist) > 1 else hist
    mean = lambda k: sum(h[k] for h in timed) / len(timed)  # noqa: E731
    images = cfg.prompts_per_step * cfg.group_size  # per process and step
    return {
        "model": model, "config": config, "steps": steps, "wall_seconds": round(wall, 2),
        "resolution": cfg.sampler.resolution, "num_steps": cfg.sampler.num_steps, "lora_rank": cfg.lora.rank,
        "images_per_step": images, "rollout_images_per_second": round(images / mean("rollout_seconds"), 3),
        "rollout_seconds": round(mean("rollout_seconds"), 3), "train_seconds": round(mean("train_seconds"), 3),
        "reward_wait_seconds": round(mean("reward_wait_seconds"), 3), "transitions": timed[-1]["transitions"],
        "model_rows": timed[-1]["model_rows"], "logprob_mismatch": max(h["logprob_mismatch"] for h in hist),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def use_in_memory_architecture(arch: str, layers: int | None) -> str:
    """Make the trainer's ``load_adapter`` build ``arch`` with random weights (pair_step's builder);
    returns the name the runs report as their model."""
    import diffalign.trainers.common as common

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pair_step import build_adapter

    def load(model, opts=None, dtype=None, device="cpu", encoders=True):
        # encoders: the trainer's latent-cache switch; an online run always asks for them
        import torch

        return build_adapter(arch, opts, torch.device(device), dtype or torch.float32, layers)

    common.load_adapter = load
    return f"{arch}-architecture" + (f"-{layers}layers" if layers else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="*", default=[], help="diffusers model dirs / hub ids")
    p.add_argument("--tiny", nargs="*", default=[], help="tiny model kinds to build (sd15, sd21, sdxl, sd3, flux, flux2, ...)")
    p.add_argument("--arch", default=None, help=("flux | sd35m: the real FLUX.1-dev / SD3.5-Medium architecture, "
                                                 "random weights, in memory"))
    p.add_argument("--layers", type=int, default=None, help="with --arch: keep N double + N single blocks (smoke runs)")
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
    if args.arch:
        models.append(use_in_memory_architecture(args.arch, args.layers))
    if not models:
        p.error("give --model DIR, --tiny KIND or --arch flux|sd35m")
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
