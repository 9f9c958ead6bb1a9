"""Trainers: one loop per *kind* of method (offline pairs, online GRPO), shared by all models.

Importing this package registers each trainer's config dataclass with
:func:`diffalign.config.register_config` (so ``load_config`` picks it by ``method``);
``TRAINERS`` maps a ``method`` to the function that runs it.
"""

from __future__ import annotations

from ..config import CONFIG_CLASSES, register_config  # noqa: F401  (CONFIG_CLASSES: re-exported)
from ..losses.methods import OFFLINE_METHODS
from .pair import PairTrainConfig, train_pairs

register_config(PairTrainConfig, *OFFLINE_METHODS)
TRAINERS = {m: train_pairs for m in OFFLINE_METHODS}

try:  # the online trainer registers itself when present
    from .grpo import GRPOConfig, train_grpo

    register_config(GRPOConfig, "grpo")
    TRAINERS["grpo"] = train_grpo
except ModuleNotFoundError as e:  # pragma: no cover - only while grpo.py is not written
    if e.name != f"{__name__}.grpo":
        raise


def train(cfg) -> dict:
    """Run the trainer of ``cfg.method``: ``output_dir`` locked for the run, Ctrl-C stopping
    cleanly after the current step (see :mod:`.rundir`)."""
    from .rundir import run_guard

    with run_guard(cfg):
        return TRAINERS[cfg.method](cfg)
