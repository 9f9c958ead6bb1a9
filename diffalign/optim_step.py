"""The guarded optimizer step every training loop uses: one policy for NaN/inf.

* A non-finite loss (on any process) is not backpropagated, and the optimizer step it belongs to
  is skipped (counted as skipped).
* A non-finite gradient norm (after clipping's unscale) skips the optimizer step.
* Skipped or not, the gradients are zeroed afterwards. With an fp16 ``GradScaler`` an overflowing
  gradient also lowers the loss scale (as ``GradScaler.step`` would), so fp16 runs recover.

The decision is the same on every process: the loss check is all-reduced before backward (so
DDP ranks never disagree about running the gradient all-reduce), and the gradient norm is
computed from the synchronised gradients.

Gradient accumulation works as with ``accelerator.accumulate``: call :func:`guarded_step` once
per micro-batch; gradients are clipped and checked only when ``accelerator.sync_gradients``,
and ``optimizer.step()`` / ``zero_grad()`` are the accelerate wrappers, which act only then.
A loop that runs several micro-batches itself before one step (GRPO) passes a callable that runs
them with :func:`guarded_backward` and returns whether all of them were finite.

Loops without accelerate (reward-model training) pass a :class:`SingleProcess`, which stands in
for the accelerator on one device, with an optional fp16 ``GradScaler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch


class StepResult(NamedTuple):
    skipped: bool  # the optimizer step did not run (non-finite loss or gradient norm)
    grad_norm: float | None  # total gradient norm before clipping; None when not computed


def all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every process (one all-reduce when there are several)."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if getattr(accelerator, "num_processes", 1) > 1:
        ok = accelerator.reduce(ok.to(accelerator.device), reduction="mean")
    return float(ok.item()) == 1.0


def guarded_backward(accelerator, loss: torch.Tensor, scale: float = 1.0) -> bool:
    """Backpropagate ``loss * scale`` if the loss is finite on every process; returns that."""
    finite = all_finite(accelerator, loss)
    if finite:
        accelerator.backward(loss * scale if scale != 1.0 else loss)
    return finite


def guarded_step(
    accelerator,
    loss: torch.Tensor | Callable[[], bool],
    params: Iterable[torch.nn.Parameter],
    optimizer,
    scheduler=None,
    max_grad_norm: float | None = None,
) -> StepResult:
    """Backward (guarded), clip, and step ``optimizer`` (and ``scheduler``) unless something is
    non-finite. ``loss``: a scalar tensor, or a callable that runs its own backward passes with
    :func:`guarded_backward` and returns whether every loss was finite. ``max_grad_norm``:
    clip to this norm; None or <= 0 measures the norm without clipping."""
    finite = bool(loss()) if callable(loss) else guarded_backward(accelerator, loss)
    grad_norm = None
    if finite and accelerator.sync_gradients:
        limit = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else math.inf
        norm = accelerator.clip_grad_norm_(params, limit)
        if norm is not None:
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
            scaler = getattr(accelerator, "scaler", None)
            if not finite and scaler is not None:
                scaler.update()  # fp16: lower the loss scale, as GradScaler.step would on an overflow
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(not finite, grad_norm)


class SingleProcess:
    """What :func:`guarded_step` needs of an ``accelerate.Accelerator``, for a loop on one device
    with plain torch; ``scaler``: a ``torch.amp.GradScaler`` (fp16), or None. Pass
    :attr:`optimizer` (the scaler-aware wrapper) to :func:`guarded_step`."""

    num_processes = 1
    process_index = 0
    sync_gradients = True

    def __init__(self, optimizer: torch.optim.Optimizer, scaler=None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.optimizer = _ScaledOptimizer(optimizer, self.scaler) if self.scaler is not None else optimizer

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer.optimizer)
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


class _ScaledOptimizer:
    """An optimizer whose ``step`` goes through a GradScaler (step, then update the scale)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def count_nonfinite(in_a_row: int, skipped: bool, limit: int, what: str, hint: str) -> int:
    """The abort half of the NaN policy: the number of skipped steps in a row after this one
    (0 after a step that ran); raises ``FloatingPointError`` once it reaches ``limit``, naming
    ``what`` was skipped and ``hint`` (the likely causes in that loop)."""
    in_a_row = in_a_row + 1 if skipped else 0
    if in_a_row >= limit:
        raise FloatingPointError(f"{in_a_row} {what} in a row had a NaN/inf loss or gradient; {hint}")
    return in_a_row
