"""Testbed commands: ``testbed-base`` (train/cache the base model) and ``testbed-compare``."""

from __future__ import annotations

import argparse


def cmd_testbed_base(args) -> int:
    import json

    from ..testbed.base_model import get_base_model

    path = get_base_model(args.budget, force=args.force, out=args.out)
    info = json.loads((path / "testbed_base.json").read_text())
    print(f"testbed base model ({args.budget}): {path} (trained in {info['train_seconds']}s, loss {info['final_loss']:.4f})")
    return 0


def cmd_testbed_compare(args) -> int:
    from ..testbed.job import run_testbed_compare

    res = run_testbed_compare(args.out, budget=args.budget, methods=args.methods, force_base=args.force_base,
                              seed=args.seed, workers=args.workers)
    failed = {k: v for k, v in res["status"].items() if v != "ok"}
    return 1 if failed and len(failed) == len(res["status"]) else 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..testbed.base_model import BUDGETS  # plain dataclasses: no torch import

    p = sub.add_parser("testbed-base", help="train (or show the cached) testbed base model")
    p.add_argument("--budget", choices=list(BUDGETS), default="full",
                   help="full: the UNet base; flow_long: the flow-matching (SD3-layout) base, trained in three stages "
                        "(flow_pre, full_flow, flow_long); quick*: seconds-long smoke versions")
    p.add_argument("--force", action="store_true", help="retrain even if shipped or cached")
    p.add_argument("--out", default=None, help="train into this directory (default: the cache)")
    p.set_defaults(func=cmd_testbed_base)

    p = sub.add_parser("testbed-compare", help="base model -> pairs -> DPO/MaPO/SFT/GRPO -> eval -> report, on the testbed world")
    p.add_argument("--out", required=True, help="output directory (runs, evals, report/report.md)")
    from ..testbed.job import budget_names

    p.add_argument("--budget", choices=budget_names(), default="full",
                   help="quick: plumbing check (~1 min); full: the main job (<= 15 min on 2 cores); long: about an hour "
                        "(AWM, DanceGRPO, BranchGRPO and DDPO in the race, the faithfulness-only rows) "
                        "(diffalign/testbed/configs/job.yaml)")
    p.add_argument("--methods", nargs="*", default=None,
                   help="subset of: dpo mapo sft dpo_mismatch mapo_mismatch grpo mixgrpo dancegrpo ddpo nft awm grpo_rm grpo_faith "
                        "mixgrpo_faith nft_faith, or the budget's variants (default: the budget's list)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs, every training run and the eval noise (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one torch thread each (default: one per core, at most 4)")
    p.add_argument("--force-base", action="store_true", help="retrain the base models even if shipped or cached")
    p.set_defaults(func=cmd_testbed_compare)
