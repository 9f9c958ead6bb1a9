"""Config of the EMA of the trained parameters (``ema:`` block of the GRPO and pair trainers)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check, option


@dataclass
class EMAOptions:
    """EMA of the trained parameters (:mod:`diffalign.trainers.ema`): evaluation and the saved weights use it."""

    enabled: bool = option(False, help="keep an EMA (flow_grpo's train_sd3.py keeps one)")
    decay: float = option(0.9, help="decay per EMA update (flow_grpo: 0.9)")
    update_every: int = option(8, help=(
        "fire after optimizer update u (1-based, flow_grpo's incremented global_step) when (u + 1) % "
        "update_every == 0 (flow_grpo: 8, firing after updates 7, 15, ...; DiffusionNFT/AWM 1)"
    ))
    warmup: bool = option(True, help=(
        "flow_grpo's ramp: the firing after update u (1-based) uses min((1 + u) / (10 + u), decay); "
        "false: always decay"
    ))
    applies_per_firing: int = option(1, help=(
        "times each firing is applied (to the same weights). yifan123/flow_grpo scripts/train_sd3.py "
        "calls its EMA once per training micro-batch, so each update count is applied "
        "gradient_accumulation_steps times (pickscore_sd3: 2); 1: once per firing (DiffusionNFT and AWM "
        "call it once per optimizer update)"
    ))


def validate_ema(e: EMAOptions) -> None:
    check(0 <= e.decay < 1, "ema.decay", "must be in [0, 1)")
    check(e.update_every >= 1, "ema.update_every", "must be >= 1")
    check(e.applies_per_firing >= 1, "ema.applies_per_firing", "must be >= 1")
