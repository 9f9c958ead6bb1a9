"""Composition and explicit normalisation of rewards.

* :class:`WeightedSum` -- ``score = sum_i w_i * s_i``; ``details`` keeps every component's own
  score (unweighted) and its details (prefixed ``component.``).
* :class:`Affine` -- ``score = scale * s + offset``: put rewards with different units on a
  common scale deliberately, instead of hiding constants inside scorers.
* :class:`RunningZScore` -- ``score = (s - mean) / (std + eps)`` with running statistics over
  all scores seen (Welford's algorithm; or an exponential moving average with ``momentum``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Reward, RewardOutput, to_image_tensor


class _Wrapper(Reward):
    def __init__(self, inner: Reward, name: str | None):
        super().__init__(batch_size=inner.batch_size, device=inner.device)
        self.inner = inner
        self.name = name or inner.name
        self.higher_is_better = inner.higher_is_better
        self.needs_prompt = inner.needs_prompt
        self.differentiable = inner.differentiable
        self.units = inner.units


class WeightedSum(Reward):
    """Weighted sum of rewards. ``components``: ``[(reward, weight), ...]`` or ``{reward: weight}``.

    A component with ``higher_is_better = False`` should get a negative weight; the sum is
    always "higher is better".
    """

    def __init__(self, components: Sequence[tuple[Reward, float]] | Mapping[Reward, float], *, name: str = "weighted_sum"):
        items = list(components.items()) if isinstance(components, Mapping) else list(components)
        if not items:
            raise ValueError("WeightedSum needs at least one component")
        super().__init__(batch_size=max(r.batch_size for r, _ in items), device=items[0][0].device)
        self.components = [(r, float(w)) for r, w in items]
        self.name = name
        self.needs_prompt = any(r.needs_prompt for r, _ in items)
        self.differentiable = all(r.differentiable for r, _ in items)
        self.units = " + ".join(f"{w:g}*{r.name}" for r, w in self.components)
        self._keys = unique_names([r.name for r, _ in self.components])

    def __call__(self, images: Any, prompts=None, metadata=None) -> RewardOutput:
        images = to_image_tensor(images)  # once, not once per component
        total = None
        details: dict[str, torch.Tensor] = {}
        for (reward, weight), key in zip(self.components, self._keys):
            out = reward(images, prompts, metadata)
            scores = out.scores
            if total is not None:
                scores = scores.to(total.device)
            total = weight * scores if total is None else total + weight * scores
            details[key] = out.scores
            for k, v in out.details.items():
                if k != reward.name:
                    details[f"{key}.{k}"] = v
        return RewardOutput(total, details)


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def _wrapped_details(name: str, scores: torch.Tensor, inner: Reward, out: RewardOutput) -> dict[str, torch.Tensor]:
    inner_key = inner.name if inner.name != name else f"{inner.name}_raw"
    details = {name: scores, inner_key: out.scores}
    details.update({f"{inner.name}.{k}": v for k, v in out.details.items() if k != inner.name})
    return details


class Affine(_Wrapper):
    """``score = scale * inner + offset``; ``details`` keeps the inner score under its name."""

    def __init__(self, inner: Reward, scale: float = 1.0, offset: float = 0.0, *, name: str | None = None):
        super().__init__(inner, name or f"{inner.name}_affine")
        self.scale = float(scale)
        self.offset = float(offset)
        if self.scale < 0:
            self.higher_is_better = not inner.higher_is_better

    @classmethod
    def from_range(cls, inner: Reward, low: float, high: float, **kw) -> Affine:
        """Map ``[low, high]`` of the inner reward to ``[0, 1]``."""
        if high == low:
            raise ValueError("from_range needs high != low")
        return cls(inner, 1.0 / (high - low), -low / (high - low), **kw)

    def __call__(self, images, prompts=None, metadata=None) -> RewardOutput:
        out = self.inner(images, prompts, metadata)
        s = self.scale * out.scores + self.offset
        return RewardOutput(s, _wrapped_details(self.name, s, self.inner, out))


class RunningZScore(_Wrapper):
    """``score = (inner - mean) / (std + eps)`` with running statistics.

    ``momentum=None``: exact running mean/variance of every score seen (Welford);
    ``momentum=m``: exponential moving averages ``stat <- (1-m) stat + m batch_stat``.
    Statistics are updated with each batch *before* normalising it (so a first batch is
    standardised by its own statistics) unless :meth:`freeze` was called. With fewer than two
    scores seen, ``std`` is taken as 1.
    """

    def __init__(self, inner: Reward, *, momentum: float | None = None, eps: float = 1e-6, name: str | None = None):
        super().__init__(inner, name or f"{inner.name}_z")
        self.momentum = momentum
        self.eps = float(eps)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # Welford sum of squared deviations (or EMA variance when momentum is set)
        self.frozen = False
        self._lock = threading.Lock()

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        var = self.m2 if self.momentum is not None else self.m2 / (self.count - 1)
        return math.sqrt(max(var, 0.0))

    def update(self, scores: torch.Tensor) -> None:
        x = scores.detach().double().cpu()
        n = int(x.numel())
        if n == 0:
            return
        with self._lock:
            if self.momentum is None or self.count == 0:
                b_mean = float(x.mean())
                b_m2 = float(((x - b_mean) ** 2).sum())
                if self.momentum is not None:  # initialise the EMA from the first batch
                    self.mean, self.m2 = b_mean, (b_m2 / (n - 1) if n > 1 else 0.0)
                    self.count = n
                    return
                total = self.count + n
                delta = b_mean - self.mean
                self.mean += delta * n / total
                self.m2 += b_m2 + delta**2 * self.count * n / total
                self.count = total
            else:
                m = self.momentum
                b_var = float(x.var(unbiased=True)) if n > 1 else 0.0
                self.mean = (1 - m) * self.mean + m * float(x.mean())
                self.m2 = (1 - m) * self.m2 + m * b_var
                self.count += n

    def freeze(self) -> RunningZScore:
        self.frozen = True
        return self

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

    def __call__(self, images, prompts=None, metadata=None) -> RewardOutput:
        out = self.inner(images, prompts, metadata)
        if not self.frozen:
            self.update(out.scores)
        s = (out.scores - self.mean) / (self.std + self.eps)
        return RewardOutput(s, _wrapped_details(self.name, s, self.inner, out))
