"""Config of the EMA of the trained parameters (``ema:`` block of the GRPO and pair trainers)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check


@dataclass
class EMAOptions:
    """EMA of the trained parameters (:mod:`diffalign.trainers.ema`): evaluation and the saved weights use it."""

    # keep an EMA (flow_grpo's train_sd3.py keeps one)
    enabled: bool = False
    # decay per EMA update (flow_grpo: 0.9)
    decay: float = 0.9
    # one EMA update every this many optimizer updates (flow_grpo: 8)
    update_every: int = 8
    # flow_grpo's ramp: update n (0-based) uses min((1 + n) / (10 + n), decay); false: always decay
    warmup: bool = True


def validate_ema(e: EMAOptions) -> None:
    check(0 <= e.decay < 1, "ema.decay", "must be in [0, 1)")
    check(e.update_every >= 1, "ema.update_every", "must be >= 1")
