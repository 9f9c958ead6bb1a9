"""benchmarks/gpu_check.sh, the prepared check for a lent GPU, runs end to end on the CPU with
--dry-run (issues #27/#30): the script is known to work before a GPU is there to run it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("bench_pair_dpo", "bench_pair_vs_example", "bench_grpo_sd35m", "bench_grpo_flux", "fsdp_one_gpu")


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=1200, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: item")]
    assert len(lines) == 4 and all(line.endswith(" ok") for line in lines), lines
    for name in SECTIONS:  # issue #27 item 5: every measurement ran
        assert f"gpu_check: {name} ok" in proc.stdout, proc.stdout
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["recompute_true"]["first_update_max_log_ratio"] == [0.0, 0.0, 0.0]
    assert len(res["recompute_false"]["eval_reward_mean"]) == 3  # evaluated every step, in chunks of 3 prompts
    assert {r["attention"] for r in res["pair_dpo"]} == {"sdpa"} and res["pair_dpo"][0]["pairs_per_second"] > 0
    assert {r["method"] for r in res["pair_vs_example"]} == {"dpo", "diffusers_example"}
    assert res["ratio_vs_diffusers_example"]["pairs_per_second"] > 0
    for key in ("grpo_sd35m", "grpo_flux"):
        row = res[key][0]
        assert row["rollout_images_per_second"] > 0 and row["train_seconds"] > 0, row
        assert "architecture-1layers" in row["model"], row  # the real builders, one block of each kind
    assert set(SECTIONS) <= set(res["seconds"]) and res["dry_run"] is True
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.startswith("## gpu_check (dry run") and "| method |" in md and "rollout_images_per_second" in md


def test_peak_table_by_device_name():
    """MFU's denominator: the dense bf16 peak by the name torch reports; an unknown card has none."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pair_step import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4  # SXM
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835.5
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA H200 NVL") == 835.5
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_xformers_rows_take_the_sdpa_rows_flops():
    """FlopCounterMode does not see xformers' kernels: an xformers row's MFU uses the SDPA row's FLOPs."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pair_step import with_sdpa_flops

    case = {"method": "dpo", "cache": True, "checkpointing": False, "peak_tflops": 1000.0}
    rows = [{**case, "attention": "sdpa", "flops": 4e14, "step_seconds": 1.0, "mfu": 0.4},
            {**case, "attention": "xformers", "flops": 3e14, "step_seconds": 0.8, "mfu": 0.375}]
    with_sdpa_flops(rows)
    assert rows[1]["flops"] == 4e14 and rows[1]["flops_from"] == "sdpa" and rows[1]["mfu"] == 0.5
    assert rows[0]["mfu"] == 0.4 and "flops_from" not in rows[0]
