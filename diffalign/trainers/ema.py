"""Exponential moving average of the trained parameters (LoRA or full weights).

Flow-GRPO's rule (``flow_grpo/ema.py`` ``EMAModuleWrapper.step(parameters, optimization_step)``, called by
``scripts/train_sd3.py`` with ``global_step`` after its ``global_step += 1``, ``decay=0.9``,
``update_step_interval=8``; DiffusionNFT and AWM call it the same way): after optimizer update ``u``
(1-based: the number of updates taken so far, this one included), when ``(u + 1) % update_every == 0``::

    d_u = min((1 + u) / (10 + u), decay)     (warmup; without it d_u = decay)
    ema <- ema + (1 - d_u) (theta - ema)      (``applies_per_firing`` times)

so ``update_every: 8`` fires after updates 7, 15, 23, ... and ``update_every: 1`` uses 2/11, 3/12, ...
``applies_per_firing``: flow_grpo's ``train_sd3.py`` calls its EMA once per training micro-batch (each
sample batch of its gradient-accumulation loop) with the update count, so a firing count is seen
``gradient_accumulation_steps`` times, each time applied to the same weights (2 in ``pickscore_sd3``).

The EMA is what evaluation samples with and what the final weights are (:meth:`ParameterEMA.swapped_in`
puts it into the live parameters and puts the trained values back afterwards); the raw trained
parameters keep training. Its state (the averaged tensors and the update count) is saved beside a
checkpoint's weights (:meth:`state_dict`) so a resumed run continues it exactly.
"""

from __future__ import annotations

import contextlib

import torch

UPDATES_KEY = "__updates__"


class ParameterEMA:
    """EMA of the named parameters ``params`` (name -> live parameter), fp32 copies on their device."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, update_every: int = 1,
                 warmup: bool = True, applies_per_firing: int = 1) -> None:
        self.params = params
        self.decay, self.update_every, self.warmup = float(decay), int(update_every), bool(warmup)
        self.applies_per_firing = int(applies_per_firing)
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        self.updates = 0  # optimizer updates seen

    def current_decay(self, u: int) -> float:
        """Decay applied after optimizer update ``u`` (1-based, flow_grpo's incremented ``global_step``)."""
        return min((1 + u) / (10 + u), self.decay) if self.warmup else self.decay

    def fires(self, u: int) -> bool:
        """Whether the EMA moves after optimizer update ``u`` (1-based)."""
        return (u + 1) % self.update_every == 0

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer update that changed the parameters."""
        self.updates += 1
        u = self.updates
        if not self.fires(u):
            return
        rate = 1.0 - self.current_decay(u)
        for _ in range(self.applies_per_firing):
            for name, p in self.params.items():
                s = self.shadow[name]
                s.add_(rate * (p.detach().float() - s))

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA values in the live parameters for the duration of the block; the trained ones after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors): the averages by parameter name and the update count."""
        out = {n: s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        out[UPDATES_KEY] = torch.tensor([self.updates], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = set(state) - {UPDATES_KEY}
        if names != set(self.shadow) or UPDATES_KEY not in state:
            missing = sorted(set(self.shadow) - names)[:3]
            raise ValueError(f"EMA state does not match the trained parameters (missing: {missing})")
        for n, s in self.shadow.items():
            s.copy_(state[n].to(s.device, s.dtype))
        self.updates = int(state[UPDATES_KEY][0])


def make_ema(options, module: torch.nn.Module) -> ParameterEMA | None:
    """The EMA of ``module``'s trainable parameters per ``options`` (:class:`~.grpo_config.EMAOptions`), or None."""
    if not options.enabled:
        return None
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    return ParameterEMA(params, options.decay, options.update_every, options.warmup, options.applies_per_firing)


def ema_weights(ema: ParameterEMA | None):
    """``ema.swapped_in()``, or a no-op context without an EMA."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()
