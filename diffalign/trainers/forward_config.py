"""Config of the forward-process online trainer (``method: nft`` and ``method: awm``).

The rollout, reward, advantage and evaluation keys are the GRPO trainer's
(:class:`~diffalign.trainers.grpo_config.GRPOConfig`); rollouts are deterministic (the
``sampler.ode_solver``, no stochastic step), so ``sampler.step``, ``schedule`` and ``loss`` are
not used. Two blocks are added:

* ``forward``: which noise levels each clean sample is trained at, and the velocity KL;
* ``nft`` (DiffusionNFT, arXiv:2509.16117) or ``awm`` (Advantage Weighted Matching,
  arXiv:2509.25050): the method's own options, with the released configs' values as defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import check, option
from ..losses.forward import AWM_LOSS_TYPES, AWM_WEIGHTINGS, KL_EMA_DECAY_TYPES
from .grpo_config import GRPOConfig

FORWARD_METHODS = ("nft", "awm")
TIMESTEP_DRAWS = ("per_sample", "stratified")
FRACTION_MODES = ("count", "range")


@dataclass
class ForwardOptions:
    """Where on the sampling table the clean samples are re-noised for training."""

    train_timesteps: int | None = option(None, help=(
        "noise levels trained per sample and update (each one forward of the batch). null: from "
        "timestep_fraction (fraction_mode count: int(num_steps * fraction); range: every allowed step; "
        "AWM trains 6)"
    ))
    timestep_fraction: float = option(1.0, help="the share of the sampling table trained (see fraction_mode)")
    fraction_mode: str = option("count", help=(
        "what timestep_fraction limits with timestep_draw per_sample: count = how many steps each sample "
        "trains, int(num_steps * fraction) distinct steps drawn from the whole table, less step 0 with "
        "skip_first_step (NVlabs/DiffusionNFT scripts/train_nft_sd3.py: each sample shuffles all N table "
        "steps and trains the first int(N * timestep_fraction), so at 10 steps and 0.99 every step, the "
        "last included, is trained by 9 of 10 samples) range = which steps: only the first int(num_steps "
        '* fraction) table steps can be drawn stratified draws always cover the range (AWM\'s "discrete" '
        "time types)"
    ))
    skip_first_step: bool = option(False, help=(
        'never train at the first (pure-noise) table step (AWM\'s "discrete_wo_init")'
    ))
    timestep_draw: str = option("per_sample", help=(
        "per_sample: each sample its own random distinct steps (DiffusionNFT: a per-sample shuffle of the "
        "table) | stratified: one step per stratum of the allowed range, shared by the batch (AWM's "
        '"discrete" time types)'
    ))
    sde_rollouts: bool = option(False, help=(
        "stochastic rollouts (sampler.step / noise_level, e.g. Flow-SDE) instead of the ODE: any sampler "
        "works for these methods; with noise a group may share its initial noise (sampler.shared_noise)"
    ))
    kl_beta: float = option(1.0e-4, help=(
        "weight of mean((v - v_ref)^2) to the reference (LoRA disabled); both releases call it train.beta"
    ))


def train_step_pool(num_steps: int, f: ForwardOptions) -> tuple[int, int, int]:
    """``(first, end, k)``: each sample trains ``k`` table steps drawn from ``[first, end)``."""
    first = int(f.skip_first_step)
    if f.timestep_draw == "per_sample" and f.fraction_mode == "count":
        end = num_steps
        k = f.train_timesteps or int((end - first) * f.timestep_fraction)
    else:
        end = int(num_steps * f.timestep_fraction)
        k = f.train_timesteps or (end - first)
    return first, end, k


@dataclass
class NFTOptions:
    """DiffusionNFT (Zheng et al., 2025), defaults from its SD3.5 GenEval config."""

    beta: float = option(1.0, help=(
        "the implicit-policy mixing strength beta (config.beta: 1.0; 0.1 for OCR / multi-reward)"
    ))
    adv_clip_max: float = option(5.0, help=(
        "advantages are clipped to +-adv_clip_max before r = A / adv_clip_max / 2 + 1/2 (release: 5)"
    ))
    loss_scale: float | None = option(None, help=(
        "the batch loss is multiplied by this (release: policy_loss_scale = adv_clip_max); null: "
        "adv_clip_max"
    ))
    adaptive_weight: bool = option(True, help=(
        "the release's per-sample adaptive weights 1 / stopgrad(mean |x0_hat - x0|)"
    ))
    old_decay_rate: float = option(0.001, help=(
        "old (sampling) policy decay d = min((step - delay) * rate, cap) after every step (decay_type 1: "
        "rate 0.001, cap 0.5, delay 0; decay_type 2: 0.0075, 0.999, 75)"
    ))
    old_decay_cap: float = option(0.5, help="the cap of that decay d (decay_type 1: 0.5)")
    old_decay_delay: int = option(0, help="steps before that decay starts (decay_type 1: 0)")


@dataclass
class AWMOptions:
    """Advantage Weighted Matching (Xue et al., 2025), defaults from its SD3.5 GenEval config
    (``scxue/advantage_weighted_matching``, ``config/dgx_awm.py``) except ``ema_beta``."""

    weighting: str = option("ghuber", help=(
        "per-sample weighting of the flow-matching error: uniform | t | t2 | huber | ghuber"
    ))
    ghuber_power: float = option(0.25, help="the power p of the ghuber weighting")
    clip_range: float = option(1.0, help="PPO clip of the ratio exp(log p_theta - log p_old) (release: 1.0)")
    advantage_max: float | None = option(1.0, help=(
        "advantages (after advantage.clip) are rescaled to [-advantage_max, advantage_max] (release: "
        "advantage_max 1 with adv_clip_max 5); null: no rescaling"
    ))
    loss_type: str = option("exp_first", help=(
        "exp_first: one ratio per (sample, timestep) row (every release config) | sum_first: one ratio "
        "per sample, of its log-likelihoods averaged over its training timesteps (the release's other "
        "train.loss_type); needs train_batch_size to be a multiple of the timesteps per sample"
    ))
    ema_beta: float = option(0.0, help=(
        "weight of the EMA-KL term mean((v - v_ema)^2), v_ema from an EMA copy of the trained weights "
        "(the release's train.ema_beta with kl_ema_weight 'Uniform': 1 in all its SD3.5 configs; the "
        "release adds the term only when train.beta > 0). 0: off (no EMA copy, no extra forward)"
    ))
    kl_ema_decay: float = option(0.3, help=(
        "that EMA copy's decay after each update: linear = min(kl_ema_decay, kl_ema_decay_rate * updates) "
        "| constant = kl_ema_decay (release: kl_ema_decay_type linear, kl_ema_decay 0.3, rate 0.001)"
    ))
    kl_ema_decay_type: str = option("linear", help="linear | constant: how kl_ema_decay is applied (see kl_ema_decay)")
    kl_ema_decay_rate: float = option(0.001, help="the linear schedule's rate (release: 0.001)")


@dataclass
class ForwardRLConfig(GRPOConfig):
    """Config of ``method: nft`` / ``method: awm`` (see the module docstring)."""

    method: str = option("nft", help="the forward-process method: nft | awm")
    METHODS = FORWARD_METHODS
    forward: ForwardOptions = option(factory=ForwardOptions, help=(
        "the forward-process training (timesteps, batches, advantage scaling) both methods share"
    ))
    nft: NFTOptions = option(factory=NFTOptions, help="DiffusionNFT's options (method: nft)")
    awm: AWMOptions = option(factory=AWMOptions, help="Advantage Weighted Matching's options (method: awm)")

    @property
    def needs_reference(self) -> bool:
        return self.forward.kl_beta > 0

    def validate(self) -> None:
        super().validate()
        check(not self.sampler.shared_noise or self.forward.sde_rollouts, "sampler.shared_noise",
              f"must be false for {self.method}: rollouts are deterministic (ODE), so a group sharing its "
              "initial noise would be one image repeated (set forward.sde_rollouts=true for stochastic rollouts)")
        f = self.forward
        check(f.train_timesteps is None or f.train_timesteps >= 1, "forward.train_timesteps", "must be >= 1 or null")
        check(0 < f.timestep_fraction <= 1, "forward.timestep_fraction", "must be in (0, 1]")
        check(f.timestep_draw in TIMESTEP_DRAWS, "forward.timestep_draw", f"must be one of {', '.join(TIMESTEP_DRAWS)}")
        check(f.fraction_mode in FRACTION_MODES, "forward.fraction_mode", f"must be one of {', '.join(FRACTION_MODES)}")
        first, end, k = train_step_pool(self.sampler.num_steps, f)
        by_fraction = train_step_pool(self.sampler.num_steps, replace(f, train_timesteps=None))[2]
        check(end - first >= 1 and by_fraction >= 1, "forward.timestep_fraction",
              f"leaves no table step to train on (sampler.num_steps={self.sampler.num_steps}, "
              f"skip_first_step={f.skip_first_step}, fraction_mode={f.fraction_mode})")
        check(f.train_timesteps is None or f.timestep_draw == "stratified" or f.train_timesteps <= end - first,
              "forward.train_timesteps", f"at most {end - first} distinct steps are allowed per sample")
        check(f.kl_beta >= 0, "forward.kl_beta", "must be >= 0")
        n = self.nft
        check(n.beta > 0, "nft.beta", "must be > 0")
        check(n.adv_clip_max > 0, "nft.adv_clip_max", "must be > 0")
        check(n.loss_scale is None or n.loss_scale > 0, "nft.loss_scale", "must be > 0 or null")
        check(n.old_decay_rate >= 0, "nft.old_decay_rate", "must be >= 0")
        check(0 <= n.old_decay_cap < 1, "nft.old_decay_cap", "must be in [0, 1)")
        check(n.old_decay_delay >= 0, "nft.old_decay_delay", "must be >= 0")
        a = self.awm
        check(a.weighting in AWM_WEIGHTINGS, "awm.weighting", f"must be one of {', '.join(AWM_WEIGHTINGS)}")
        check(a.ghuber_power > 0, "awm.ghuber_power", "must be > 0")
        check(a.clip_range > 0, "awm.clip_range", "must be > 0")
        check(a.advantage_max is None or a.advantage_max > 0, "awm.advantage_max", "must be > 0 or null")
        check(a.advantage_max is None or self.advantage.clip is not None, "awm.advantage_max",
              "rescales advantage.clip to advantage_max: set advantage.clip too (release: 5)")
        check(a.loss_type in AWM_LOSS_TYPES, "awm.loss_type", f"must be one of {', '.join(AWM_LOSS_TYPES)}")
        micro = self.train_batch_size or self.batch_size
        check(self.method != "awm" or a.loss_type != "sum_first" or micro % k == 0, "train_batch_size",
              f"awm.loss_type sum_first takes a ratio over all {k} timesteps of a sample, so a micro-batch "
              f"must hold whole samples: use a multiple of {k} (now {micro})")
        check(a.ema_beta >= 0, "awm.ema_beta", "must be >= 0")
        check(0 <= a.kl_ema_decay < 1, "awm.kl_ema_decay", "must be in [0, 1)")
        check(a.kl_ema_decay_type in KL_EMA_DECAY_TYPES, "awm.kl_ema_decay_type",
              f"must be one of {', '.join(KL_EMA_DECAY_TYPES)}")
        check(a.kl_ema_decay_rate >= 0, "awm.kl_ema_decay_rate", "must be >= 0")
