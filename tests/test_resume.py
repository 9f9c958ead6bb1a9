"""Exact resume after SIGKILL, atomic checkpoints, fallback from corrupt/unsafe checkpoints.

Tolerance: fp32 on CPU with a fixed seed; resumed weights must match the uninterrupted run to
1e-6 (in practice bit-identical) and metrics.jsonl must be identical except for wall-clock keys.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.trainers import train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"step_seconds"}


def _overrides(model, data, out, steps, *extra):
    return [f"model={model}", f"data={data}", f"output_dir={out}", f"max_steps={steps}", "batch_size=2",
            "checkpoint_every=2", "checkpoints_keep=2", *extra]


def _metrics(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _weights(out):
    return load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))


def _cli(cfg_path, overrides):
    # Every run in its own process with the same thread count: float sums depend on threads.
    cmd = [sys.executable, "-m", "diffalign.cli", "train", str(cfg_path), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def test_sigkill_then_resume_matches_uninterrupted(tiny_model, toy_pairs, tmp_path):
    model, steps = tiny_model("sd15"), 8
    cfg_path = ROOT / "diffalign/configs/tiny/dpo.yaml"
    _finish(_cli(cfg_path, _overrides(model, toy_pairs, tmp_path / "a", steps)))

    out_b = tmp_path / "b"
    proc = _cli(cfg_path, _overrides(model, toy_pairs, out_b, steps))
    metrics = out_b / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out_b / "pytorch_lora_weights.safetensors").exists()

    _finish(_cli(cfg_path, _overrides(model, toy_pairs, out_b, steps, "resume=latest")))
    wa, wb = _weights(tmp_path / "a"), _weights(out_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert _metrics(tmp_path / "a") == _metrics(out_b)
    kept = sorted(p.name for p in (out_b / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008"]  # keep-last-2, no leftover temp dirs


def test_corrupt_and_malicious_checkpoints_are_skipped(tiny_model, toy_pairs, tmp_path, capsys):
    model, cfg_path = tiny_model("sd15"), ROOT / "diffalign/configs/tiny/sft.yaml"
    out = tmp_path / "run"
    train(load_config(cfg_path, _overrides(model, toy_pairs, out, 4)))
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000004"]

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpts / "step-000004" / "optimizer.pt").write_bytes(pickle.dumps({"state": Exploit()}))
    capsys.readouterr()
    train(load_config(cfg_path, _overrides(model, toy_pairs, out, 5, "resume=latest")))
    assert "warning: skipping checkpoint" in capsys.readouterr().err.split("step-000004")[0]
    assert not marker.exists()  # weights_only=True refused the pickle
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # resumed from step 2, recomputed 3..5

    (ckpts / "step-000005" / "COMPLETE").unlink()  # a partial write
    train(load_config(cfg_path, _overrides(model, toy_pairs, out, 6, "resume=latest")))
    assert any(line.startswith("warning: ") and "partial" in line for line in capsys.readouterr().err.splitlines())


def test_explicit_bad_resume_path_is_an_error(tiny_model, toy_pairs, tmp_path):
    from diffalign.errors import UserError

    with pytest.raises(UserError, match="resume"):
        train(load_config(ROOT / "diffalign/configs/tiny/sft.yaml",
                          _overrides(tiny_model("sd15"), toy_pairs, tmp_path / "x", 2, f"resume={tmp_path / 'nope'}")))


def test_resume_latest_without_a_checkpoint_says_it_starts_over(tiny_model, toy_pairs, tmp_path, capsys):
    """``resume=latest`` on a directory with no checkpoint trains from step 1 and says so (issue #29, item 5)."""
    out = tmp_path / "fresh"
    train(load_config(ROOT / "diffalign/configs/tiny/sft.yaml",
                      _overrides(tiny_model("sd15"), toy_pairs, out, 1, "resume=latest")))
    said = capsys.readouterr().out
    assert f"resume=latest: no checkpoint in {out / 'checkpoints'}; training from step 1" in said
    assert [r["step"] for r in _metrics(out)] == [1]
