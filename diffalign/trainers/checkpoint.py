"""Checkpoints that resume exactly, written atomically, loaded without pickle.

Layout of ``output_dir/checkpoints/step-000120/``::

    trainable.safetensors     trainable parameters (LoRA or the whole denoiser), by name
    ema.safetensors           the EMA of those parameters and its update count (runs with ema.enabled)
    optimizer.pt, scheduler.pt  state dicts (tensors and numbers only; read with weights_only=True)
    rank-00000.json/.safetensors  per-rank RNG states (python, numpy, torch, noise generator)
                              and data-stream position
    trainer.json              step and trainer counters (written by rank 0)
    config.yaml               the run's config: resume only continues a checkpoint of the same
                              config (keys in ``rundir.MAY_DIFFER`` excepted)
    COMPLETE                  written last; a directory without it is partial

Under FSDP (the denoiser's parameters are DTensors, each rank holding a slice) the checkpoint has
the same files, holding whole tensors: every rank takes part in gathering them to rank 0, which
writes them (parameters and EMA by name; the optimizer state as torch.distributed.checkpoint's
full, name-keyed state dict); ``trainer.json`` says ``"sharded": true``. At resume every rank
reads them and keeps its slices, so the run continues bit-exactly; a sharded checkpoint resumes
only under FSDP, and an unsharded one only without it. (accelerate's ``fsdp_state_dict_type``
applies to ``accelerator.save_state``, which diffalign does not use.)

A checkpoint is built in ``.tmp-step-N`` and renamed into place, so a kill during the write
leaves the previous checkpoints intact. ``resume=latest`` walks back from the newest checkpoint
to the newest one that loads, warning about each one skipped; when none loads it says so and
stops (it does not silently start again from step 0).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import save_config
from ..errors import UserError
from ..logging import warn
from .common import full_tensor, is_sharded, shard_like
from .rundir import interrupt_requested, interrupted_error, start_run, step_done, world_readable

COMPLETE = "COMPLETE"


class CheckpointError(UserError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


# ---------------------------------------------------------------------------------- RNG state
def rng_state(generator: torch.Generator | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able part, tensor part) of every RNG the training step draws from."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        tensors["generator"] = generator.get_state()
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    if generator is not None and "generator" in tensors:
        generator.set_state(tensors["generator"])


# ---------------------------------------------------------------------------------- save
def save_checkpoint(
    accelerator, output_dir: str, step: int, module: torch.nn.Module, optimizer, scheduler,
    generator: torch.Generator | None, data_state: dict | None, trainer_state: dict, keep_last: int,
    config: Any = None, ema_state: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Collective: every rank calls it. Returns the checkpoint dir on rank 0. ``config``: the run's
    config dataclass, saved beside the weights so a resume can check it continues the same run.
    ``ema_state``: :meth:`.ema.ParameterEMA.state_dict`, saved as ``ema.safetensors``."""
    from safetensors.torch import save_file as _save_file

    def save_file(tensors, path):
        _save_file(tensors, path)
        world_readable(path)

    root = checkpoint_root(output_dir)
    tmp = root / f".tmp-step-{step:06d}"
    final = root / f"step-{step:06d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rank = accelerator.process_index
    meta, tensors = rng_state(generator)
    (tmp / f"rank-{rank:05d}.json").write_text(json.dumps({"rng": meta, "data": data_state}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rank-{rank:05d}.safetensors"))
    sharded = is_sharded(module)
    if sharded:  # FSDP: gather the whole tensors (collectives: every rank takes part); rank 0 writes them
        params = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        if ema_state is not None:
            ema_state = {k: full_tensor(v).cpu().contiguous() for k, v in ema_state.items()}
        optimizer_state = _full_optimizer_state(module, optimizer)
    if accelerator.is_main_process:
        if not sharded:
            params = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
            optimizer_state = optimizer.state_dict()
        save_file(params, str(tmp / "trainable.safetensors"))
        if ema_state is not None:
            save_file(ema_state, str(tmp / "ema.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "num_processes": accelerator.num_processes,
                                                      **({"sharded": True} if sharded else {}), **trainer_state}))
        if config is not None:
            save_config(config, tmp / "config.yaml")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem
        for old in _step_dirs(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def _full_optimizer_state(module: torch.nn.Module, optimizer) -> dict:
    """A sharded (FSDP) run's optimizer state, whole, keyed by parameter name, on rank 0's CPU
    (``{}`` elsewhere): torch.distributed.checkpoint's full state dict. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------- load
def _load_checked(path: Path, num_processes: int) -> dict[str, Any]:
    """Read everything of one checkpoint, failing loudly on anything partial, corrupt or unsafe."""
    from safetensors.torch import load_file

    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is partial (no {COMPLETE} marker)")
    trainer = json.loads((path / "trainer.json").read_text())
    if trainer.get("num_processes") != num_processes:
        raise CheckpointError(f"{path} was written by {trainer.get('num_processes')} processes, this run has {num_processes}")
    out = {
        "trainer": trainer,
        "params": load_file(str(path / "trainable.safetensors")),
        # weights_only: a pickle smuggled into a checkpoint raises here instead of running. A sharded
        # (FSDP) run's state is whole and every process reads it: memory-mapped, the processes of a
        # machine share one copy in the page cache, and each keeps only its slices.
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True,
                                mmap=bool(trainer.get("sharded"))),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
        "ranks": [],
    }
    if (path / "ema.safetensors").is_file():
        out["ema"] = load_file(str(path / "ema.safetensors"))
    for r in range(num_processes):
        meta = json.loads((path / f"rank-{r:05d}.json").read_text())
        out["ranks"].append((meta, load_file(str(path / f"rank-{r:05d}.safetensors"))))
    return out


def _check_config(path: Path, resume: str, cfg) -> None:
    """Refuse a checkpoint written by a different config, naming the keys. Checkpoints of older
    diffalign versions carry no config.yaml: then the run directory's is used, if any."""
    from .rundir import config_diff, read_config

    for source in (path / "config.yaml", path.parent.parent / "config.yaml"):
        saved = read_config(source)
        if saved is not None:
            break
    else:
        return
    diffs = config_diff(saved, cfg)
    if diffs:
        shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise CheckpointError(f"resume={resume}: checkpoint {path} was written with a different config; differing keys: "
                              f"{shown}; set them back, or use overwrite=true to start over")


def find_resumable(output_dir: str, resume: str, num_processes: int, cfg=None) -> tuple[Path, dict] | None:
    """``resume``: ``latest`` (newest loadable checkpoint, or None when there is none) or a path.
    With ``cfg``, a checkpoint of a different config is refused (:func:`_check_config`)."""
    if resume != "latest":
        path = Path(resume)
        if not path.exists():
            raise CheckpointError(f"resume={resume!r}: the path does not exist")
        try:
            state = _load_checked(path, num_processes)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"resume={resume!r} cannot be loaded: {type(e).__name__}: {e}") from None
        if cfg is not None:
            _check_config(path, resume, cfg)
        return path, state
    candidates = list(reversed(_step_dirs(checkpoint_root(output_dir))))
    failures = []
    for path in candidates:
        try:
            state = _load_checked(path, num_processes)
        except Exception as e:
            failures.append(f"{path.name}: {type(e).__name__}: {e}")
            warn(f"skipping checkpoint {path}: {type(e).__name__}: {e}; trying the previous one")
            continue
        if cfg is not None:
            _check_config(path, resume, cfg)
        return path, state
    if candidates:  # there was something to resume, and all of it is broken: do not restart from 0 quietly
        raise CheckpointError(
            f"resume=latest: none of the {len(candidates)} checkpoint(s) in {checkpoint_root(output_dir)} can be loaded "
            f"(newest first: {'; '.join(failures[:3])}); remove them to start from step 0, or use overwrite=true"
        )
    return None


def restore(state: dict, accelerator, module: torch.nn.Module, optimizer, scheduler, generator) -> dict:
    """Load a checkpoint read by :func:`find_resumable` into live objects; returns this rank's data state."""
    named = dict(module.named_parameters())
    missing = [n for n in state["params"] if n not in named]
    if missing:
        raise CheckpointError(f"checkpoint parameters not in the model (different LoRA config?): {missing[:3]}")
    # Before any copy_: a shape mismatch (lora.rank or the base model changed) would otherwise be a
    # bare "size of tensor a must match" RuntimeError halfway through loading.
    for n, t in state["params"].items():
        if tuple(t.shape) != tuple(named[n].shape):
            raise CheckpointError(
                f"checkpoint parameter {n} has shape {tuple(t.shape)}, this model's has {tuple(named[n].shape)}: "
                "the checkpoint was trained with another lora.rank or base model; set them back, or use overwrite=true"
            )
    absent = [n for n, p in named.items() if p.requires_grad and n not in state["params"]]
    if absent:
        raise CheckpointError(f"trainable parameters missing from the checkpoint (different lora.target_modules?): {absent[:3]}")
    sharded = is_sharded(module)
    if bool(state["trainer"].get("sharded")) != sharded:
        raise CheckpointError(
            "the checkpoint was written by a " + ("sharded (FSDP) run, this run is not" if not sharded else
                                                   "run without FSDP, this run shards the model (FSDP)")
            + ": resume it with the accelerate config that wrote it")
    with torch.no_grad():
        for n, t in state["params"].items():
            named[n].copy_(shard_like(t, named[n]))  # a plain copy unless FSDP shards the parameter
    if sharded:  # the whole, name-keyed state (every rank holds it): each rank keeps its slices
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, getattr(optimizer, "optimizer", optimizer), state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    meta, tensors = state["ranks"][accelerator.process_index]
    set_rng_state(meta["rng"], tensors, generator)
    return meta["data"]


def truncate_metrics(output_dir: str, step: int) -> None:
    """Drop metrics rows after ``step`` (they are recomputed after a resume)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class Checkpointer:
    """What a trainer loop calls: ``start_step, state = ckpt.resume()`` once, ``ckpt.maybe_save(step,
    state)`` after every optimizer step. ``stream`` is the data stream (``state_dict`` /
    ``load_state_dict``) when it runs in the main process, else None (then the loop fast-forwards
    ``state["batches_consumed"]`` batches itself). ``ema``: the run's :class:`.ema.ParameterEMA`
    (saved and restored with the weights), or None."""

    def __init__(self, cfg, accelerator, module, optimizer, scheduler, generator, stream=None, ema=None) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.generator, self.stream, self.ema = generator, stream, ema
        self._saved_step: int | None = None  # the step last checkpointed (save_if_due, then maybe_save)

    def resume(self) -> tuple[int, dict]:
        """(first step to run, trainer state saved with the checkpoint or {}). The trainers call it
        right before their loop, so training starts here: :func:`.rundir.start_run` clears what
        the output-dir guard decided to replace and writes ``config.yaml``."""
        start = self._resume()
        start_run(self.cfg, self.accelerator)
        return start

    def _resume(self) -> tuple[int, dict]:
        if not self.cfg.resume:
            return 1, {}
        found = find_resumable(self.cfg.output_dir, self.cfg.resume, self.accelerator.num_processes, self.cfg)
        if found is None:  # resume=latest on a fresh output_dir: start from scratch, and say so
            if self.accelerator.is_main_process:
                print(f"resume={self.cfg.resume}: no checkpoint in {Path(self.cfg.output_dir) / 'checkpoints'}; "
                      "training from step 1")
            return 1, {}
        path, state = found
        data_state = restore(state, self.accelerator, self.accelerator.unwrap_model(self.module),
                             self.optimizer, self.scheduler, self.generator)
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{path} has no ema.safetensors: it was written without ema.enabled")
            self.ema.load_state_dict({k: shard_like(v, self.ema.shadow[k]) if k in self.ema.shadow else v
                                      for k, v in state["ema"].items()})
        trainer = state["trainer"]
        if self.stream is not None and data_state and data_state.get("stream") is not None:
            self.stream.load_state_dict(data_state["stream"])
            trainer["batches_consumed"] = 0
        else:
            trainer["batches_consumed"] = (data_state or {}).get("batches_consumed", 0)
        if self.accelerator.is_main_process:
            truncate_metrics(self.cfg.output_dir, trainer["step"])
            print(f"resumed from {path} (step {trainer['step']})"
                  + (f": already at max_steps={self.cfg.max_steps}, nothing to train" if trainer["step"] >= self.cfg.max_steps else ""))
        return trainer["step"] + 1, trainer

    def save_if_due(self, step: int, trainer_state: dict, batches_consumed: int) -> bool:
        """The checkpoint of ``step`` now, if ``checkpoint_every`` makes one due, ahead of
        :meth:`maybe_save` (which then does not save it again): a trainer calls it before work that
        may fail after the step's update, such as an evaluation that runs out of memory, so the
        steps are not lost. Returns whether a checkpoint of ``step`` exists now."""
        every = self.cfg.checkpoint_every
        if bool(every) and (step % every == 0 or step == self.cfg.max_steps):
            self._save(step, trainer_state, batches_consumed)
        return self._saved_step == step

    def _save(self, step: int, trainer_state: dict, batches_consumed: int) -> None:
        if self._saved_step == step:
            return
        data_state = {"batches_consumed": batches_consumed,
                      "stream": self.stream.state_dict() if self.stream is not None else None}
        save_checkpoint(self.accelerator, self.cfg.output_dir, step, self.accelerator.unwrap_model(self.module),
                        self.optimizer, self.scheduler, self.generator, data_state, trainer_state,
                        self.cfg.checkpoints_keep, config=self.cfg,
                        ema_state=self.ema.state_dict() if self.ema is not None else None)
        self._saved_step = step

    def maybe_save(self, step: int, trainer_state: dict, batches_consumed: int) -> None:
        """After every optimizer step: a checkpoint when one is due (unless :meth:`save_if_due`
        already wrote it), and the stop after a Ctrl-C (a checkpoint of this step when
        checkpointing is on, then :class:`Interrupted`)."""
        every = self.cfg.checkpoint_every
        stop = interrupt_requested()
        if self.accelerator.num_processes > 1:  # every rank must stop at the same step (collectives)
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = self.accelerator.reduce(flag, reduction="sum").item() > 0
        due = bool(every) and (step % every == 0 or step == self.cfg.max_steps or stop)
        if due:
            self._save(step, trainer_state, batches_consumed)
        step_done(step, due, self.cfg.max_steps)
        if stop:
            raise interrupted_error(step, checkpoint_root(self.cfg.output_dir) / f"step-{step:06d}" if due else None)
