"""Trainers: one loop per *kind* of method (offline pairs; online, with a trajectory or a forward-process
strategy), shared by all models.

Importing this package registers each trainer's config dataclass with
:func:`diffalign.config.register_config` (so ``load_config`` picks it by ``method``);
``TRAINERS`` maps a ``method`` to the function that runs it.
"""

from __future__ import annotations

from ..config import CONFIG_CLASSES, register_config  # noqa: F401  (CONFIG_CLASSES: re-exported)
from ..losses.methods import OFFLINE_METHODS
from .forward_config import FORWARD_METHODS, ForwardRLConfig
from .grpo_config import GRPOConfig
from .online import train_online
from .pair import PairTrainConfig, train_pairs

register_config(PairTrainConfig, *OFFLINE_METHODS)
register_config(GRPOConfig, "grpo")
register_config(ForwardRLConfig, *FORWARD_METHODS)
TRAINERS = {**{m: train_pairs for m in OFFLINE_METHODS}, **{m: train_online for m in ("grpo", *FORWARD_METHODS)}}


def train(cfg) -> dict:
    """Run the trainer of ``cfg.method``: ``output_dir`` locked for the run, Ctrl-C stopping
    cleanly after the current step (see :mod:`.rundir`)."""
    from .rundir import run_guard

    with run_guard(cfg):
        return TRAINERS[cfg.method](cfg)
