"""Run-directory safety: one writer per ``output_dir``, no mixing of two runs, clean Ctrl-C.

What a training run does with its ``output_dir`` (main process only):

1. **Lock** (:func:`acquire_lock`): ``output_dir/.lock`` is created with ``O_EXCL`` and holds
   ``pid`` and host. A second writer gets one error naming the holder's pid. A lock whose pid is
   dead (a run killed with SIGKILL) is taken over with a warning.
2. **Guard** (:func:`check_output_dir`): a directory holding a previous run is only reused when
   that is clearly meant. The previous run's ``config.yaml`` is compared with this run's config,
   except for :data:`MAY_DIFFER` (keys that do not change what is trained):

   - ``overwrite=true``: the previous run's files (:data:`RUN_FILES`) are removed, then a fresh run;
   - ``resume=latest`` / a checkpoint path: the configs must match (else the differing keys are named);
   - neither: a *different* config is refused; the *same* config starts over, unless the previous
     run is unfinished and has checkpoints (then ``resume=latest`` or ``overwrite=true`` must say which).

   Nothing is removed and no ``config.yaml`` is written until training actually starts
   (:func:`start_run`, called by the checkpointer after resuming), so a run that fails while
   loading leaves the directory as it found it.
3. **Ctrl-C** (:func:`run_guard`): during the training loop the first Ctrl-C lets the current step
   finish; the checkpointer then saves a checkpoint (when ``checkpoint_every > 0``) and raises
   :class:`~diffalign.errors.Interrupted` naming the step. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading

from pathlib import Path
from typing import Any, Iterator

from ..errors import Interrupted, UserError, require_dir_path
from ..files import fix_safetensors_modes, world_readable
from ..logging import warn

LOCK_NAME = ".lock"
# Everything a diffalign training run writes into output_dir: what overwrite=true removes. A full
# fine-tune also writes a diffusers pipeline (model_index.json + one folder per component, found
# from model_index.json). Files not listed here are never touched; nor is logs/ (tracker event
# files are per run, and the new run's tracker already has its files open there when this runs).
RUN_FILES = ("config.yaml", "metrics.jsonl", "final_state.json", "README.md", "pytorch_lora_weights.safetensors",
             "reward_curve.png", "model_index.json", "checkpoints")
# Their presence means the directory holds a previous run (README.md or logs/ alone do not).
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "final_state.json", "pytorch_lora_weights.safetensors",
               "model_index.json", "checkpoints")
# Config keys that may differ between a run and its resumption (or a rerun of "the same config"):
# where it is written, how long it runs, how often it checkpoints or logs, and speed-only switches
# that do not change the numbers. Every other key (model, data, method, lora, optim, loss, seed,
# batch sizes, precision...) changes what is trained, so a mismatch there is refused.
MAY_DIFFER = frozenset({
    "output_dir", "max_steps", "checkpoint_every", "checkpoints_keep", "log_every", "report_to", "resume", "overwrite",
    "model_opts.compile", "model_opts.compile_backend", "model_opts.gradient_checkpointing",
    "eval.batch_size",  # memory only: lowered to resume after an out-of-memory evaluation
})


# ------------------------------------------------------------------------------------ lock
_held: set[Path] = set()  # lock files this process holds


def _lock_owner(path: Path) -> tuple[int | None, str]:
    try:
        lines = path.read_text().split()
    except OSError:
        return None, ""
    try:
        return int(lines[0]), lines[1] if len(lines) > 1 else ""
    except (IndexError, ValueError):
        return None, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(output_dir: str | Path) -> Path:
    """Create ``output_dir/.lock`` atomically; raise :class:`UserError` if a live process holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    host = socket.gethostname()
    for _ in range(3):  # a stale lock is removed, then the O_EXCL create is retried
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, owner_host = _lock_owner(lock)
            if pid == os.getpid() and owner_host == host:
                _held.add(lock)  # left by an earlier run in this process (a library caller that did not release it)
                return lock
            if pid is None:
                # Just created by another writer that has not written its pid yet, or garbage:
                # only an old one is stale (a writer fills it right after creating it).
                import time

                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10:
                    raise UserError(f"output_dir '{out}' is in use by another diffalign run (lock {lock} is being "
                                    "created); wait for it to finish or choose another output_dir") from None
            elif owner_host != host or _pid_alive(pid):
                where = f" on host {owner_host}" if owner_host and owner_host != host else ""
                raise UserError(f"output_dir '{out}' is in use by another diffalign run (pid {pid}{where}, lock {lock}); "
                                "wait for it to finish or choose another output_dir") from None
            warn(f"{lock}: taking over a stale lock (pid {pid} is not running; it was probably killed)")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n{host}\n")
        _held.add(lock)
        return lock
    raise UserError(f"output_dir '{out}': could not take the lock {lock} (another run keeps recreating it)")


def release_lock(output_dir: str | Path) -> None:
    """Remove ``output_dir/.lock`` if this process holds it (a no-op otherwise)."""
    lock = Path(output_dir) / LOCK_NAME
    if lock not in _held:
        return
    _held.discard(lock)
    if _lock_owner(lock)[0] == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@atexit.register
def _release_all() -> None:  # a trainer called directly (not through ``train``) still unlocks on exit
    for lock in list(_held):
        release_lock(lock.parent)


# ------------------------------------------------------------------------------------ configs
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_dict(cfg) -> dict:
    """``cfg`` as ``config.yaml`` holds it (a YAML round trip, so tuples and lists compare equal)."""
    import yaml

    from ..config import to_dict

    return yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_config(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def config_diff(saved: dict, cfg) -> list[str]:
    """``["key (saved -> now)", ...]`` for every key outside :data:`MAY_DIFFER` that differs. A key
    the saved config lacks (added to diffalign since) counts as equal when it has its default."""
    now, old = _flat(config_dict(cfg)), _flat(saved)
    try:
        defaults = _flat(config_dict(type(cfg)()))
    except Exception:  # noqa: BLE001 - a config class without defaults: compare strictly
        defaults = {}
    missing = object()
    diffs = []
    for key in sorted(set(now) | set(old)):
        if key in MAY_DIFFER:
            continue
        a, b = old.get(key, missing), now.get(key, missing)
        if a is missing and key in defaults and b == defaults[key]:
            continue
        if a != b:
            show = lambda v: "unset" if v is missing else json.dumps(v) if isinstance(v, str) else str(v)  # noqa: E731
            diffs.append(f"{key} ({show(a)} -> {show(b)})")
    return diffs


def _short(diffs: list[str], n: int = 6) -> str:
    return ", ".join(diffs[:n]) + (f" and {len(diffs) - n} more" if len(diffs) > n else "")


# ------------------------------------------------------------------------------------ guard
_pending: dict[Path, dict] = {}  # output_dir -> what start_run does (decided by check_output_dir)


def _step_numbers(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-"):
            with contextlib.suppress(ValueError):
                steps.append(int(d.name.split("-")[1]))
    return sorted(steps)


def check_output_dir(cfg) -> None:
    """Decide whether this run may write into ``cfg.output_dir`` (see the module docstring).
    Raises :class:`UserError` with one line; removes nothing yet (that is :func:`start_run`)."""
    out = Path(cfg.output_dir)
    resume = getattr(cfg, "resume", None)
    overwrite = getattr(cfg, "overwrite", False)
    if resume and resume != "latest":
        path = Path(resume)
        if not path.exists():
            raise UserError(f"resume={resume!r}: the path does not exist (give a checkpoint directory such as "
                            f"{out / 'checkpoints' / 'step-000100'}, or resume=latest)")
        if not path.is_dir():
            raise UserError(f"resume={resume!r}: is a file, not a checkpoint directory")
    present = [m for m in RUN_MARKERS if (out / m).exists()]
    plan = {"clear": False, "note": None}
    _pending[out] = plan
    if not present:
        return
    saved = read_config(out / "config.yaml")
    diffs = config_diff(saved, cfg) if saved is not None else None
    if overwrite:
        plan.update(clear=True, note=f"overwrite=true: removed the previous run's files from {out}")
        return
    if resume:
        if diffs:
            raise UserError(f"resume={resume}: {out} holds a run of a different config; differing keys: {_short(diffs)}; "
                            "set them back, or use overwrite=true to start over")
        return  # a saved config that matches (or none, from an older diffalign): the checkpoints decide
    if saved is None:
        raise UserError(f"output_dir '{out}' holds files of another run ({', '.join(present)}) but no config.yaml; "
                        "use another output_dir, or overwrite=true to replace them")
    if diffs:
        raise UserError(f"output_dir '{out}' holds a run of a different config (differs in: {_short(diffs)}); "
                        "use another output_dir, or overwrite=true to replace it")
    finished = (out / "final_state.json").is_file()
    steps = _step_numbers(out)
    if not finished and steps:
        raise UserError(f"output_dir '{out}' holds an unfinished run of this config with checkpoints (latest step "
                        f"{steps[-1]}); rerun with resume=latest to continue it, or overwrite=true to start over")
    what = "finished" if finished else "unfinished"
    plan.update(clear=True, note=f"{out}: starting over; replacing a previous {what} run of the same config")


def clear_run_files(out: Path) -> None:
    """Remove what a previous diffalign run wrote (:data:`RUN_FILES` and a saved pipeline's folders)."""
    names = list(RUN_FILES)
    index = out / "model_index.json"
    if index.is_file():
        with contextlib.suppress(OSError, ValueError):
            names += [k for k, v in json.loads(index.read_text()).items() if not k.startswith("_") and isinstance(v, list)]
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def start_run(cfg, accelerator) -> None:
    """Training starts now: carry out the guard's decision and write ``config.yaml`` (main process)."""
    from ..config import save_config

    _interrupt.started = _interrupt.in_loop = True  # every rank: Ctrl-C now waits for the step's end
    if not accelerator.is_main_process:
        return
    out = Path(cfg.output_dir)
    plan = _pending.pop(out, {"clear": False, "note": None})
    if plan["clear"]:
        clear_run_files(out)
        if plan["note"]:
            print(plan["note"], file=sys.stderr)
    save_config(cfg, out / "config.yaml")


def prepare_output_dir(cfg, accelerator) -> None:
    """Lock and guard ``cfg.output_dir`` on the main process; every rank raises the same error."""
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            acquire_lock(cfg.output_dir)
            check_output_dir(cfg)
        except UserError as e:
            release_lock(cfg.output_dir)
            error = e
    if accelerator.num_processes > 1:  # the other ranks would otherwise wait forever in a collective
        from accelerate.utils import broadcast_object_list

        box = [str(error) if error is not None else None]
        broadcast_object_list(box)
        if box[0] is not None and error is None:
            error = UserError(box[0])
    if error is not None:
        raise error


def check_output_path(output_dir: str | Path) -> None:
    require_dir_path(output_dir, "output_dir")


# ------------------------------------------------------------------------------------ Ctrl-C
class _InterruptState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requested = False  # Ctrl-C seen; stop after the current step
        self.started = False  # training started (start_run); before that nothing is worth resuming
        self.in_loop = False  # inside the training loop (before it, Ctrl-C stops at once)
        self.step = 0  # last completed optimizer step
        self.checkpoint_step: int | None = None  # last checkpoint saved in this run


_interrupt = _InterruptState()


def interrupt_requested() -> bool:
    return _interrupt.requested


def step_done(step: int, saved_checkpoint: bool, max_steps: int) -> None:
    _interrupt.step = step
    if saved_checkpoint:
        _interrupt.checkpoint_step = step
    if step >= max_steps:
        _interrupt.in_loop = False  # saving the final weights: Ctrl-C now stops at once


@contextlib.contextmanager
def run_guard(cfg) -> Iterator[None]:
    """Around one training run: deferred Ctrl-C, the lock released however the run ends."""
    _interrupt.reset()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # started with SIGINT ignored (nohup, background): keep it so
            previous = None
        else:
            def on_sigint(signum, frame):
                if not _interrupt.in_loop or _interrupt.requested:
                    raise KeyboardInterrupt
                _interrupt.requested = True
                print(f"\nCtrl-C: stopping after step {_interrupt.step + 1} (press Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)

            signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        # Stopped in the middle of a step (a second Ctrl-C): its state is half-updated, so no
        # checkpoint of it; the last one saved (this run's or a resumed run's) is where to go on from.
        if not _interrupt.started:
            raise Interrupted("interrupted before training started (nothing was written)") from None
        ckpts = _step_numbers(Path(cfg.output_dir))
        last = _interrupt.checkpoint_step if _interrupt.checkpoint_step is not None else (ckpts[-1] if ckpts else None)
        tail = (f"; rerun with resume=latest to continue from the checkpoint of step {last}" if last is not None
                else " (no checkpoint to resume from; checkpoint_every=N saves them)")
        raise Interrupted(f"interrupted at step {_interrupt.step}{tail}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        _interrupt.reset()
        release_lock(cfg.output_dir)
        _pending.pop(Path(cfg.output_dir), None)


def interrupted_error(step: int, checkpoint: Path | None) -> Interrupted:
    if checkpoint is not None:
        return Interrupted(f"interrupted at step {step}; checkpoint saved to {checkpoint}; "
                           "rerun with resume=latest to continue")
    return Interrupted(f"interrupted at step {step} (checkpoint_every=0: no checkpoint saved, a rerun starts over)")


# ------------------------------------------------------------------------------------ files


__all__ = ["acquire_lock", "release_lock", "check_output_dir", "start_run", "prepare_output_dir", "run_guard",
           "config_diff", "world_readable", "fix_safetensors_modes"]
