"""Write ``docs/memory_plans.md``: the memory plan of every packaged recipe (``diffalign plan --all``).

    python scripts/memory_plans.py                 # 80 GiB GPUs, each recipe's GPU count and sharding
    python scripts/memory_plans.py --gpu-mem 141   # another GPU size
    python scripts/memory_plans.py --check         # exit 1 when the page is stale, write nothing

Rerun it after changing a recipe or a shape config (``scripts/model_shape_counts.py`` first for the latter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import diffalign.trainers  # noqa: F401  registers every trainer's config with load_config
from diffalign.plan import memory_plans_markdown

OUT = Path(__file__).resolve().parents[1] / "docs" / "memory_plans.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of one GPU (default 80)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    parser.add_argument("--check", action="store_true", help="compare with the written page; write nothing")
    args = parser.parse_args(argv)
    text = memory_plans_markdown(args.gpu_mem)
    if args.check:
        stale = not args.out.is_file() or args.out.read_text(encoding="utf-8") != text
        print(f"{args.out} is {'stale: rerun scripts/memory_plans.py' if stale else 'up to date'}")
        return int(stale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
