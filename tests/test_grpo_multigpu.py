"""What the first real multi-GPU GRPO run needed (issue 30): reward models on the rank's own device,
evaluation in chunks and split over the processes, the checkpoint before the evaluation, and the
same number of micro-batches on every rank when ``drop_zero_advantage`` keeps different counts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import textwrap
from pathlib import Path

import pytest
import torch

from diffalign.config import load_config
from diffalign.trainers.grpo_config import RewardSpec

CONFIGS = Path(__file__).resolve().parents[1] / "diffalign" / "configs" / "tiny"
SMALL = ("max_steps=1", "sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2",
         "train_batch_size=4", "sampler.eval_num_steps=2")


def _cfg(model_dir, out, *overrides):
    return load_config(CONFIGS / "grpo.yaml", [f"model={model_dir}", f"output_dir={out}", *SMALL, *overrides])


# ------------------------------------------------------------------------------------ 1. reward devices
def test_default_device_carries_the_current_cuda_index(monkeypatch):
    """A bare ``cuda`` is resolved by whichever thread uses it (GPU 0 on a worker thread): the
    default names the current device's index at construction."""
    from diffalign.rewards import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert base.default_device() == torch.device("cuda", 3)
    assert base.resolve_device("cuda") == torch.device("cuda", 3)
    assert base.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert base.resolve_device("cpu") == torch.device("cpu")


def test_scoring_thread_sets_its_cuda_device(monkeypatch):
    from diffalign.trainers.grpo_rewards import use_device_in_thread

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    use_device_in_thread(torch.device("cpu"))
    assert calls == []
    use_device_in_thread(torch.device("cuda", 3))
    assert calls == [torch.device("cuda", 3)]


def _modules(obj, depth: int = 2) -> list[torch.nn.Module]:
    """The torch modules a reward holds (directly or one object down, e.g. an embedder's model)."""
    found = []
    for v in vars(obj).values():
        if isinstance(v, torch.nn.Module):
            found.append(v)
        elif depth > 1 and hasattr(v, "__dict__") and not isinstance(v, (type, torch.Tensor)):
            found += _modules(v, depth - 1)
    return found


def test_every_reward_model_sits_on_the_accelerator_device(tiny_model, tmp_path, monkeypatch):
    """The trainer gives every reward it builds (training and ``eval.rewards``) ``accelerator.device``
    and loads it before the scoring thread starts; the scoring thread sets that device. The rewards'
    own default is made a different device (meta), so a reward left to its default is caught."""
    import diffalign.trainers.online as online
    from diffalign.rewards import base, tiny

    clip_dir = tiny.BUILDERS["clip"](tmp_path / "clip")
    pick_dir = tiny.BUILDERS["pickscore"](tmp_path / "pickscore")
    monkeypatch.setattr(base, "default_device", lambda: torch.device("meta"))
    bound = []
    real_bind = getattr(online, "use_device_in_thread", lambda d: None)
    monkeypatch.setattr(online, "use_device_in_thread",
                        lambda d: (bound.append((d, threading.current_thread() is threading.main_thread())), real_bind(d)),
                        raising=False)

    cfg = _cfg(tiny_model("sd3"), tmp_path / "run")
    cfg.rewards = [RewardSpec(name=f"clipscore={clip_dir}")]
    cfg.eval.rewards = [RewardSpec(name=f"pickscore={pick_dir}")]
    recipe = online.OnlineRecipe(cfg).setup()
    try:
        device = recipe.accelerator.device
        rewards = [fn for _, _, fn in recipe.rewards + recipe.watched_rewards]
        assert len(rewards) == 2
        for fn in rewards:
            assert fn.device == device
            assert fn.loaded  # loaded on the main thread, at setup
            params = [p for m in _modules(fn) for p in m.parameters()]
            assert params and all(p.device == device for p in params)
        recipe.executor.submit(lambda: None).result()
        assert bound == [(device, False)]
    finally:
        recipe.executor.shutdown(wait=True)
        recipe.accelerator.end_training()


# ------------------------------------------------------------------------------------ 4. evaluation
def test_eval_shard_covers_every_prompt_once_in_order():
    from diffalign.trainers.rollout_schedule import eval_shard

    assert eval_shard(5, 0, 1) == [0, 1, 2, 3, 4]
    assert eval_shard(5, 0, 2) == [0, 1, 2] and eval_shard(5, 1, 2) == [3, 4, 4]  # padded to equal counts
    assert eval_shard(1, 1, 2) == [0]
    for n in (1, 7, 8, 9):
        for world in (1, 2, 3, 4):
            shards = [eval_shard(n, r, world) for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            assert sum(shards, [])[:n] == list(range(n))


def test_evaluation_decodes_in_chunks_of_eval_batch_size(tiny_model, tmp_path):
    """Every decode holds at most ``eval.batch_size`` images and together they are the eval set;
    the means do not depend on the chunk size (up to kernel numerics)."""
    from diffalign.trainers.online import OnlineRecipe

    recipe = OnlineRecipe(_cfg(tiny_model("sd3"), tmp_path, "eval.num_prompts=5", "eval.batch_size=2")).setup()
    try:
        sizes = []
        real_decode = recipe.adapter.decode_latents
        recipe.adapter.decode_latents = lambda latents: (sizes.append(latents.shape[0]), real_decode(latents))[1]
        chunked = recipe.evaluate(recipe.eval_prompts, recipe.eval_metadata)
        assert sizes == [2, 2, 1]
        sizes.clear()
        recipe.cfg.eval.batch_size = 64
        whole = recipe.evaluate(recipe.eval_prompts, recipe.eval_metadata)
        assert sizes == [5]
        assert chunked["eval_reward_mean"] == pytest.approx(whole["eval_reward_mean"], abs=1e-5)
    finally:
        recipe.executor.shutdown(wait=True)
        recipe.accelerator.end_training()


def test_eval_batch_size_must_be_positive(tiny_model, tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="eval.batch_size.*must be >= 1"):
        _cfg(tiny_model("sd3"), tmp_path, "eval.batch_size=0")


def test_checkpoint_is_saved_before_the_evaluation(tiny_model, tmp_path, monkeypatch):
    """An evaluation that fails (out of memory) after a checkpoint-due step must not lose the step."""
    from diffalign.trainers.online import OnlineRecipe, train_online

    def oom(self, prompts, metadata):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(OnlineRecipe, "evaluate", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_online(_cfg(tiny_model("sd3"), tmp_path, "checkpoint_every=1", "eval.every=0"))
    assert (tmp_path / "checkpoints" / "step-000001").is_dir()


# ------------------------------------------------------------------------------------ 8. equal micro-batches
def test_pad_selection_pads_with_masked_repeats():
    from diffalign.trainers.trajectory import pad_selection

    rows, real = pad_selection(torch.tensor([3, 7]), 5, 10)
    assert rows.tolist() == [3, 7, 3, 7, 3] and real.tolist() == [True, True, False, False, False]
    rows, real = pad_selection(torch.tensor([3, 7]), 2, 10)  # nothing to pad: unchanged
    assert rows.tolist() == [3, 7] and real.all()
    rows, real = pad_selection(torch.tensor([], dtype=torch.long), 3, 4)  # nothing kept on this rank
    assert rows.tolist() == [0, 1, 2] and not real.any()
    with pytest.raises(ValueError):
        pad_selection(torch.tensor([1, 2, 3]), 2, 10)


def test_padding_rows_carry_no_gradient(tiny_model, tmp_path):
    """``keep`` False zeroes a row's policy and KL terms: [real, pad] is half the loss of [real]."""
    from diffalign.trainers.online import OnlineRecipe
    from diffalign.trainers.rollout_schedule import make_plan

    recipe = OnlineRecipe(_cfg(tiny_model("sd3"), tmp_path, "loss.kl_beta=0.1", "eval.every=-1")).setup()
    try:
        plan, _ = make_plan(recipe.cfg, 0, torch.Generator().manual_seed(0))
        rolled = recipe.rollout(plan, recipe.prompt_indices(1))
        adv = recipe.advantages(rolled, 1)
        # move the LoRA off zero so the KL term (and its gradient) is not zero
        with torch.no_grad():
            for p in recipe.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        trans = adv.transitions
        pair = trans[torch.tensor([0, 1])]
        one = trans[torch.tensor([0])]
        loss_one, m_one, _ = recipe.strategy.transition_loss(rolled.model, one)
        loss_pad, m_pad, _ = recipe.strategy.transition_loss(rolled.model, pair, torch.tensor([True, False]))
        assert float(m_one["kl"]) > 0
        torch.testing.assert_close(loss_pad, loss_one / 2, rtol=1e-5, atol=1e-7)
        loss_none, _, _ = recipe.strategy.transition_loss(rolled.model, pair, torch.tensor([False, False]))
        recipe.optimizer.zero_grad(set_to_none=True)
        loss_none.backward()
        assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in recipe.params)
    finally:
        recipe.executor.shutdown(wait=True)
        recipe.accelerator.end_training()


UNEVEN_RUN = textwrap.dedent('''
    """GRPO on 2 ranks where rank 1's reward is flat for whole groups, so drop_zero_advantage keeps
    fewer rows there: none at step 1, half at step 2 (rank 0 keeps all)."""
    import os
    import sys

    import torch

    import diffalign.trainers  # noqa: F401  registers the trainer configs
    from diffalign.config import load_config
    from diffalign.rewards import FunctionReward, register_reward
    from diffalign.rewards.simple import redness
    from diffalign.trainers.online import train_online

    calls = []


    def uneven(images, prompts=None, metadata=None):
        calls.append(len(images))
        scores = redness(images)
        if int(os.environ["RANK"]) == 1:
            flat = len(images) if len(calls) == 1 else len(images) // 2  # whole groups (group_size 2)
            scores[:flat] = 0.5
        return scores


    register_reward("uneven", lambda path=None, **kw: FunctionReward(uneven, "uneven", device=kw.get("device", "cpu")))
    train_online(load_config(sys.argv[1], sys.argv[2:]))
''')


HANG_SECONDS = 300  # the run takes ~15 s on 2 CPU cores; a hang waits in an all-reduce for ever


def _descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        out += kids
        todo += kids
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_different_kept_counts_do_not_hang(tiny_model, tmp_path):
    """With ``drop_zero_advantage`` rank 1 keeps no rows at step 1 and half the rows at step 2: both
    ranks must still run the same micro-batches (before: a rank skipped or stopped early while the
    other waited in an all-reduce). Ends with identical weights on both ranks."""
    script = tmp_path / "uneven_run.py"
    script.write_text(UNEVEN_RUN)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(CONFIGS / "grpo.yaml"), f"model={tiny_model('sd3')}", f"output_dir={out}", "max_steps=2",
           "sampler.num_steps=3", "prompts_per_step=2", "batch_size=4", "group_size=2", "train_batch_size=2",
           "sampler.eval_num_steps=2", "eval.num_prompts=3", "advantage.drop_zero_advantage=true",
           "rewards=[{name: uneven}]"]
    log = tmp_path / "run.log"
    with log.open("w") as f:  # a file, not a pipe: a hung rank cannot block reading it
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(proc.pid), proc.pid]:  # the ranks run in their own process groups
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"the 2-rank run hung (killed after {HANG_SECONDS} s): {log.read_text()[-2000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    state = json.loads((out / "final_state.json").read_text())
    assert state["ranks"] == 2 and state["ranks_identical"], state
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "eval_reward_mean" in rows[-1]
