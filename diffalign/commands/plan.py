"""``diffalign plan``: the GPU memory per training process of a recipe, as numbers (no GPU, no weights)."""

from __future__ import annotations

import argparse


def cmd_plan(args) -> int:
    import diffalign.trainers  # noqa: F401  registers every trainer's config with load_config

    from ..errors import UserError
    from ..plan import describe, memory_plans_markdown, plan_recipe

    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, not {args.gpus}")
    if args.gpu_mem <= 0:
        raise UserError(f"--gpu-mem must be > 0 GiB, not {args.gpu_mem:g}")
    if args.all:
        if args.config or args.overrides:
            raise UserError("--all plans every packaged recipe: give no RECIPE or overrides with it")
        print(memory_plans_markdown(args.gpu_mem, args.gpus, args.sharded), end="")
        return 0
    if not args.config:
        raise UserError("give a RECIPE (diffalign recipes lists them) or --all")
    plan = plan_recipe(args.config, args.overrides, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, sharded=args.sharded)
    print(describe(plan))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="GPU memory per process of a recipe: weights, trainable params, grads, optimizer, "
                                    "activations; whether it fits (no GPU or weights needed)")
    p.add_argument("config", nargs="?", metavar="RECIPE", help="recipe name, packaged config or YAML file (diffalign recipes)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. lora.rank=0 batch_size=2")
    p.add_argument("--all", action="store_true", help="every packaged recipe: the Markdown page of docs/memory_plans.md")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="processes (one per GPU); default: the recipe's target count (its 'Target:' comment)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory of one GPU in GiB (default 80)")
    p.add_argument("--sharded", action=argparse.BooleanOptionalAction, default=None,
                   help="FSDP full shard (--sharded) or DDP (--no-sharded); default: as the recipe's launch line says")
    p.set_defaults(func=cmd_plan)
