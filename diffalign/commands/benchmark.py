"""``diffalign benchmark NAME``: GenEval, OCR, HPS v2, PartiPrompts, DrawBench with their own protocols."""

from __future__ import annotations

import argparse

BENCHMARKS = ("geneval", "ocr", "hpsv2", "partiprompts", "drawbench")


def _reward_opts(pairs: list[str] | None) -> dict:
    import yaml

    from ..errors import UserError

    opts = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--reward-opt {pair!r}: use KEY=VALUE (e.g. color_model=/path/to/clip)")
        opts[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return opts


def cmd_benchmark(args) -> int:
    from ..eval.benchmarks import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(
        name=args.benchmark, model=args.model, out=args.out, prompts=args.prompts, lora=args.lora,
        rewards=args.reward or [], reward_path=args.reward_path, reward_opts=_reward_opts(args.reward_opt),
        limit=args.limit, images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
        guidance=args.guidance, resolution=args.resolution, batch_size=args.batch_size, device=args.device,
        label=args.label, max_sequence_length=args.max_sequence_length,
    )
    s = run_benchmark(cfg)
    made = f", {s['generated']} generated" if s["generated"] != s["n_images"] else ""
    print(f"benchmark {s['benchmark']} {s['label']}: {s['n_images']} images{made} in {s['seconds']:.1f}s -> {args.out}")
    for k, v in s["headline"].items():
        print(f"  {k}: {v:.4f}")
    for c in s["reward_columns"]:
        r = s["rewards"][c]
        print(f"  {c}: {r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] n={r['n']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run a published benchmark with its protocol: diffalign benchmark geneval --model M --prompts F --out D",
        description="Generate a benchmark's images with its sampling protocol (resumable: existing images are kept) "
                    "and score them: geneval (GenEval's results.jsonl, per-task accuracy and overall), ocr "
                    "(Flow-GRPO's OCR test set), hpsv2 (HPD v2's four styles), partiprompts, drawbench (PickScore). "
                    "Prompt files are local, in their official format (--prompts). See diffalign/eval/benchmarks.py.")
    p.add_argument("benchmark", choices=BENCHMARKS, metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--model", required=True, help="diffusers pipeline dir or hub id")
    p.add_argument("--lora", default=None, help="training run dir (LoRA weights or a full pipeline)")
    p.add_argument("--out", required=True, help="output directory (re-run with the same one to resume)")
    p.add_argument("--prompts", default=None,
                   help="the benchmark's prompt file in its official format: geneval evaluation_metadata.jsonl, "
                        "ocr test.txt, hpsv2 a directory of {anime,concept-art,paintings,photo}.json, "
                        "partiprompts PartiPrompts.tsv, drawbench a CSV with a Prompts column")
    p.add_argument("--reward", action="append", metavar="NAME[=PATH]",
                   help="score with these rewards instead of the protocol's (hpsv2, partiprompts, drawbench; repeatable)")
    p.add_argument("--reward-path", default=None, metavar="PATH",
                   help="checkpoint of the protocol's reward (geneval: the Mask2Former dir; ocr: the OCR model)")
    p.add_argument("--reward-opt", action="append", metavar="KEY=VALUE",
                   help="keyword option of the reward (repeatable), e.g. color_model=DIR for geneval, recognizer=pkg.mod:fn for ocr")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (of each style, for hpsv2)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: the protocol's (geneval 4, others 1)")
    p.add_argument("--seed", type=int, default=None, help="image k of each prompt uses seed + k (default 42)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the protocol's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the protocol's)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the protocol's, else the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (keep it when resuming)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default=None, help="name in reports (default: the out dir name)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens of SD3-family prompts")
    p.set_defaults(func=cmd_benchmark)
