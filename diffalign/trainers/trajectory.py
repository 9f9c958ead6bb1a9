"""The trajectory strategy of the online loop: ``method: grpo`` (DDPO, Flow-GRPO, DanceGRPO, MixGRPO,
BranchGRPO / TempFlow-GRPO, GRPO-Guard).

The variants differ only in config (:mod:`.grpo_config`: step kind, schedule, advantage and loss
options); :class:`TrajectoryStrategy` is what they share inside the loop of
:class:`~diffalign.trainers.online.OnlineRecipe`:

1. the rollouts take the sampler's stochastic step (:meth:`~TrajectoryStrategy.step_kind`) along the
   step's plan (all steps stochastic, a sliding window, or a tree) and record every stochastic
   transition ``x -> x_next`` with its log-prob and step mean;
2. :meth:`~TrajectoryStrategy.advantages`: each leaf's advantage (per tree depth for trees) spread
   over the transitions of its tree nodes; the trained subset (``schedule.timestep_fraction``,
   ``advantage.drop_zero_advantage``, BranchGRPO's width/depth pruning (:mod:`.tree_pruning`)) and
   the loss weights (``loss.step_weighting``);
3. :meth:`~TrajectoryStrategy.update`: ``inner_epochs`` passes over the selected
   :class:`Transitions`, ``updates_per_epoch`` guarded optimizer updates each: recompute the
   log-prob of every transition with the trained model (same code path as the rollout), the clipped
   GRPO loss, the closed-form KL to the reference (LoRA disabled) on the step means.

``logprob_mismatch`` is the max |recomputed - recorded| log-prob over the transitions of the first
optimizer update of each step, which is on-policy: it must be ~0 (fp32). Under bf16 the rollout's
forwards (``batch_size`` rows) and the training forwards (``train_batch_size`` rows) may take
different kernels, and the gap is then real: ``loss.recompute_old_logprob`` recomputes the old
log-probs with the training forward before the update
(:meth:`~TrajectoryStrategy.recompute_old_log_probs`), so the first ratio is exactly 1
(``first_update_max_log_ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..config import ConfigError, check
from ..logging import warn
from ..losses.grpo import gaussian_kl_same_std, grpo_clip_loss, ratio_norm_log_ratio
from ..pipelines import GuidedModel, RolloutPlan, StepKind, make_step_kind, split_prediction
from .strategy import Advantages, OnlineStrategy, StepRewards, StepRollout, UpdateStats
from .tree_pruning import pruned_depth_steps, tree_pruning_mask


# ------------------------------------------------------------------------------------ data
@dataclass
class Transitions:
    """Recorded rollout transitions ``x -> x_next`` (one row each) with what the loss needs:
    the rollout's log-prob and step mean, the advantage and the loss weight of each row."""

    x: torch.Tensor  # [N, C, H, W] latent before the step
    x_next: torch.Tensor  # [N, C, H, W] latent after the (stochastic) step
    log_prob: torch.Tensor  # [N] log-prob recorded at rollout time
    mean: torch.Tensor  # [N, C, H, W] step mean at rollout time (RatioNorm)
    step: torch.Tensor  # [N] index into the sampling table
    timestep: torch.Tensor  # [N] model timestep
    prompt: torch.Tensor  # [N] prompt index (into the step's conditioning)
    advantage: torch.Tensor  # [N]
    weight: torch.Tensor | None = None  # [N] loss weights (loss.step_weighting), None: uniform

    @classmethod
    def from_rollout(cls, recorded: dict[str, torch.Tensor], advantage: torch.Tensor,
                     weight: torch.Tensor | None) -> Transitions:
        keys = ("x", "x_next", "log_prob", "mean", "step", "timestep", "prompt")
        return cls(**{k: recorded[k] for k in keys}, advantage=advantage, weight=weight)

    def __getitem__(self, idx: torch.Tensor) -> Transitions:
        return Transitions(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                              for f in fields(self)})


@dataclass
class TransitionAdvantages(Advantages):
    """Every recorded transition with its advantage and weight, and the indices trained on."""

    transitions: Transitions
    selected: torch.Tensor  # indices trained on (timestep fraction, zero-advantage drop, tree pruning)

    @property
    def trained_advantages(self) -> torch.Tensor:
        return self.transitions.advantage[self.selected]


@dataclass
class TrajectoryUpdateStats(UpdateStats):
    """:class:`UpdateStats` with the log-prob checks of the step's first optimizer update."""

    mismatch: float = 0.0  # max |recomputed - recorded| log-prob (logprob_mismatch)
    # loss.recompute_old_logprob: max |log-ratio| of the loss's real rows in the step's first update
    first_log_ratio: float = 0.0


# ------------------------------------------------------------------------------------ the strategy
class TrajectoryStrategy(OnlineStrategy):
    """GRPO over recorded denoising transitions (see the module docstring)."""

    def step_kind(self) -> StepKind:
        s = self.loop.cfg.sampler
        return make_step_kind(s.step, s.noise_level, self.loop.adapter.is_flow, s.cps_logprob)

    def check_sampling(self) -> None:
        loop, cfg = self.loop, self.loop.cfg
        if cfg.schedule.kind == "tree":
            for b in cfg.schedule.tree.branch_steps:
                check(float(loop.step_std[b]) > 0, "schedule.tree.branch_steps",
                      f"step {b} has no noise with sampler.step={loop.kind.name} (e.g. the last step of cps/ddim): "
                      "its branches would be identical")
        if not any(float(x) > 0 for x in loop.step_std):
            raise ConfigError(f"config key 'sampler.noise_level': {loop.kind.name} with noise level "
                              f"{loop.kind.noise_level} has no stochastic step")
        train_rows = cfg.train_batch_size or cfg.batch_size
        acc = loop.accelerator
        if (acc.mixed_precision in ("bf16", "fp16") and not cfg.loss.recompute_old_logprob
                and train_rows != cfg.batch_size and acc.is_main_process):
            # a warning, not an error: whether the kernels differ by batch shape is the hardware's call
            # (CPU autocast gave identical log-probs on the tiny models); logprob_mismatch shows it
            warn(f"mixed_precision={acc.mixed_precision} with rollout forwards of batch_size="
                 f"{cfg.batch_size} rows and training forwards of train_batch_size={train_rows}: the same "
                 "sample's log-prob can differ between the two (logprob_mismatch), so the first, on-policy ratio "
                 f"is not 1 and loss.clip_range={cfg.loss.clip_range:g} may clip it; "
                 "loss.recompute_old_logprob=true recomputes the old log-probs with the training forward")

    # ---- advantages
    def advantages(self, rolled: StepRollout, rewards: StepRewards, step: int) -> TransitionAdvantages:
        """Each leaf's advantage spread over the transitions of its tree nodes; the trained subset
        (timestep fraction, tree pruning at training step ``step``) and the loss weights."""
        loop, cfg = self.loop, self.loop.cfg
        ro, a, sch = rolled.rollout, cfg.advantage, cfg.schedule
        tr = ro.transitions
        adv = torch.zeros(ro.num_transitions)
        for d, ad in enumerate(rewards.per_depth):
            mask = (tr["depth"] == d).cpu()
            adv[mask] = ad[tr["node"].cpu()[mask]]
        selected = select_fraction(tr, sch.timestep_fraction, loop.generator, first=sch.timestep_selection == "first",
                                   exclude_step=loop.table.num_steps - 1 if sch.exclude_last_step else None,
                                   rounding=sch.timestep_rounding)
        if a.drop_zero_advantage:  # flow_grpo: samples whose advantages are all zero carry no signal
            selected = selected[adv[selected] != 0]
        if sch.kind == "tree":
            selected = selected[self.pruning_mask(tr, adv, step)[selected]]
        selected = selected.to(loop.device)
        w = step_weights(loop.table, tr["step"], tr["std"], cfg.loss.step_weighting)
        return TransitionAdvantages(rewards, Transitions.from_rollout(tr, adv.to(loop.device), w), selected)

    def pruning_mask(self, tr: dict, adv: torch.Tensor, step: int) -> torch.Tensor:
        """BranchGRPO's depth and width pruning of the trained transitions ([N] bool, CPU)."""
        cfg, t = self.loop.cfg, self.loop.cfg.schedule.tree
        if step > int(cfg.max_steps * t.pruning_fraction):
            return torch.ones(adv.shape[0], dtype=torch.bool)
        depth_steps = pruned_depth_steps(t.depth_pruning_steps, step, t.depth_pruning_slide_interval, t.depth_pruning_stop_step)
        return tree_pruning_mask(tr["step"], tr["depth"], tr["node"], adv, max(t.branch_steps), depth_steps,
                                 t.width_pruning, t.width_pruning_ratio)

    # ---- the update
    def update(self, model: GuidedModel, adv: TransitionAdvantages) -> TrajectoryUpdateStats:
        """``inner_epochs`` shuffled passes over the selected transitions, ``updates_per_epoch``
        guarded optimizer steps each."""
        loop, cfg = self.loop, self.loop.cfg
        stats = TrajectoryUpdateStats()
        first = True
        # Every rank runs the same number of micro-batches (each all-reduces): the selection is padded
        # to the largest rank's count with rows that carry no gradient (drop_zero_advantage and tree
        # pruning keep a different number of rows per rank), so the empty-update skip below, too, is
        # the same decision on every rank. Padding rows count in their micro-batch's mean, so a kept
        # row weighs 1/target on every rank (DDP averages equal-size shards). One process: no padding.
        target = int(max_across_processes(loop.accelerator, adv.selected.numel()))
        rows, real = pad_selection(adv.selected.cpu(), target, adv.transitions.log_prob.shape[0])
        rows, real = rows.to(loop.device), real.to(loop.device)
        padded = bool((~real).any())
        trans = adv.transitions
        for epoch in range(cfg.inner_epochs):
            order = torch.randperm(rows.shape[0], generator=loop.generator).to(loop.device)
            perm, keep = rows[order], real[order]
            updates = [(uidx, ukeep) for uidx, ukeep in zip(torch.tensor_split(perm, cfg.updates_per_epoch),
                                                            torch.tensor_split(keep, cfg.updates_per_epoch))
                       if uidx.numel()]
            if epoch == 0 and cfg.loss.recompute_old_logprob:
                trans = self.recompute_old_log_probs(model, trans, updates, stats)
            for uidx, ukeep in updates:
                self._optimizer_update(model, trans, uidx, stats, first, ukeep if padded else None)
                first = False
        return stats

    def _optimizer_update(self, model: GuidedModel, trans: Transitions, uidx: torch.Tensor,
                          stats: TrajectoryUpdateStats, measure_mismatch: bool, keep: torch.Tensor | None = None) -> None:
        """One optimizer update over transitions ``uidx`` (the loop's ``guarded_update``); the first
        update of a step also measures ``logprob_mismatch`` (on-policy: must be ~0). ``keep``: [len(uidx)]
        bool, False for padding rows (no gradient); None: all real."""
        # micro-batches index positions in uidx, not transitions: padding repeats transitions, so a
        # transition index alone cannot say whether that row is padding
        positions = torch.arange(uidx.shape[0], device=uidx.device)

        recomputed = self.loop.cfg.loss.recompute_old_logprob

        def micro_loss(pos: torch.Tensor):
            batch = trans[uidx[pos]]
            loss, metrics, log_prob = self.transition_loss(model, batch, None if keep is None else keep[pos])
            if measure_mismatch:
                gap = (log_prob.detach() - batch.log_prob).abs()
                if not recomputed:  # old = the rollout's: this gap is the rollout/training mismatch
                    stats.mismatch = max(stats.mismatch, float(gap.max()))
                else:  # old = recomputed with this very forward: the first ratio's distance from 1
                    real = gap if keep is None else torch.where(keep[pos], gap, torch.zeros_like(gap))
                    stats.first_log_ratio = max(stats.first_log_ratio, float(real.max()))
            return loss, metrics

        self.loop.guarded_update(positions, micro_loss, stats)

    @torch.no_grad()
    def recompute_old_log_probs(self, model: GuidedModel, trans: Transitions,
                                updates: list[tuple[torch.Tensor, torch.Tensor]],
                                stats: TrajectoryUpdateStats) -> Transitions:
        """``loss.recompute_old_logprob``: ``trans`` with the log-probs and step means of the rows in
        ``updates`` (the first pass's ``(rows, keep)`` per optimizer update) recomputed by the training
        forward (:meth:`policy_log_prob`) before any update, in the same micro-batches the loss will run,
        so the first update's ratio is exactly 1 even where a forward's numerics depend on its batch
        shape (bf16). Measures ``logprob_mismatch`` (recomputed vs recorded) on the first update.

        Only real rows are written: a padding row (so that every rank runs as many micro-batches)
        repeats a real one, possibly in another micro-batch, whose value must not overwrite its own."""
        log_prob, mean = trans.log_prob.clone(), trans.mean.clone()
        micro = self.loop.cfg.train_batch_size or self.loop.cfg.batch_size  # as guarded_update splits an update
        for u, (uidx, ukeep) in enumerate(updates):
            for pos in torch.split(torch.arange(uidx.shape[0], device=uidx.device), micro):
                idx, real = uidx[pos], ukeep[pos]
                batch = trans[idx]
                lp, m, _, _ = self.policy_log_prob(model, batch)
                if u == 0:
                    gap = torch.where(real, (lp - batch.log_prob).abs(), torch.zeros_like(lp))
                    stats.mismatch = max(stats.mismatch, float(gap.max()))
                log_prob[idx[real]] = lp[real]
                mean[idx[real]] = m[real].to(mean.dtype)
        return replace(trans, log_prob=log_prob, mean=mean)

    def policy_log_prob(self, model: GuidedModel, batch: Transitions):
        """The trained model's log-prob of ``batch``'s transitions through the training forward
        (``policy.wrapped``, the path of the loss): ``(log_prob, mean, std, coeffs)``."""
        loop = self.loop
        co = loop.table.coeffs(batch.step)
        out = model(batch.x, batch.timestep, batch.prompt, loop.policy.wrapped)
        x0, eps = split_prediction(out, batch.x, co.alpha, co.sigma, loop.table.parametrization)
        log_prob, mean, std = loop.kind.log_prob_and_moments(batch.x_next, batch.x, x0, eps, co,
                                                             loop.cfg.sampler.logprob_reduction)
        return log_prob, mean, std, co

    def transition_loss(self, model: GuidedModel, batch: Transitions, keep: torch.Tensor | None = None):
        """GRPO loss of ``batch``: recompute its log-probs with the trained model. Returns
        ``(loss, metrics, log_prob)``. ``keep``: [B] bool, False for padding rows (see :meth:`update`),
        whose policy and KL terms are zeroed; None: every row counts."""
        loop = self.loop
        lo, reduction = loop.cfg.loss, loop.cfg.sampler.logprob_reduction
        log_prob, mean, std, co = self.policy_log_prob(model, batch)
        kl = None
        if lo.kl_beta > 0:
            with torch.no_grad():
                ref_out = loop.policy.reference_output(loop.adapter, model, batch.x, batch.timestep, batch.prompt)
                ref_mean = self._step_mean(ref_out, batch.x, co)
            kl = gaussian_kl_same_std(mean, ref_mean, loop.kind.kl_std(co, lo.kl_form), reduction)
        log_ratio = ratio_norm_log_ratio(log_prob, batch.log_prob, mean, batch.mean, std, reduction) if lo.ratio_norm else None
        weights = batch.weight
        if keep is not None:
            k = keep.to(log_prob.dtype)
            weights = k if weights is None else weights * k
            kl = None if kl is None else kl * k
        loss, metrics = grpo_clip_loss(log_prob, batch.log_prob, batch.advantage, lo.clip_range, log_ratio=log_ratio,
                                       weights=weights, kl=kl, kl_beta=lo.kl_beta)
        return loss, metrics, log_prob

    def _step_mean(self, out: torch.Tensor, x: torch.Tensor, co) -> torch.Tensor:
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, self.loop.table.parametrization)
        return self.loop.kind.mean(x, x0, eps, co)

    # ---- metrics
    def metrics(self, plan: RolloutPlan, plan_info: dict, adv: TransitionAdvantages,
                stats: TrajectoryUpdateStats) -> dict:
        """The log-prob checks (max over processes), the plan's noisy steps, the trained transitions
        and the plan's own keys (``window_start``)."""
        loop = self.loop
        return {
            "logprob_mismatch": max_across_processes(loop.accelerator, stats.mismatch),
            **({"first_update_max_log_ratio": max_across_processes(loop.accelerator, stats.first_log_ratio)}
               if loop.cfg.loss.recompute_old_logprob else {}),
            "stochastic_steps": len([i for i in plan.stochastic_steps if float(loop.step_std[i]) > 0]),
            "transitions": int(adv.selected.numel()),
            **plan_info,
        }


# ------------------------------------------------------------------------------------ pieces
def select_fraction(trans: dict, fraction: float, generator: torch.Generator, first: bool = False,
                    exclude_step: int | None = None, rounding: str | None = None) -> torch.Tensor:
    """Indices of a ``fraction`` of each row's transitions: a random subset (DanceGRPO's timestep
    fraction), or with ``first`` the earliest in sampling order (flow_grpo's). A row is a tree node
    segment ``(depth, node)``; at least one transition per row is kept.

    ``exclude_step``: transitions at this step index are never selected and the fraction applies to
    the rest (``schedule.exclude_last_step``: DanceGRPO trains a random ``int((N - 1) f)`` of steps
    ``0..N-2``). ``rounding`` of a row's ``n * fraction``: ``floor`` (``int()``, as flow_grpo and
    DanceGRPO; computed in float64 like Python, so ``int(10 * 0.9) = 9``) or ``round``; None: floor
    with ``first``, round otherwise.
    """
    n = trans["log_prob"].shape[0]
    cand = torch.arange(n)
    if exclude_step is not None:
        cand = cand[trans["step"].cpu() != exclude_step]
    if fraction >= 1.0:
        return cand
    m = cand.shape[0]
    if m == 0:
        return cand
    row = (trans["depth"].cpu() * (int(trans["node"].max()) + 1) + trans["node"].cpu())[cand]
    key = trans["step"].cpu()[cand].float() if first else torch.rand(m, generator=generator)
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    sorted_rows = row[order]
    _, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(m) - torch.repeat_interleave(starts, counts)
    if (rounding or ("floor" if first else "round")) == "floor":
        kept = (counts.double() * fraction).floor()
    else:
        kept = (counts.float() * fraction).round()
    keep_n = torch.repeat_interleave(torch.clamp(kept.long(), min=1), counts)
    return torch.sort(cand[order[rank < keep_n]]).values


def pad_selection(selected: torch.Tensor, target: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, real)``: the transition indices ``selected`` padded to ``target`` rows (at least
    ``len(selected)``), and a bool mask that is False on the padding. The padding repeats the
    selected rows in order (or, when nothing is selected, rows ``0, 1, ...`` of the ``num_rows``
    transitions), so it is real data of the usual shape and cost, given zero weight by the loss.

    Why: every micro-batch all-reduces (the finite-loss check, DDP's gradients), so every rank must
    run as many as the rank with the most selected rows. ``target == len(selected)``: unchanged."""
    n = selected.shape[0]
    if target < n:
        raise ValueError(f"pad_selection: target {target} < the {n} selected rows")
    pad = target - n
    if pad and n == 0 and num_rows < 1:
        raise ValueError("pad_selection: nothing to pad with (no transitions)")
    pool = selected if n else torch.arange(num_rows, dtype=selected.dtype, device=selected.device)
    fill = pool[torch.arange(pad, device=pool.device) % pool.shape[0]] if pad else pool[:0]
    real = torch.cat([torch.ones(n, dtype=torch.bool, device=selected.device),
                      torch.zeros(pad, dtype=torch.bool, device=selected.device)])
    return torch.cat([selected, fill]), real


def max_across_processes(accelerator, value: float) -> float:
    """The largest ``value`` over processes (one all-reduce; ``value`` itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.gather(torch.tensor([float(value)], device=accelerator.device)).max())


def step_weights(table, steps: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Per-transition loss weights, normalised to mean 1 over the given transitions."""
    if mode == "none":
        return None
    co = table.coeffs(steps)
    if mode == "noise":  # TempFlow-GRPO: ~ the injected noise std (in flow space)
        w = std.float().cpu() / co.scale_next.cpu()
    else:  # GRPO-Guard: ~ 1 / ds (flow-space step size)
        w = 1.0 / (co.s - co.s_next).clamp_min(1e-8).cpu()
    return (w / w.mean()).to(std.device)
