"""Scale-out of the offline pair trainer on CPU processes (gloo): what changes with the layout.

1. **N processes equal one process.** With ``data_opts.per_sample_draws=true`` every draw of a
   pair (flip, posterior sample, timestep, noise) comes from a generator keyed by
   (seed, epoch, data row), and the data order is dealt to the processes round-robin, so
   2 processes x ``batch_size=1``, 1 process x ``batch_size=2`` and 1 process x ``batch_size=1``
   x ``gradient_accumulation_steps=2`` train the same steps on the same pairs with the same draws.
2. **FSDP full fine-tuning** (``diffalign/configs/accelerate/fsdp.yaml`` with only the hardware
   keys changed: 2 CPU processes, fp32) really shards the denoiser, ends at the one-process
   weights, resumes exactly, and runs the LoRA path (reference = adapters disabled) and a UNet.
   accelerate takes FSDP only on GPUs: ``tests/fsdp_on_cpu.py`` lets its state take FSDP on
   CPU (see there); without it a CPU "FSDP" launch is plain data parallelism, which diffalign
   now says (``test_fsdp_config_on_cpu_says_it_runs_data_parallel``).

Tolerance. The layouts do the same arithmetic in a different fp32 summation order: a forward of
a batch of 2 against two forwards of 1 (other kernel blocking), the gradient sum over the batch
in autograd against DDP's all-reduce / FSDP's reduce-scatter over ranks (or the ``.grad``
accumulation over micro-batches). Those differences are ~1e-7 relative; AdamW divides each
gradient by its running RMS, so an element whose gradient is near zero can turn them into a
visibly different step (at most ~lr = 1e-3 a step). Observed after 4 steps: LoRA <= 5e-6,
full fine-tuning <= 4e-5 (<0.1% of the elements above 1e-6), but one CI run saw a LoRA element
2.5e-4 apart (a quarter step): where a gradient is near zero the step is as large as the noise
makes it. So the weights are compared element-wise with ``atol`` = a fifth of one step (2e-4),
allowing at most 0.1% of the elements beyond it (none beyond two steps a step), and the update
(final - initial weights) by the relative norm of its difference, < 1e-3 (observed ~6e-5; a
different draw realisation gives ~1).
Each test also checks the weights moved by far more than that, and the one-process run with
the default (per-process) draws lands outside the tolerance, so the comparison can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DPO = ROOT / "diffalign/configs/tiny/dpo.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ATOL = 2e-4  # a fifth of one AdamW step at lr 1e-3 (see the module docstring)
UPDATE_RTOL = 1e-3  # ||update_a - update_b|| / ||update_a||
STEPS = 4
OUTLIER_FRACTION = 1e-3  # of the weights' elements, may lie beyond ATOL (AdamW amplification, see above)
MAX_ELEMENT_DIFF = 2 * STEPS * 1e-3  # ... but none further than two AdamW steps of lr 1e-3 per step

# ------------------------------------------------------------------------------ runs
def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _args(model: str, data: str, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", str(DPO), f"model={model}", f"data={data}", f"output_dir={out}", f"max_steps={steps}", *extra]


def one_process(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "diffalign.cli", *args])


def torchrun(port: int, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                 "-m", "diffalign.cli", *args])


def fsdp_launch(config: Path, port: int, *args: str, shim: bool = True) -> subprocess.CompletedProcess:
    target = [str(ROOT / "tests/fsdp_on_cpu.py")] if shim else ["-m", "diffalign.cli"]
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                 "--main_process_port", str(port), *target, *args])


@pytest.fixture(scope="module")
def fsdp_cpu_config(tmp_path_factory) -> Path:
    """The shipped ``accelerate/fsdp.yaml`` with the hardware keys changed: 2 CPU processes, fp32."""
    cfg = yaml.safe_load((ROOT / "diffalign/configs/accelerate/fsdp.yaml").read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no")
    path = tmp_path_factory.mktemp("accelerate") / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------ weights
def lora_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def denoiser_weights(out: Path) -> dict[str, torch.Tensor]:
    """The saved denoiser of a full fine-tune (or of the tiny base model)."""
    for name in ("transformer", "unet"):
        files = sorted((out / name).glob("*.safetensors"))
        if files:
            return {k: v for f in files for k, v in load_file(str(f)).items()}
    raise AssertionError(f"no denoiser weights in {out}")


def _is_lora_b(key: str) -> bool:
    return "lora_B" in key or "lora.up" in key


def _update(w: dict, init: dict | None) -> torch.Tensor:
    """What training changed: ``w - init``; LoRA (``init`` None): its B matrices, which start at
    zero (the A matrices' random start is not saved, and would swamp the norm)."""
    if init is None:
        return torch.cat([w[k].flatten() for k in sorted(w) if _is_lora_b(k)])
    return torch.cat([(w[k] - init[k]).flatten() for k in sorted(w)])


def assert_same_training(a: dict, b: dict, init: dict | None = None) -> float:
    """``a`` and ``b`` (final weights of two layouts) equal within the stated tolerance; ``init``:
    the initial weights (None: a LoRA run, see :func:`_update`)."""
    assert a.keys() == b.keys()
    outliers = total = 0
    for k in a:
        diff = (a[k] - b[k]).abs()
        # no element further apart than AdamW can move it in the run (~lr a step, twice for margin)
        assert diff.max().item() <= MAX_ELEMENT_DIFF, (k, diff.max().item())
        outliers += int((diff > ATOL).sum())
        total += diff.numel()
    # elements beyond ATOL: the near-zero-gradient elements AdamW amplifies (module docstring)
    assert outliers <= OUTLIER_FRACTION * total, (outliers, total)
    ua, ub = _update(a, init), _update(b, init)
    rel = ((ua - ub).norm() / ua.norm()).item()
    assert rel < UPDATE_RTOL, rel
    return rel


def assert_moved(w: dict, init: dict | None) -> None:
    """The run changed the weights by far more than the tolerance (LoRA: its B matrices left zero)."""
    moved = _update(w, init).abs().max().item()
    assert moved > 5 * ATOL, moved


def assert_different_training(a: dict, b: dict, init: dict | None = None) -> None:
    """The control: another draw realisation is far outside the tolerance."""
    ua, ub = _update(a, init), _update(b, init)
    assert ((ua - ub).norm() / ua.norm()).item() > 100 * UPDATE_RTOL


# ------------------------------------------------------------------------------ 1. layouts (DDP)
@pytest.fixture(scope="module")
def lora_one_process(tiny_model, toy_pairs, tmp_path_factory) -> Path:
    """The reference layout: one process, batch_size 2, per-sample draws (LoRA DPO, SD1.5)."""
    out = tmp_path_factory.mktemp("lora_1x2")
    one_process(*_args(tiny_model("sd15"), toy_pairs, out, "batch_size=2", "data_opts.per_sample_draws=true"))
    return out


@pytest.mark.slow
def test_two_processes_equal_one_process_lora_dpo(lora_one_process, tiny_model, toy_pairs, tmp_path):
    """2 processes x batch_size 1 (DDP, gloo) == 1 process x batch_size 2: the same global batch
    (the stream deals the cached pairs round-robin), the same per-pair draws, the same weights."""
    model = tiny_model("sd15")
    out = tmp_path / "ddp_2x1"
    torchrun(29541, *_args(model, toy_pairs, out, "batch_size=1", "data_opts.per_sample_draws=true"))
    state = json.loads((out / "final_state.json").read_text())
    assert state["ranks"] == 2 and state["ranks_identical"] and state["distributed_type"] == "MULTI_CPU", state
    one, two = lora_weights(lora_one_process), lora_weights(out)
    assert_moved(one, None)
    assert_same_training(one, two)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (lora_one_process / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs_seen"] for r in rows] == [r["pairs_seen"] for r in ref] == [2, 4, 6, 8]
    for r, q in zip(rows, ref):  # the same pairs and draws: the same losses, up to summation order
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-3, abs=1e-5)

    # the control: the default draws (one generator per process, in batch order) train otherwise
    default = tmp_path / "default_1x2"
    one_process(*_args(model, toy_pairs, default, "batch_size=2"))
    assert_different_training(one, lora_weights(default))


@pytest.mark.slow
def test_gradient_accumulation_equals_larger_batch(lora_one_process, tiny_model, toy_pairs, tmp_path):
    """1 process x batch_size 1 x gradient_accumulation_steps 2 == 1 process x batch_size 2."""
    out = tmp_path / "acc_1x1x2"
    one_process(*_args(tiny_model("sd15"), toy_pairs, out, "batch_size=1", "gradient_accumulation_steps=2",
                       "data_opts.per_sample_draws=true"))
    assert_same_training(lora_weights(lora_one_process), lora_weights(out))


# ------------------------------------------------------------------------------ 2. FSDP
@pytest.fixture(scope="module")
def full_ft_one_process(tiny_model, toy_pairs, tmp_path_factory) -> Path:
    """Full fine-tuning (lora.rank=0, a frozen reference copy), SD3, one process x batch_size 2."""
    out = tmp_path_factory.mktemp("full_1x2")
    one_process(*_args(tiny_model("sd3"), toy_pairs, out, "lora.rank=0", "batch_size=2", "data_opts.per_sample_draws=true"))
    return out


@pytest.fixture(scope="module")
def full_ft_fsdp(fsdp_cpu_config, tiny_model, toy_pairs, tmp_path_factory) -> Path:
    """The same under FSDP: 2 CPU processes x batch_size 1, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("fsdp_2x1")
    proc = fsdp_launch(fsdp_cpu_config, 29542, *_args(tiny_model("sd3"), toy_pairs, out, "lora.rank=0", "batch_size=1",
                                                      "data_opts.per_sample_draws=true", "checkpoint_every=2"))
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_fsdp_full_finetune_is_sharded_and_equals_one_process(full_ft_fsdp, full_ft_one_process, tiny_model):
    state = json.loads((full_ft_fsdp / "final_state.json").read_text())
    # sharded during training: every denoiser parameter was a DTensor, wrapped per transformer block
    assert state["distributed_type"] == "FSDP", state
    assert state["sharded_parameters"] == state["parameters"] > 0, state
    assert state["fsdp_units"].get("JointTransformerBlock") == 2, state  # accelerate: the model's _no_split_modules
    assert "FSDP:" in (full_ft_fsdp / "stdout.txt").read_text()  # the run said so when it started
    trainer = json.loads((full_ft_fsdp / "checkpoints/step-000004/trainer.json").read_text())
    assert trainer["sharded"] is True and trainer["num_processes"] == 2

    init = denoiser_weights(Path(tiny_model("sd3")))
    one, fsdp = denoiser_weights(full_ft_one_process), denoiser_weights(full_ft_fsdp)
    assert_moved(one, init)
    assert_same_training(one, fsdp, init)


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(full_ft_fsdp, fsdp_cpu_config, tiny_model, toy_pairs, tmp_path):
    """Stop after the step-2 checkpoint, resume=latest under FSDP: bit-identical to the
    uninterrupted FSDP run (checkpoints hold the gathered weights and optimizer state, and each
    rank's generators and stream position)."""
    out = tmp_path / "fsdp_resumed"
    keys = ("lora.rank=0", "batch_size=1", "data_opts.per_sample_draws=true", "checkpoint_every=2")
    fsdp_launch(fsdp_cpu_config, 29543, *_args(tiny_model("sd3"), toy_pairs, out, *keys, steps=2))
    fsdp_launch(fsdp_cpu_config, 29543, *_args(tiny_model("sd3"), toy_pairs, out, *keys, "resume=latest"))
    a, b = denoiser_weights(full_ft_fsdp), denoiser_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "step_seconds"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(full_ft_fsdp / "metrics.jsonl") == strip(out / "metrics.jsonl")


@pytest.mark.slow
def test_fsdp_lora_dpo_with_reference_pass(fsdp_cpu_config, tiny_model, toy_pairs, tmp_path):
    """LoRA under FSDP: the LoRA and base weights sharded; DPO's reference is the same sharded
    network with its adapters disabled (run under no_grad: FSDP cannot reuse buffers made in
    inference mode); the result equals one process x batch_size 2."""
    model = tiny_model("sd3")
    out, one = tmp_path / "fsdp_lora", tmp_path / "lora_1x2"
    fsdp_launch(fsdp_cpu_config, 29544, *_args(model, toy_pairs, out, "batch_size=1", "data_opts.per_sample_draws=true"))
    one_process(*_args(model, toy_pairs, one, "batch_size=2", "data_opts.per_sample_draws=true"))
    state = json.loads((out / "final_state.json").read_text())
    assert state["distributed_type"] == "FSDP" and state["sharded_parameters"] == state["parameters"], state
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ref_mse_w"] == rows[0]["mse_w"]  # LoRA B starts at zero: policy == reference
    assert rows[-1]["ref_mse_w"] != rows[-1]["mse_w"]  # ... and the reference kept its adapters off
    assert_moved(lora_weights(one), None)
    assert_same_training(lora_weights(one), lora_weights(out))


@pytest.mark.slow
def test_fsdp_unet_full_finetune(fsdp_cpu_config, tiny_model, toy_pairs, tmp_path):
    """SD1.5's UNet under FSDP: accelerate wraps the classes in UNet2DConditionModel's
    _no_split_modules (no fsdp_transformer_layer_cls_to_wrap needed); the saved UNet loads."""
    out = tmp_path / "fsdp_unet"
    fsdp_launch(fsdp_cpu_config, 29545, *_args(tiny_model("sd15"), toy_pairs, out, "lora.rank=0", "batch_size=1", steps=2))
    state = json.loads((out / "final_state.json").read_text())
    assert state["distributed_type"] == "FSDP" and state["sharded_parameters"] == state["parameters"], state
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= set(state["fsdp_units"]), state
    init, trained = denoiser_weights(Path(tiny_model("sd15"))), denoiser_weights(out)
    assert init.keys() == trained.keys() and any(not torch.equal(init[k], trained[k]) for k in init)


@pytest.mark.slow
def test_fsdp_config_on_cpu_says_it_runs_data_parallel(fsdp_cpu_config, tiny_model, toy_pairs, tmp_path):
    """Without the launcher, accelerate runs an FSDP config with use_cpu as MULTI_CPU (DDP): the
    run warns, and final_state.json records what ran."""
    out = tmp_path / "not_fsdp"
    proc = fsdp_launch(fsdp_cpu_config, 29546, *_args(tiny_model("sd3"), toy_pairs, out, "lora.rank=0", "batch_size=1",
                                                      steps=1), shim=False)
    assert "asks for FSDP, but accelerate runs MULTI_CPU" in proc.stderr
    state = json.loads((out / "final_state.json").read_text())
    assert state["distributed_type"] == "MULTI_CPU" and "sharded_parameters" not in state, state
    assert "There are modules in" not in proc.stderr + proc.stdout  # diffusers' empty-list fp32 notice is filtered


# ------------------------------------------------------------------------------ the stream's dealing
@pytest.mark.parametrize("keyed", [True, False])
def test_dealt_stream_matches_one_process_across_epochs(toy_pairs, keyed):
    """The data half of (1), without a model: with per_sample_draws the k-th examples of 2 ranks are
    examples 2k and 2k+1 of the one-process stream (same pixels, caption and seed), across an epoch
    end that does not divide by 2 (45 rows). Without it each rank draws flips from its own generator
    and restarts every epoch at its own shard: the streams differ."""
    from itertools import islice

    from diffalign.data.pickapic import PreferencePairStream, load_preference_dataset
    from diffalign.data.variants import VariantDataOptions

    opts = VariantDataOptions(resolution=16, drop_ties=False, max_samples=45, per_sample_draws=keyed)
    ds = load_preference_dataset(toy_pairs, opts)
    def take(rank: int, world: int, n: int) -> list[dict]:
        return list(islice(iter(PreferencePairStream(ds, opts, seed=3, rank=rank, world_size=world)), n))

    one = take(0, 1, 60)
    r0, r1 = take(0, 2, 30), take(1, 2, 30)
    two = [e for pair in zip(r0, r1) for e in pair]
    same = [a["caption"] == b["caption"] and torch.equal(a["pixels_w"], b["pixels_w"])
            and a.get("sample_seed") == b.get("sample_seed") for a, b in zip(one, two)]
    if keyed:
        assert all(same)
        assert len({e["sample_seed"] for e in one}) == 60  # a new seed for a row's second epoch too
    else:
        assert not all(same)


def test_checkpoint_of_another_layout_is_refused():
    """A sharded (FSDP) checkpoint holds name-keyed optimizer state: it resumes only under FSDP,
    and an unsharded one only without it; said before anything is loaded."""
    from diffalign.trainers.checkpoint import CheckpointError, restore

    module = torch.nn.Linear(2, 2)
    state = {"trainer": {"step": 2, "sharded": True}, "params": {k: v.detach().clone() for k, v in module.named_parameters()},
             "optimizer": {}, "scheduler": {}, "ranks": []}
    with pytest.raises(CheckpointError, match="sharded .FSDP. run, this run is not"):
        restore(state, None, module, None, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_fsdp_online_trainers_run_sharded(fsdp_cpu_config, tiny_model, tmp_path, method):
    """The online loop under FSDP: the trained parameters it clips, updates and checkpoints are the
    sharded ones taken after ``prepare`` (the pre-prepare list made clipping fail on mixed
    Tensor/DTensor), for both strategies; the LoRA weights move and ranks end identical."""
    out = tmp_path / f"fsdp_{method}"
    fsdp_launch(fsdp_cpu_config, 29547 if method == "grpo" else 29548,
                "train", str(ROOT / f"diffalign/configs/tiny/{method}.yaml"), f"model={tiny_model('sd3')}",
                f"output_dir={out}", "max_steps=2", "eval.every=-1")
    state = json.loads((out / "final_state.json").read_text())
    assert state["distributed_type"] == "FSDP" and state["sharded_parameters"] == state["parameters"], state
    assert state["ranks_identical"], state
    weights = lora_weights(out)
    assert any(_is_lora_b(k) and v.abs().max() > 0 for k, v in weights.items())  # B starts at zero: it trained
