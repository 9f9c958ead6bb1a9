"""Write ``diffalign/configs/model_shapes/counts.json``: the numbers ``diffalign plan`` reads.

For every packaged shape config (``diffalign/configs/model_shapes/*/*.json``) the module is built
on the meta device (no weights, no hub, no GPU) and counted: parameters, floating-point buffers,
and for each denoiser the largest gradient-checkpointing unit and the fitted activation bytes of
one training sample (``diffalign.plan.shapes.probe_activations`` at the probe points). Then the
fit is checked at one more point and its error printed.

    python scripts/model_shape_counts.py            # rewrite counts.json (about a minute on 2 CPU cores)
    python scripts/model_shape_counts.py --check    # compare with the packaged file, write nothing

Rerun it after adding or editing a shape config; ``tests/test_plan.py`` rebuilds the SD1.5 entries
and fails when they differ from the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffalign.logging import FP32_MODULES_NOTICE, library_call
from diffalign.plan import shapes

OUT = Path(shapes.configs_root().joinpath(shapes.SHAPES_FOLDER).joinpath(shapes.COUNTS_FILE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the packaged counts.json; write nothing")
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    models = {}
    for rel in shapes.shape_configs():
        t0 = time.time()
        entry = shapes.count_entry(rel)
        models[rel] = entry
        line = f"{rel:40s} {entry['params']:>15,} params {entry['buffers']:>12,} buffers"
        if "activations" in entry:
            module = shapes.build_meta(rel)
            with library_call(FP32_MODULES_NOTICE):
                module.to(torch.bfloat16)
            side, text = shapes.CHECK_PROBE
            probed = shapes.probe_activations(module, side, text)
            fitted = shapes.fitted_activations(entry, side, text)
            err = max(abs(fitted[k] - probed[k]) / max(probed[k], 1) for k in shapes.PROBE_KEYS)
            line += f"  act/sample at {side * 8}px+{text} tok: {probed['total'] / 2**30:.2f} GiB (fit error {err:.1%})"
        print(f"{line}  [{time.time() - t0:.1f}s]", flush=True)
    counts = {
        "version": shapes.COUNTS_VERSION,
        "_about": "written by scripts/model_shape_counts.py from the shape configs beside it; do not edit by hand",
        "_built_with": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "models": models,
    }
    if args.check:
        old = json.loads(OUT.read_text()) if OUT.is_file() else {"models": {}}
        bad = [rel for rel, e in models.items() if old["models"].get(rel, {}).get("params") != e["params"]]
        print("counts.json is up to date" if not bad else f"counts.json differs for: {', '.join(bad)}")
        return 1 if bad else 0
    OUT.write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
