"""A real 2-process run: torchrun + accelerate on CPU (gloo). Ranks must end with identical weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_dpo_ranks_identical(tiny_model, toy_pairs, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "diffalign.cli", "train", str(ROOT / "diffalign/configs/tiny/dpo.yaml"),
        f"model={tiny_model('sd15')}", f"data={toy_pairs}", f"output_dir={out}", "max_steps=3", "batch_size=2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "final_state.json").read_text())
    assert state["ranks"] == 2
    assert len(state["param_fingerprints"]) == 2 and state["ranks_identical"], state
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # only the main process writes
    assert rows[-1]["pairs_seen"] == 3 * 2 * 2  # steps x per-rank batch x ranks


def test_two_process_grpo_ranks_identical(tiny_model, tmp_path):
    out = tmp_path / "grpo_ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
        "-m", "diffalign.cli", "train", str(ROOT / "diffalign/configs/tiny/grpo.yaml"),
        f"model={tiny_model('sd3')}", f"output_dir={out}", "max_steps=2", "eval.every=-1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "final_state.json").read_text())
    assert state["ranks"] == 2 and state["ranks_identical"], state
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(abs(r["logprob_mismatch"]) < 1e-4 for r in rows)
