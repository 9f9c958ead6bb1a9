"""Trainers: one loop per *kind* of method (offline pairs, online GRPO), shared by all models.

``CONFIG_CLASSES`` maps the config's ``method`` to its config dataclass; ``TRAINERS`` maps it to
the function that runs it.
"""

from __future__ import annotations

from .grpo import train_grpo
from .grpo_config import GRPOConfig
from .pair import PAIR_METHODS, PairTrainConfig, train_pairs

CONFIG_CLASSES: dict[str, type] = {**{m: PairTrainConfig for m in PAIR_METHODS}, "grpo": GRPOConfig}
TRAINERS = {**{m: train_pairs for m in PAIR_METHODS}, "grpo": train_grpo}


def train(cfg) -> dict:
    """Run the trainer of ``cfg.method``: ``output_dir`` locked for the run, Ctrl-C stopping
    cleanly after the current step (see :mod:`.rundir`)."""
    from .rundir import run_guard

    with run_guard(cfg):
        return TRAINERS[cfg.method](cfg)
