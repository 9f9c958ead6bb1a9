"""GPU paths run on CPU (issue #30): bf16 under CPU autocast, full fine-tuning with a frozen bf16
reference, on tiny models. Each run is its own process: accelerate's state is a process-wide
singleton fixed by the first Accelerator (the other tests' fp32 one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_full_fine_tune_with_a_bf16_reference_trains(kind, tiny_model, toy_pairs, tmp_path):
    """The frozen reference is cast to bf16 while the trained copy stays fp32; the inputs of each
    forward must take the dtype of the network called ("Input type (float) and bias type
    (BFloat16)" at step 1 before, issue #30 item 2)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "diffalign.cli", "-q", "train", str(ROOT / "diffalign/configs/tiny/dpo.yaml"),
                           f"model={tiny_model(kind)}", f"data={toy_pairs}", f"output_dir={out}", "max_steps=2",
                           "lora.rank=0", "mixed_precision=bf16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
