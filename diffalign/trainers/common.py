"""Plumbing every trainer shares: accelerate, the trainable model, optimiser, logging, outputs.

The trainers (``pair.py``, ``online.py``) stay short, linear loops over these pieces.
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
from ..logging import FP32_MODULES_NOTICE, info, library_call, warn
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
    sharding_not_honoured_warning(accelerator)
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


def sharding_not_honoured_warning(accelerator) -> str | None:
    """Say so (on the main process) when ``accelerate launch`` was given an FSDP or DeepSpeed
    config that accelerate did not apply: accelerate 1.16 takes them only on GPUs and other
    accelerators, and on CPU (``use_cpu: true``, or no GPU) it runs plain data parallelism
    (MULTI_CPU), every process holding the whole model and optimizer. Returns the warning, or None."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    for env, wanted in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env, "false").lower() == "true" and kind != wanted:
            message = (f"the accelerate config asks for {wanted}, but accelerate runs {kind}: it shards only on "
                       "GPUs (and other accelerators); every process holds the whole model")
            if accelerator.is_main_process:
                warn(message)
            return message
    return None


def run_plan_line(cfg, accelerator) -> str:
    """The defaults that cost time, said before any model loads: steps, resolution (and which key
    sets it), device, processes, precision and torch threads."""
    res_key = next((k for k in ("data_opts", "sampler") if hasattr(getattr(cfg, k, None), "resolution")), None)
    res = getattr(getattr(cfg, res_key), "resolution") if res_key else None
    where = f"{res} px ({res_key}.resolution)" if res_key else "the model's resolution"
    return (f"{cfg.method}: {cfg.max_steps} steps at {where}, device {accelerator.device}, "
            f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
            f"{torch.get_num_threads()} torch thread(s) -> {cfg.output_dir}")


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of a ``mixed_precision`` name: ``fp16``, ``bf16``, else (``no``) float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def weight_dtype_for(accelerator) -> torch.dtype:
    return precision_dtype(accelerator.mixed_precision)


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
            reference = copy.deepcopy(net).requires_grad_(False).eval()
            with library_call(FP32_MODULES_NOTICE):  # diffusers warns on any .to(dtype=...), even a no-op
                reference.to(dtype=dtype)
    if cfg.model_opts.channels_last and not adapter.is_flow:
        net.to(memory_format=torch.channels_last)
    if cfg.model_opts.compile:
        # nn.Module.compile keeps the module object, so LoRA toggling and saving work unchanged.
        net.compile(backend=cfg.model_opts.compile_backend)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    return adapter, params, reference


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that train, in module order. After ``accelerator.prepare``
    under FSDP these are the sharded ones (DTensors), not those :func:`build_trainable` returned."""
    return [p for p in module.parameters() if p.requires_grad]


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
    """SHA-256 over the (trainable) parameters' bytes: equal across ranks iff weights are equal.
    Sharded (FSDP) parameters are all-gathered first (so every rank must call it)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if trainable_only and not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(full_tensor(p.detach()).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ sharding (FSDP)
# accelerate's FSDP2 (``accelerate/fsdp.yaml``) shards the prepared denoiser in place: its class
# becomes ``FSDP<Class>`` and every parameter a DTensor holding this rank's slice. The trainers'
# state (trainable parameters, EMA, checkpoints, the saved model) goes through these helpers, which
# are the identity on unsharded modules.
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return None
    return DTensor


def is_sharded_tensor(t) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is sharded (a DTensor: FSDP2)."""
    return any(is_sharded_tensor(p) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered (a collective: every rank calls it, in the same
    order), anything else as it is."""
    return t.full_tensor() if is_sharded_tensor(t) else t


def shard_like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` (the whole tensor, the same on every rank) laid out as ``target``: this rank's
    slice as a DTensor when ``target`` is one (no communication), else ``full`` on its device."""
    full = full.to(target.device, target.dtype)
    if not is_sharded_tensor(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


def sharding_summary(accelerator, module: torch.nn.Module) -> dict:
    """What ``accelerator.prepare`` made of the denoiser: the distributed type, and under FSDP the
    sharded parameter count and the FSDP units by class (the modules ``fully_shard`` wrapped:
    accelerate's TRANSFORMER_BASED_WRAP takes the classes in the model's ``_no_split_modules``)."""
    out: dict[str, Any] = {"distributed_type": str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))}
    params = list(module.parameters())
    n_sharded = sum(is_sharded_tensor(p) for p in params)
    if n_sharded:
        from torch.distributed.fsdp import FSDPModule

        units: dict[str, int] = {}
        for name, m in module.named_modules():
            if isinstance(m, FSDPModule):
                cls = "(root) " + _plain_class(m).__name__ if name == "" else _plain_class(m).__name__
                units[cls] = units.get(cls, 0) + 1
        out.update({"sharded_parameters": n_sharded, "parameters": len(params), "fsdp_units": units})
    return out


def sharding_line(summary: dict, num_processes: int) -> str | None:
    """One console line for a sharded run (None when nothing is sharded)."""
    if not summary.get("sharded_parameters"):
        return None
    units = ", ".join(f"{k} x{v}" for k, v in summary["fsdp_units"].items())
    return (f"{summary['distributed_type']}: {summary['sharded_parameters']} of {summary['parameters']} denoiser "
            f"parameters sharded over {num_processes} processes; FSDP units: {units}")


def _plain_class(module: torch.nn.Module) -> type:
    """The module's own class (``fully_shard`` swaps in a subclass ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gathered_copy(accelerator, module: torch.nn.Module) -> torch.nn.Module | None:
    """``module`` with its whole weights, for saving: an unsharded module as it is; a sharded one
    (every rank calls this: it gathers) becomes, on the main process, a plain copy of its class
    built on the meta device and given the full state dict gathered to that process's CPU (LoRA
    adapters re-added from its ``peft_config``); None on the other processes."""
    if not is_sharded(module):
        return module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        plain = _plain_class(module).from_config(module.config)
        for name, config in (getattr(module, "peft_config", None) or {}).items():
            plain.add_adapter(copy.deepcopy(config), adapter_name=name)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def save_final(cfg, accelerator, adapter: DiffusionAdapter, net, final_metrics: dict, method_name: str) -> dict:
    """Save weights diffusers loads unchanged, a model card, and a per-rank weight check.
    ``final_state.json`` also says how the denoiser was distributed (:func:`sharding_summary`);
    under FSDP the fingerprints are of the all-gathered weights and the saved ones are gathered."""
    unwrapped = accelerator.unwrap_model(net)
    fingerprint = params_fingerprint(unwrapped)
    if accelerator.num_processes > 1:
        fingerprints = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(fingerprints, fingerprint)
    else:
        fingerprints = [fingerprint]
    info = {"ranks": accelerator.num_processes, "param_fingerprints": fingerprints,
            "ranks_identical": len(set(fingerprints)) == 1, **sharding_summary(accelerator, unwrapped)}
    whole = gathered_copy(accelerator, unwrapped)  # the module itself unless sharded
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        if cfg.lora.rank > 0:
            adapter.save_lora(str(out), whole)
            weights = "pytorch_lora_weights.safetensors"
        else:
            adapter.denoiser = whole
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
