"""Scale-out of the online trainers on CPU processes (gloo): what holds across process counts.

Whole online runs are not layout-independent: every process draws its prompts (``prompt_sampling:
random``), its initial noise and its SDE noise from its own generator (``rank_generator``: seed x
100003 + rank), in its own order, so 2 processes x 2 prompts roll out other images than
1 process x 4 prompts, whatever the seed (there is no per-sample keyed draw for rollouts as
``data_opts.per_sample_draws`` is for pairs). What must hold, and is tested here with 2 processes
(``torchrun`` + gloo, ``tests/online_scale_out_worker.py``) against 1 process:

1. **Advantages** (:func:`diffalign.trainers.strategy.step_rewards`, shared by GRPO, NFT and AWM):
   the same rewards split over 2 processes (all samples of a prompt on one process) give the
   advantages of 1 process holding them all, for ``advantage.std`` group, global and none, a
   second ``std_ddof``, ``multi_reward: sum_of_advantages``, and tree rollouts (``tree: depth`` and
   ``leaf``). Exactly: the gathered rewards are the same numbers in the same order. Controls:
   statistics of each process's own rewards (no gathering) differ under ``global``; gathered rewards
   with each process's local group ids (no per-process offset) differ under ``group``.
2. **The GRPO update on a fixed rollout batch**: one process rolls out 4 prompts x 4 samples; then
   2 processes each take 2 prompts' rows of that rollout and run the loop's real advantages
   (``advantage.std: global``, so it needs the gathered rewards) and the strategy's update. The
   gradient the optimizer receives (DDP-averaged, clipped) equals the one-process gradient within
   fp32 summation order, and so do the loss and the weights after the step. Control: the default
   2-process layout (each process rolling out its own prompts) gives another gradient.

DiffusionNFT / AWM's update is not compared on a fixed batch: it draws its re-noising timesteps
and noise from the process's generator, so it differs across layouts by construction too (its
advantages are item 1's).

Tolerance of (2): as in tests/test_scale_out.py, the layouts do the same arithmetic in another fp32
order (2 micro-batches of 16 transitions per process against 4 on one, summed by autograd against
DDP's all-reduce; the prompts encoded 2 against 4 at a time), ~1e-7 relative. The gradient is
compared by the relative norm of its difference, < 1e-4 (observed 1.2e-5; the control, another
rollout: ~1), and element-wise within 1e-4 of its largest element (observed 2.3e-5); the weights after
one AdamW step with ``atol`` 2e-4, a fifteenth of the step at lr 3e-3 (observed 4.1e-5: AdamW's first
step is ~lr x sign(g), so an element whose gradient is near zero moves by a visible amount either way).
The advantages are equal exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests/online_scale_out_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
GRAD_RTOL = 1e-4  # ||g_2 - g_1|| / ||g_1||
ATOL = 2e-4


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def one_process(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(WORKER), *args])


def two_processes(port: int, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 str(WORKER), *args])


# ------------------------------------------------------------------------------ 1. advantages
def test_advantages_over_two_processes_equal_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one_process("advantages", str(one))
    two_processes(29551, "advantages", str(two))
    ref, got = json.loads(one.read_text()), json.loads(two.read_text())
    assert ref["world"] == 1 and got["world"] == 2 and "MULTI_CPU" in got["distributed_type"], got
    cases = [k for k in ref if k not in ("world", "distributed_type")]
    assert len(cases) == 8
    for case in cases:
        r, g = ref[case], got[case]
        assert r["combined"] == g["combined"], case  # every process saw all rewards, in rank order
        assert len(set(g["groups"])) == 4, case  # 2 prompts on each of 2 processes: 4 groups
        assert len(r["per_depth"]) == (3 if case.startswith("tree") else 1)
        for d, (a, b) in enumerate(zip(r["per_depth"], g["per_depth"])):
            a, b = torch.tensor(a), torch.tensor(b)
            assert a.abs().max() > 0.1 or (case.startswith("tree") and d == 0), (case, d)  # a root of each group: 0
            assert torch.equal(a, b), (case, d, (a - b).abs().max().item())
        leaves = lambda x: torch.tensor(x[-1])  # noqa: E731
        # the controls: each half of the gathering matters where the statistics use it
        if "global" in case:  # the std of one process's rewards is not the step's
            assert (leaves(g["local"]) - leaves(r["per_depth"])).abs().max() > 0.1, case
        if case in ("flat_group", "tree_depth_group"):
            assert torch.equal(leaves(g["local"]), leaves(r["per_depth"])), case  # a group lives on one process
            assert (leaves(g["no_offset"]) - leaves(r["per_depth"])).abs().max() > 0.1, case  # prompt 0 twice: one group


# ------------------------------------------------------------------------------ 2. the update
@pytest.mark.slow
def test_grpo_update_on_a_fixed_rollout_equals_one_process(tiny_model, tmp_path):
    model = tiny_model("sd3")
    rollout = tmp_path / "rollout.pt"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    keys = ("advantage.std=global",)
    one_process("update", model, str(one), str(rollout), *keys)
    two_processes(29552, "update", model, str(two), str(rollout), *keys)
    ref = torch.load(one / "update_result.pt", weights_only=False)
    got = torch.load(two / "update_result.pt", weights_only=False)
    assert ref["world"] == 1 and got["world"] == 2 and "MULTI_CPU" in got["distributed_type"], got["distributed_type"]
    r, g = ref["fixed"], got["fixed"]
    assert g["ranks_identical"]  # DDP: every process received the same gradient
    assert r["transitions"] == g["transitions"] == 4 * 4 * 4  # leaves x stochastic steps
    assert r["logprob_mismatch"] < 1e-4 and g["logprob_mismatch"] < 1e-4  # on-policy: ratio 1
    torch.testing.assert_close(g["advantages"], r["advantages"], rtol=0, atol=1e-6)  # the global std of all 16
    # the first update is on-policy (ratio 1): the loss is -mean(advantage) ~ 0 under global centring
    assert g["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)
    norm = r["grad"].norm()
    assert norm > 0
    rel = ((g["grad"] - r["grad"]).norm() / norm).item()
    assert rel < GRAD_RTOL, rel
    # element-wise: a few elements are sums that cancel, whose relative difference is large (0.3% seen)
    torch.testing.assert_close(g["grad"], r["grad"], rtol=1e-3, atol=1e-4 * r["grad"].abs().max().item())
    torch.testing.assert_close(got["params"], ref["params"], rtol=0, atol=ATOL)
    # the control: the default layout (each process rolls out its own prompts and noise) trains otherwise
    own = got["own_rollouts"]
    assert own["ranks_identical"]
    assert ((own["grad"] - r["grad"]).norm() / norm).item() > 100 * GRAD_RTOL
