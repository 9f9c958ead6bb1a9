"""``diffalign eval`` (generate + score with fixed seeds) and ``diffalign compare`` (report)."""

from __future__ import annotations

import argparse


def cmd_eval(args) -> int:
    from ..eval.generate import EvalConfig, run_eval

    cfg = EvalConfig(
        model=args.model, prompts=args.prompts, rewards=args.reward or [], out=args.out, lora=args.lora,
        seeds=args.seeds, base_seed=args.base_seed, steps=args.steps, guidance=args.guidance,
        resolution=args.resolution, batch_size=args.batch_size, num_prompts=args.num_prompts,
        label=args.label, device=args.device, max_sequence_length=args.max_sequence_length,
    )
    import logging

    # diffusers logs the whole multi-line state-dict error before raising it; the error is
    # reported below in one line, so its logger is quiet for this call (failures still raise).
    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)
    try:
        summary = run_eval(cfg, nested=False)
    except RuntimeError as e:
        if args.lora and "size mismatch" in str(e):
            raise lora_mismatch_error(args.lora, args.model, str(e)) from None
        raise
    finally:
        peft_log.setLevel(level)
    print(f"eval {summary['label']}: {summary['n_images']} images in {summary['seconds']:.1f}s -> {args.out}")
    for name, s in summary["rewards"].items():
        print(f"  {name}: {s['mean']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}] n={s['n']}")
    return 0


def lora_mismatch_error(lora: str, model: str, message: str):
    """One line for torch's many-line "size mismatch for ...lora_A" when a LoRA meets another base."""
    import re
    from pathlib import Path

    from ..errors import UserError
    from ..trainers.rundir import read_config

    first = re.search(r"size mismatch for (\S+?):.*?shape (torch\.Size\(\[[^\]]*\]\)) from checkpoint.*?is (torch\.Size\(\[[^\]]*\]\))", message)
    detail = f"; e.g. {first.group(1)} is {first.group(2)[11:-1]} in the LoRA, {first.group(3)[11:-1]} in the model" if first else ""
    saved = read_config(Path(lora) / "config.yaml") or {}
    base = f" (it was trained on {saved['model']})" if saved.get("model") else ""
    return UserError(f"--lora {lora} does not fit --model {model}: the LoRA was trained on another base model{base}{detail}")


def cmd_compare(args) -> int:
    from ..eval.compare import compare

    res = compare(args.runs, args.out, base=args.base, names=args.names, max_grid_prompts=args.grid_prompts)
    print(f"wrote {res['report_md']} and {res['report_html']}")
    print(res["table_md"])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="generate with fixed seeds and score: diffalign eval --model M --prompts F --reward R --out D")
    p.add_argument("--model", required=True, help="diffusers pipeline dir or hub id")
    p.add_argument("--lora", default=None, help="training run dir (LoRA weights or a full pipeline)")
    p.add_argument("--prompts", required=True,
                   help="prompt file (.txt/.jsonl), testbed_heldout[:N], or a named set: partiprompts, drawbench, pickapic_test, hpsv2, geneval")
    p.add_argument("--reward", action="append", metavar="NAME[=PATH]", help="reward to score with (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (default 2)")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--label", default=None, help="name of this eval in reports (default: the out dir name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens of SD3-family prompts (default: the pipeline's, 256; the testbed flow base uses 8)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare eval dirs (and training runs) in a report: diffalign compare DIR ... --out R")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval dirs (summary.json) and/or training run dirs (metrics.jsonl)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--base", default=None, help="eval dir (or label) to compute win rates against (default: first eval without --lora)")
    p.add_argument("--names", nargs="*", default=None, help="display names, one per RUN_DIR")
    p.add_argument("--grid-prompts", type=int, default=6, help="prompts in the side-by-side grid")
    p.set_defaults(func=cmd_compare)
