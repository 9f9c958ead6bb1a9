"""Exponential moving average of the trained parameters (LoRA or full weights).

Flow-GRPO's convention (``flow_grpo/ema.py``, ``scripts/train_sd3.py``: ``decay=0.9``,
``update_step_interval=8``): after optimizer update ``n`` (0-based), when ``(n + 1) % update_every == 0``::

    d_n = min((1 + n) / (10 + n), decay)     (warmup; without it d_n = decay)
    ema <- ema + (1 - d_n) (theta - ema)

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
                 warmup: bool = True) -> None:
        self.params = params
        self.decay, self.update_every, self.warmup = float(decay), int(update_every), bool(warmup)
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        self.updates = 0  # optimizer updates seen

    def current_decay(self, n: int) -> float:
        """Decay applied at optimizer update ``n`` (0-based)."""
        return min((1 + n) / (10 + n), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimizer update that changed the parameters."""
        n = self.updates
        self.updates += 1
        if (n + 1) % self.update_every:
            return
        rate = 1.0 - self.current_decay(n)
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
    return ParameterEMA(params, options.decay, options.update_every, options.warmup)


def ema_weights(ema: ParameterEMA | None):
    """``ema.swapped_in()``, or a no-op context without an EMA."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()
