"""Plumbing every trainer shares: accelerate, the trainable model, optimiser, logging, outputs.

The trainers (``pair.py``, ``grpo.py``) stay short, linear loops over these pieces.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..files import fix_safetensors_modes
from ..logging import info
from ..models import DiffusionAdapter, load_adapter
from .rundir import check_output_path, prepare_output_dir


# ------------------------------------------------------------------------------------ setup
def setup_accelerator(cfg):
    """An ``Accelerator`` on GPU if there is one, else CPU (``torchrun`` gives multi-process).

    Also locks ``output_dir`` and checks it may be written (:mod:`.rundir`), before any model is
    loaded. ``config.yaml`` is written later, when training starts (:func:`.rundir.start_run`).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    check_output_path(cfg.output_dir)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "logs")),
    )
    # Same seed on every rank: model init (e.g. LoRA A matrices) must agree across ranks.
    set_seed(cfg.seed)
    if torch.cuda.is_available() and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prepare_output_dir(cfg, accelerator)
    if accelerator.is_main_process:
        info(run_plan_line(cfg, accelerator))
        if log_with:
            accelerator.init_trackers("diffalign", config=_flat(asdict(cfg)))
    return accelerator


def run_plan_line(cfg, accelerator) -> str:
    """The defaults that cost time, said before any model loads: steps, resolution (and which key
    sets it), device, processes, precision and torch threads."""
    res_key = next((k for k in ("data_opts", "sampler") if hasattr(getattr(cfg, k, None), "resolution")), None)
    res = getattr(getattr(cfg, res_key), "resolution") if res_key else None
    where = f"{res} px ({res_key}.resolution)" if res_key else "the model's resolution"
    return (f"{cfg.method}: {cfg.max_steps} steps at {where}, device {accelerator.device}, "
            f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
            f"{torch.get_num_threads()} torch thread(s) -> {cfg.output_dir}")


def weight_dtype_for(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def rank_generator(seed: int, accelerator, device=None) -> torch.Generator:
    """A generator for noise/timesteps that differs per rank (ranks must not draw the same noise)."""
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(seed * 100_003 + accelerator.process_index)
    return g


def build_trainable(cfg, accelerator, encoders: bool = True) -> tuple[DiffusionAdapter, list[torch.nn.Parameter], torch.nn.Module | None]:
    """Load the adapter; add LoRA (``lora.rank > 0``) or unfreeze everything (full fine-tuning).
    ``encoders=False``: without the VAE and text encoders (training from the latent cache).

    Returns ``(adapter, trainable_params, frozen_reference)``. With LoRA the reference is the
    same network with adapters disabled, so ``frozen_reference`` is None; full fine-tuning gets
    a frozen copy (only when ``needs_reference``).
    """
    dtype = weight_dtype_for(accelerator)
    use_lora = cfg.lora.rank > 0
    adapter = load_adapter(cfg.model, cfg.model_opts, dtype=dtype if use_lora else torch.float32, device=accelerator.device,
                           encoders=encoders)
    adapter.cast_frozen(dtype)  # casts only what is not in dtype yet (a no-op cast still warns)
    net = adapter.denoiser
    if cfg.model_opts.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    reference = None
    if use_lora:
        net.requires_grad_(False)
        adapter.add_lora(cfg.lora)
        # Trainable LoRA weights in fp32 even when the base runs in bf16/fp16.
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        net.requires_grad_(True)
        if getattr(cfg, "needs_reference", True):
            reference = copy.deepcopy(net).requires_grad_(False).eval().to(dtype=dtype)
    if cfg.model_opts.channels_last and not adapter.is_flow:
        net.to(memory_format=torch.channels_last)
    if cfg.model_opts.compile:
        # nn.Module.compile keeps the module object, so LoRA toggling and saving work unchanged.
        net.compile(backend=cfg.model_opts.compile_backend)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    return adapter, params, reference


def make_optimizer(cfg, params, accelerator):
    o = cfg.optim
    lr = o.learning_rate
    if o.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    opt_cls = torch.optim.AdamW
    extra = {}
    # One fused kernel for the whole update on GPUs. CPUs keep the default (foreach) kernel:
    # the update of LoRA weights is a sliver of a CPU step, and CPU runs (tests, the testbed)
    # keep their numbers.
    if all(p.is_cuda for p in params):
        extra["fused"] = True
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            from ..errors import UserError

            raise UserError("optim.use_8bit_adam=true needs bitsandbytes (pip install 'diffalign[bnb]'), or set it false") from None
        opt_cls, extra = bnb.optim.AdamW8bit, {}
    optimizer = opt_cls(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon, **extra)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(
        o.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=o.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
    )
    return optimizer, scheduler


# ------------------------------------------------------------------------------------ logging
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class MetricsLogger:
    """``metrics.jsonl``: one JSON object per optimizer step (main process only), plus trackers."""

    def __init__(self, accelerator, output_dir: str, resume: bool = False) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process and not resume:
            self.path.write_text("")
        # a resumed run starts from the checkpoint's metrics: one resumed at max_steps trains no step
        # and still reports where it ended
        self.last: dict[str, Any] = last_metrics(self.path) if resume else {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/inf
            row[k] = v
        self.last = row
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)


def last_metrics(path: Path) -> dict[str, Any]:
    """The last row of a ``metrics.jsonl`` (``{}`` when there is none)."""
    if not path.is_file():
        return {}
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(rows[-1]) if rows else {}


def mean_across_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for all keys)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def sum_across_processes(accelerator, counts: dict[str, int]) -> dict[str, int]:
    if accelerator.num_processes == 1:
        return dict(counts)
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for c in gathered:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


# ------------------------------------------------------------------------------------ outputs
def params_fingerprint(module: torch.nn.Module, trainable_only: bool = True) -> str:
    """SHA-256 over the (trainable) parameters' bytes: equal across ranks iff weights are equal."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if trainable_only and not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_final(cfg, accelerator, adapter: DiffusionAdapter, net, final_metrics: dict, method_name: str) -> dict:
    """Save weights diffusers loads unchanged, a model card, and a per-rank weight check."""
    unwrapped = accelerator.unwrap_model(net)
    fingerprint = params_fingerprint(unwrapped)
    if accelerator.num_processes > 1:
        fingerprints = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(fingerprints, fingerprint)
    else:
        fingerprints = [fingerprint]
    info = {"ranks": accelerator.num_processes, "param_fingerprints": fingerprints,
            "ranks_identical": len(set(fingerprints)) == 1}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        if cfg.lora.rank > 0:
            adapter.save_lora(str(out), unwrapped)
            weights = "pytorch_lora_weights.safetensors"
        else:
            adapter.denoiser = unwrapped
            adapter.save_full(str(out))
            weights = "a diffusers pipeline directory"
        (out / "final_state.json").write_text(json.dumps(info, indent=2))
        write_model_card(cfg, out, method_name, weights, final_metrics)
        # safetensors keeps the 0600 of its private temp file; give ours the mode of every other file
        if cfg.lora.rank > 0:
            fix_safetensors_modes(out / weights)
        else:
            index = json.loads((out / "model_index.json").read_text())
            for component in (k for k, v in index.items() if isinstance(v, list) and (out / k).is_dir()):
                fix_safetensors_modes(out / component)
    accelerator.wait_for_everyone()
    return info


def write_model_card(cfg, out: Path, method_name: str, weights: str, final_metrics: dict) -> None:
    lora = cfg.lora.rank > 0
    hp = _flat(asdict(cfg))
    # a card read from elsewhere must name directories absolutely (a hub id stays as it is)
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    out = Path(out).resolve()
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hp.items() if k not in ("output_dir",))
    metrics = "\n".join(f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in final_metrics.items())
    load = (
        f"pipe = DiffusionPipeline.from_pretrained(\"{base}\")\npipe.load_lora_weights(\"{out}\")"
        if lora else f"pipe = DiffusionPipeline.from_pretrained(\"{out}\")"
    )
    card = f"""---
base_model: {base}
library_name: diffusers
tags:
- diffalign
- {method_name}
- {'lora' if lora else 'full-fine-tune'}
- text-to-image
---

# {method_name} fine-tune of `{base}`

Trained with [diffalign](https://github.com/diffalign/diffalign): method **{method_name}**,
{'LoRA rank ' + str(cfg.lora.rank) if lora else 'full fine-tuning'}, {cfg.max_steps} optimizer steps
on `{cfg.data}`. Weights: {weights}.

```python
from diffusers import DiffusionPipeline
{load}
```

## Final metrics

| metric | value |
| --- | --- |
{metrics}

## Hyperparameters

| key | value |
| --- | --- |
{rows}
"""
    (out / "README.md").write_text(card)
