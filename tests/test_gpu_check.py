"""benchmarks/gpu_check.sh, the prepared check for a lent GPU, runs end to end on the CPU with
--dry-run (issues #27/#30): the script is known to work before a GPU is there to run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: item")]
    assert len(lines) == 4 and all(line.endswith(" ok") for line in lines), lines
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["recompute_true"]["first_update_max_log_ratio"] == [0.0, 0.0, 0.0]
    assert len(res["recompute_false"]["eval_reward_mean"]) == 3  # evaluated every step, in chunks of 3 prompts
