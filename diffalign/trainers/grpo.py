"""The online GRPO trainer: DDPO, Flow-GRPO, DanceGRPO, MixGRPO, BranchGRPO / TempFlow-GRPO.

One loop for every model family and every variant; the variants differ only in config
(:mod:`.grpo_config`: step kind, schedule, advantage options). :class:`GRPORecipe` runs it;
per training step (``max_steps`` of them):

1. :meth:`~GRPORecipe.rollout`: ``prompts_per_step`` prompts (per process), ``group_size``
   samples each, rolled out in batches of ``batch_size`` images with
   :func:`diffalign.pipelines.rollout` along this step's plan (all steps stochastic, a sliding
   window, or a tree); CFG batched into one forward. Each batch's final latents are decoded and
   scored on a worker thread while the next batch rolls out.
2. :meth:`~GRPORecipe.advantages`: rewards gathered over processes; advantages per prompt group
   (per tree depth for trees), several rewards combined (:mod:`diffalign.trainers.advantages`);
   for trees, BranchGRPO's width/depth pruning then drops transitions from the update (:mod:`.tree_pruning`).
3. :meth:`~GRPORecipe.update`: ``inner_epochs`` passes over the recorded :class:`Transitions`
   (optionally a random ``timestep_fraction`` of them), ``updates_per_epoch`` optimizer updates
   each: recompute the log-prob of every transition with the trained model (same code path as
   the rollout), the clipped GRPO loss, the closed-form KL to the reference (LoRA disabled) on
   the step means; one guarded optimizer step (:mod:`.optim_step`) per update.
4. :meth:`~GRPORecipe.log`: ``metrics.jsonl``; :meth:`~GRPORecipe.evaluate` with ODE sampling at
   ``sampler.eval_num_steps``; at the end the LoRA, model card and ``reward_curve.png``. With
   ``ema.enabled`` the EMA of the trained parameters (:mod:`.ema`, updated after every optimizer
   update) is what evaluation samples with and what the LoRA holds.

``logprob_mismatch`` is the max |recomputed - recorded| log-prob over the transitions of the
first optimizer update of each step, which is on-policy: it must be ~0 (fp32). Under bf16 the
rollout's forwards (``batch_size`` rows) and the training forwards (``train_batch_size`` rows) may
take different kernels, and the gap is then real: ``loss.recompute_old_logprob`` recomputes the old
log-probs with the training forward before the update (:meth:`~GRPORecipe.recompute_old_log_probs`),
so the first ratio is exactly 1 (``first_update_max_log_ratio``).

The reward curve is drawn here with matplotlib from the run's own ``metrics.jsonl`` (no import of
a higher layer): trainers write data, and this one picture is part of a run's outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, check
from ..files import fix_safetensors_modes
from ..logging import is_quiet, warn
from ..losses.grpo import gaussian_kl_same_std, grpo_clip_loss, ratio_norm_log_ratio
from ..pipelines import (
    GuidedModel, Rollout, RolloutPlan, SamplingTable, cat_rollouts, full_plan, make_ode_solver, make_step_kind,
    post_window_compressed, rollout, sample, sampling_table, split_prediction, time_shift_table, tree_plan, window_plan,
    window_start, window_stop,
)
from .advantages import rollout_advantages, zero_std_group_fraction
from .checkpoint import Checkpointer
from .ema import ema_weights, make_ema
from .tree_pruning import pruned_depth_steps, tree_pruning_mask
from .common import (
    MetricsLogger, Timer, build_trainable, make_optimizer, mean_across_processes, rank_generator, save_final,
    setup_accelerator,
)
from .grpo_config import GRPOConfig
from .grpo_rewards import (  # noqa: F401
    BUILTIN_PROMPTS, load_prompts, preload_reward, resolve_reward, reward_scores, score_images, use_device_in_thread,
)
from ..rewards.base import resolve_device
from ..optim_step import count_nonfinite, guarded_backward, guarded_step


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
class Policy:
    """The one trained network, by role (with LoRA the reference is the same network with its
    adapters disabled, so there is no second copy)."""

    wrapped: torch.nn.Module  # accelerate-prepared (DDP when distributed): training forwards, no_sync
    module: torch.nn.Module  # the same network unwrapped: rollouts, evaluation, adapter toggling
    frozen_reference: torch.nn.Module | None  # full fine-tuning with a KL: a frozen copy; else None

    def reference_output(self, adapter, model: GuidedModel, x, timestep, prompt) -> torch.Tensor:
        if self.frozen_reference is not None:
            return model(x, timestep, prompt, self.frozen_reference)
        with adapter.adapters_disabled(self.module):
            return model(x, timestep, prompt, self.module)


@dataclass
class StepRollout:
    """One training step's rollouts and their rewards (this process)."""

    model: GuidedModel  # conditioned on the step's prompts
    rollout: Rollout  # all batches concatenated
    scores: dict[str, torch.Tensor]  # reward name -> [leaves]
    timings: dict[str, float]  # reward_seconds, reward_wait_seconds; rollout_seconds (set by the loop)


@dataclass
class StepAdvantages:
    transitions: Transitions  # every recorded transition, with its advantage and weight
    selected: torch.Tensor  # indices trained on (schedule.timestep_fraction)
    scores: dict[str, torch.Tensor]  # gathered over processes
    groups: torch.Tensor  # gathered prompt groups
    combined: torch.Tensor  # gathered combined reward


@dataclass
class UpdateStats:
    sums: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    mismatch: float = 0.0
    skipped: int = 0
    # loss.recompute_old_logprob: max |log-ratio| of the loss's real rows in the step's first update
    first_log_ratio: float = 0.0

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight


# ------------------------------------------------------------------------------------ the recipe
class GRPORecipe:
    """``GRPORecipe(cfg).setup()`` then ``.train()``; :func:`train_grpo` does both."""

    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg = cfg

    # ---- setup
    def setup(self) -> GRPORecipe:
        cfg = self.cfg
        self.accelerator = setup_accelerator(cfg)
        self.device = self.accelerator.device
        self._setup_model()
        self.prompts, self.metadata = load_prompts(cfg.data)
        self.eval_prompts, self.eval_metadata = (load_prompts(cfg.eval.data, "eval.data") if cfg.eval.data
                                                 else (self.prompts, self.metadata))
        # every reward model on this rank's device, index included (a bare "cuda" is GPU 0 on the
        # scoring thread, whatever the rank), loaded here on the main thread, not on its first call
        self.reward_device = resolve_device(self.device)
        self.rewards = [(r.name, r.weight, resolve_reward(r.name, r.args, self.reward_device)) for r in cfg.rewards]
        # eval-only rewards (eval.rewards, the reward-hacking guard): scored beside the training ones
        train_names = {name for name, _, _ in self.rewards}
        self.watched = [r.name for r in cfg.eval.rewards]
        self.watched_rewards = [(r.name, r.weight, resolve_reward(r.name, r.args, self.reward_device))
                                for r in cfg.eval.rewards if r.name not in train_names]  # a training reward is scored once
        for _, _, fn in self.rewards + self.watched_rewards:
            preload_reward(fn)
        if cfg.prompt_sampling == "distinct":
            world = cfg.prompts_per_step * self.accelerator.num_processes
            check(world <= len(self.prompts), "prompt_sampling",
                  f"distinct needs prompts_per_step x processes = {world} <= the {len(self.prompts)} prompts")
        self._setup_sampling()
        self.generator = rank_generator(cfg.seed, self.accelerator)  # prompts, noise, subsets: differ per rank
        self.ema = make_ema(cfg.ema, self.policy.module)  # evaluation and saved weights use it
        self.ckpt = Checkpointer(cfg, self.accelerator, self.policy.wrapped, self.optimizer, self.lr_scheduler,
                                 self.generator, ema=self.ema)
        self.start_step, resumed = self.ckpt.resume()
        self.nonfinite_in_a_row = resumed.get("nonfinite_in_a_row", 0)
        self.logger = MetricsLogger(self.accelerator, cfg.output_dir, resume=self.start_step > 1)
        self.executor = (ThreadPoolExecutor(max_workers=cfg.reward_threads, initializer=use_device_in_thread,
                                            initargs=(self.reward_device,)) if cfg.reward_threads > 0 else None)
        self.history: list[dict] = []
        return self

    def _setup_model(self) -> None:
        self.adapter, self.params, frozen_reference = build_trainable(self.cfg, self.accelerator)
        optimizer, lr_scheduler = make_optimizer(self.cfg, self.params, self.accelerator)
        wrapped, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.adapter.denoiser, optimizer, lr_scheduler)
        self.policy = Policy(wrapped, self.accelerator.unwrap_model(wrapped), frozen_reference)

    def _setup_sampling(self) -> None:
        s = self.cfg.sampler
        self._setup_tables()
        self.kind = make_step_kind(s.step, s.noise_level, self.adapter.is_flow, s.cps_logprob)
        self.step_std = self.kind.std(self.table.coeffs(torch.arange(s.num_steps)))
        if self.cfg.schedule.kind == "tree":
            for b in self.cfg.schedule.tree.branch_steps:
                check(float(self.step_std[b]) > 0, "schedule.tree.branch_steps",
                       f"step {b} has no noise with sampler.step={self.kind.name} (e.g. the last step of cps/ddim): "
                       "its branches would be identical")
        if not any(float(x) > 0 for x in self.step_std):
            raise ConfigError(f"config key 'sampler.noise_level': {self.kind.name} with noise level "
                              f"{self.kind.noise_level} has no stochastic step")
        train_rows = self.cfg.train_batch_size or self.cfg.batch_size
        if (self.accelerator.mixed_precision in ("bf16", "fp16") and not self.cfg.loss.recompute_old_logprob
                and train_rows != self.cfg.batch_size and self.accelerator.is_main_process):
            # a warning, not an error: whether the kernels differ by batch shape is the hardware's call
            # (CPU autocast gave identical log-probs on the tiny models); logprob_mismatch shows it
            warn(f"mixed_precision={self.accelerator.mixed_precision} with rollout forwards of batch_size="
                 f"{self.cfg.batch_size} rows and training forwards of train_batch_size={train_rows}: the same "
                 "sample's log-prob can differ between the two (logprob_mismatch), so the first, on-policy ratio "
                 f"is not 1 and loss.clip_range={self.cfg.loss.clip_range:g} may clip it; "
                 "loss.recompute_old_logprob=true recomputes the old log-probs with the training forward")

    def _setup_tables(self) -> None:
        """The ODE solver, the rollout sampling table, the latent shape and the CFG conditioning."""
        s = self.cfg.sampler
        self.solver = make_ode_solver(s.ode_solver)
        self.pre_solver = make_ode_solver(s.pre_window_solver) if s.pre_window_solver else None
        if s.sigma_schedule == "time_shift":
            check(self.adapter.is_flow, "sampler.sigma_schedule", "time_shift is a rectified-flow table (flow models only)")
            self.table = time_shift_table(s.num_steps, s.shift, self.adapter.num_train_timesteps)
        else:
            self.table = sampling_table(self.adapter, s.num_steps, height=s.resolution, width=s.resolution)
        self.eval_table = None  # built on the first evaluation
        self.latent_shape = self.adapter.latent_shape(s.resolution, s.resolution)
        self.uncond = self.adapter.encode_prompt([""]) if s.cfg and s.guidance_scale > 1.0 else None

    # ---- the loop
    def train(self) -> dict:
        cfg = self.cfg
        progress = tqdm(range(self.start_step, cfg.max_steps + 1), desc=cfg.method,
                        disable=not self.accelerator.is_main_process or is_quiet())
        self.best_value = self.previous_best()
        try:
            if cfg.eval.at_start and self.start_step == 1 and cfg.eval.every >= 0 and cfg.eval.num_prompts > 0:
                # step 0: the starting model on the fixed eval prompts (the origin of a reward-against-time curve)
                start = self.evaluate(self.eval_prompts, self.eval_metadata)
                self.keep_if_best(0, start)
                self.logger.log(0, start)
            for step in progress:
                timer = Timer()
                # window positions: a function of (seed, step) alone, identical on all ranks and after a resume
                plan, plan_info = make_plan(cfg, step - 1, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
                rolled = self.rollout(plan, self.prompt_indices(step))
                rolled.timings["rollout_seconds"] = timer.lap()
                adv = self.advantages(rolled, step)
                stats = self.update(rolled.model, adv)
                train_seconds = timer.lap()
                self.check_nonfinite(stats.skipped)
                values = self.metrics(step, plan, plan_info, rolled, adv, stats, train_seconds)
                state = {"nonfinite_in_a_row": self.nonfinite_in_a_row}
                if self.eval_due(step):
                    # checkpoint first: an evaluation that fails (out of memory on a large eval set)
                    # must not lose the steps trained since the last checkpoint
                    self.ckpt.save_if_due(step, state, 0)
                    values.update(self.evaluate(self.eval_prompts, self.eval_metadata))
                    self.keep_if_best(step, values)
                values["step_seconds"] = rolled.timings["rollout_seconds"] + train_seconds + timer.lap()
                self.log(step, values, progress)
                self.ckpt.maybe_save(step, state, 0)
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True)
        return self.finish()

    def prompt_indices(self, step: int) -> list[int]:
        """This process's ``prompts_per_step`` prompt indices for training step ``step`` (1-based),
        by ``prompt_sampling``: ``random`` from the rank's generator; ``distinct`` and ``epoch`` from
        a generator of ``(seed, step or epoch)`` alone, identical on all ranks (each rank takes its
        slice) and after a resume."""
        cfg, n = self.cfg, len(self.prompts)
        if cfg.prompt_sampling == "random":
            return torch.randint(0, n, (cfg.prompts_per_step,), generator=self.generator).tolist()
        per, rank, world = cfg.prompts_per_step, self.accelerator.process_index, self.accelerator.num_processes
        if cfg.prompt_sampling == "distinct":
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step))
            return perm[rank * per:(rank + 1) * per].tolist()
        positions = [((step - 1) * world + rank) * per + i for i in range(per)]
        return [int(epoch_permutation(cfg.seed, pos // n, n)[pos % n]) for pos in positions]

    def rollout(self, plan: RolloutPlan, pick: list[int]) -> StepRollout:
        """Roll out prompts ``pick`` batch by batch; score each batch while the next one rolls out."""
        cfg, s, gen = self.cfg, self.cfg.sampler, self.generator
        prompts = [self.prompts[i] for i in pick]
        meta = [self.metadata[i] for i in pick] if self.metadata else None
        model = GuidedModel(self.adapter, self.adapter.encode_prompt(prompts), self.uncond, s.guidance_scale)
        table, plan = rollout_table(cfg, self.table, plan, self.adapter.num_train_timesteps)
        roots_per_prompt = cfg.group_size // plan.leaves_per_root
        per_batch = cfg.batch_size // cfg.group_size
        parts, pending = [], []
        for p0 in range(0, cfg.prompts_per_step, per_batch):
            pidx = torch.arange(p0, p0 + per_batch).repeat_interleave(roots_per_prompt)
            noise = initial_noise(per_batch, roots_per_prompt, self.latent_shape, s.shared_noise, gen)
            part = rollout(model, table, plan, self.kind, noise.to(self.device), pidx.to(self.device),
                           generator=gen, solver=self.solver, reduction=s.logprob_reduction, net=self.policy.module,
                           pre_solver=self.pre_solver)
            rows = part.prompt_index.tolist()
            scored_latents = part.last_x0 if cfg.reward_on == "x0_last" else part.final
            args = (self.adapter, scored_latents, [prompts[i] for i in rows], [meta[i] for i in rows] if meta else None,
                    self.rewards)
            pending.append(self.executor.submit(score_images, *args) if self.executor is not None else score_images(*args))
            parts.append(part)
        wait = Timer()
        scored = [p.result() if self.executor is not None else p for p in pending]
        timings = {"reward_wait_seconds": wait.lap(), "reward_seconds": float(sum(sc["_seconds"] for sc in scored))}
        scores = {name: torch.cat([sc[name] for sc in scored]) for name, _, _ in self.rewards}
        return StepRollout(model, cat_rollouts(parts), scores, timings)

    def advantages(self, rolled: StepRollout, step: int) -> StepAdvantages:
        """Advantages of every leaf (gathered over processes, sliced back), spread over the
        transitions of its tree nodes; the trained subset (timestep fraction, tree pruning at
        training step ``step``) and the loss weights."""
        cfg, ro, a = self.cfg, rolled.rollout, self.cfg.advantage
        scores, groups, ancestors = gather_leaf_data(self.accelerator, rolled.scores, ro.prompt_index.cpu(),
                                                     [x.cpu() for x in ro.ancestors], ro.rows_per_depth)
        weights = {r.name: r.weight for r in cfg.rewards}
        per_depth, combined = rollout_advantages(scores, weights, groups, ancestors, a.multi_reward, a.tree, a.std,
                                                 a.eps, a.clip, a.std_ddof)
        rank = self.accelerator.process_index
        per_depth = [x[rank * r:(rank + 1) * r] for x, r in zip(per_depth, ro.rows_per_depth)]
        tr = ro.transitions
        adv = torch.zeros(ro.num_transitions)
        for d, ad in enumerate(per_depth):
            mask = (tr["depth"] == d).cpu()
            adv[mask] = ad[tr["node"].cpu()[mask]]
        sch = cfg.schedule
        selected = select_fraction(tr, sch.timestep_fraction, self.generator, first=sch.timestep_selection == "first",
                                   exclude_step=self.table.num_steps - 1 if sch.exclude_last_step else None,
                                   rounding=sch.timestep_rounding)
        if a.drop_zero_advantage:  # flow_grpo: samples whose advantages are all zero carry no signal
            selected = selected[adv[selected] != 0]
        if cfg.schedule.kind == "tree":
            selected = selected[self.pruning_mask(tr, adv, step)[selected]]
        selected = selected.to(self.device)
        w = step_weights(self.table, tr["step"], tr["std"], cfg.loss.step_weighting)
        return StepAdvantages(Transitions.from_rollout(tr, adv.to(self.device), w), selected, scores, groups, combined)

    def pruning_mask(self, tr: dict, adv: torch.Tensor, step: int) -> torch.Tensor:
        """BranchGRPO's depth and width pruning of the trained transitions ([N] bool, CPU)."""
        cfg, t = self.cfg, self.cfg.schedule.tree
        if step > int(cfg.max_steps * t.pruning_fraction):
            return torch.ones(adv.shape[0], dtype=torch.bool)
        depth_steps = pruned_depth_steps(t.depth_pruning_steps, step, t.depth_pruning_slide_interval, t.depth_pruning_stop_step)
        return tree_pruning_mask(tr["step"], tr["depth"], tr["node"], adv, max(t.branch_steps), depth_steps,
                                 t.width_pruning, t.width_pruning_ratio)

    def update(self, model: GuidedModel, adv: StepAdvantages) -> UpdateStats:
        """``inner_epochs`` shuffled passes over the selected transitions, ``updates_per_epoch``
        guarded optimizer steps each; then one learning-rate scheduler step."""
        self.policy.wrapped.train()
        stats = UpdateStats()
        first = True
        # Every rank runs the same number of micro-batches (each all-reduces): the selection is padded
        # to the largest rank's count with rows that carry no gradient (drop_zero_advantage and tree
        # pruning keep a different number of rows per rank), so the empty-update skip below, too, is
        # the same decision on every rank. Padding rows count in their micro-batch's mean, so a kept
        # row weighs 1/target on every rank (DDP averages equal-size shards). One process: no padding.
        target = int(max_across_processes(self.accelerator, adv.selected.numel()))
        rows, real = pad_selection(adv.selected.cpu(), target, adv.transitions.log_prob.shape[0])
        rows, real = rows.to(self.device), real.to(self.device)
        padded = bool((~real).any())
        trans = adv.transitions
        for epoch in range(self.cfg.inner_epochs):
            order = torch.randperm(rows.shape[0], generator=self.generator).to(self.device)
            perm, keep = rows[order], real[order]
            updates = [(uidx, ukeep) for uidx, ukeep in zip(torch.tensor_split(perm, self.cfg.updates_per_epoch),
                                                            torch.tensor_split(keep, self.cfg.updates_per_epoch))
                       if uidx.numel()]
            if epoch == 0 and self.cfg.loss.recompute_old_logprob:
                trans = self.recompute_old_log_probs(model, trans, updates, stats)
            for uidx, ukeep in updates:
                self._optimizer_update(model, trans, uidx, stats, first, ukeep if padded else None)
                first = False
        self.lr_scheduler.step()
        return stats

    def _optimizer_update(self, model: GuidedModel, trans: Transitions, uidx: torch.Tensor, stats: UpdateStats,
                          measure_mismatch: bool, keep: torch.Tensor | None = None) -> None:
        """One optimizer update over transitions ``uidx`` (see :meth:`guarded_update`); the first
        update of a step also measures ``logprob_mismatch`` (on-policy: must be ~0). ``keep``: [len(uidx)]
        bool, False for padding rows (no gradient); None: all real."""
        # micro-batches index positions in uidx, not transitions: padding repeats transitions, so a
        # transition index alone cannot say whether that row is padding
        positions = torch.arange(uidx.shape[0], device=uidx.device)

        recomputed = self.cfg.loss.recompute_old_logprob

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

        self.guarded_update(positions, micro_loss, stats)

    def guarded_update(self, uidx: torch.Tensor, micro_loss, stats: UpdateStats) -> bool:
        """One guarded optimizer step over rows ``uidx`` in micro-batches of ``train_batch_size``:
        ``micro_loss(rows) -> (loss, metrics)``; gradients all-reduced on the last micro-batch only;
        the EMA (if any) follows a step that was taken. Returns whether the step was taken."""
        micro = torch.split(uidx, self.cfg.train_batch_size or self.cfg.batch_size)

        def backward() -> bool:
            finite = True
            for j, midx in enumerate(micro):
                last = j == len(micro) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy.wrapped):
                    loss, metrics = micro_loss(midx)
                    finite = finite and guarded_backward(self.accelerator, loss, midx.numel() / uidx.numel())
                stats.add({"loss": loss.detach(), **metrics})
                stats.micro_batches += 1
            return finite

        skipped, grad_norm = guarded_step(self.accelerator, backward, self.params, self.optimizer,
                                          max_grad_norm=self.cfg.optim.max_grad_norm)
        stats.skipped += int(skipped)
        if self.ema is not None and not skipped:
            self.ema.step()
        if grad_norm is not None:
            stats.add({"grad_norm": grad_norm}, len(micro))
        return not skipped

    @torch.no_grad()
    def recompute_old_log_probs(self, model: GuidedModel, trans: Transitions,
                                updates: list[tuple[torch.Tensor, torch.Tensor]], stats: UpdateStats) -> Transitions:
        """``loss.recompute_old_logprob``: ``trans`` with the log-probs and step means of the rows in
        ``updates`` (the first pass's ``(rows, keep)`` per optimizer update) recomputed by the training
        forward (:meth:`policy_log_prob`) before any update, in the same micro-batches the loss will run,
        so the first update's ratio is exactly 1 even where a forward's numerics depend on its batch
        shape (bf16). Measures ``logprob_mismatch`` (recomputed vs recorded) on the first update.

        Only real rows are written: a padding row (so that every rank runs as many micro-batches)
        repeats a real one, possibly in another micro-batch, whose value must not overwrite its own."""
        log_prob, mean = trans.log_prob.clone(), trans.mean.clone()
        micro = self.cfg.train_batch_size or self.cfg.batch_size  # as guarded_update splits an update
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
        co = self.table.coeffs(batch.step)
        out = model(batch.x, batch.timestep, batch.prompt, self.policy.wrapped)
        x0, eps = split_prediction(out, batch.x, co.alpha, co.sigma, self.table.parametrization)
        log_prob, mean, std = self.kind.log_prob_and_moments(batch.x_next, batch.x, x0, eps, co,
                                                             self.cfg.sampler.logprob_reduction)
        return log_prob, mean, std, co

    def transition_loss(self, model: GuidedModel, batch: Transitions, keep: torch.Tensor | None = None):
        """GRPO loss of ``batch``: recompute its log-probs with the trained model. Returns
        ``(loss, metrics, log_prob)``. ``keep``: [B] bool, False for padding rows (see :meth:`update`),
        whose policy and KL terms are zeroed; None: every row counts."""
        lo, reduction = self.cfg.loss, self.cfg.sampler.logprob_reduction
        log_prob, mean, std, co = self.policy_log_prob(model, batch)
        kl = None
        if lo.kl_beta > 0:
            with torch.no_grad():
                ref_out = self.policy.reference_output(self.adapter, model, batch.x, batch.timestep, batch.prompt)
                ref_mean = self._step_mean(ref_out, batch.x, co)
            kl = gaussian_kl_same_std(mean, ref_mean, self.kind.kl_std(co, lo.kl_form), reduction)
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
        x0, eps = split_prediction(out, x, co.alpha, co.sigma, self.table.parametrization)
        return self.kind.mean(x, x0, eps, co)

    def check_nonfinite(self, skipped: int) -> None:
        self.nonfinite_in_a_row = count_nonfinite(
            self.nonfinite_in_a_row, bool(skipped), self.cfg.loss.max_nonfinite_steps, "steps",
            "try a lower optim.learning_rate, mixed_precision=no/bf16, or a smaller sampler.noise_level")

    # ---- evaluation, metrics, outputs
    def keep_if_best(self, step: int, evaluated: dict) -> None:
        """``eval.keep_best``: save the evaluated weights (the EMA's, if any) to ``output_dir/best`` when
        their ``eval_reward/NAME`` on the fixed eval prompts is the highest so far (``best/best.json``
        says which step). A checkpoint chosen on the eval prompts, never on a test split."""
        name = self.cfg.eval.keep_best
        if not name:
            return
        value = float(evaluated["eval_reward_mean" if name == "eval_reward_mean" else f"eval_reward/{name}"])
        if self.best_value is not None and self.best_value >= value:  # the same on every rank: no rank waits alone
            return
        self.best_value = value
        best = Path(self.cfg.output_dir) / "best"
        if self.accelerator.is_main_process:
            best.mkdir(parents=True, exist_ok=True)
            with ema_weights(self.ema):
                self.adapter.save_lora(str(best), self.accelerator.unwrap_model(self.policy.wrapped))
            fix_safetensors_modes(best)
            (best / "best.json").write_text(json.dumps({"step": step, "reward": name, "value": value}))
        self.accelerator.wait_for_everyone()

    def previous_best(self) -> float | None:
        """The best ``eval.keep_best`` value of this run so far: None on a fresh start (an earlier run's
        ``best/`` is removed), the saved one when resuming."""
        best = Path(self.cfg.output_dir) / "best"
        if not self.cfg.eval.keep_best:
            return None
        if self.start_step > 1 and (best / "best.json").is_file():
            return float(json.loads((best / "best.json").read_text())["value"])
        if self.accelerator.is_main_process and best.exists():
            shutil.rmtree(best)
        self.accelerator.wait_for_everyone()
        return None

    def eval_due(self, step: int) -> bool:
        ev = self.cfg.eval
        return ev.every >= 0 and ev.num_prompts > 0 and (step == self.cfg.max_steps or (ev.every > 0 and step % ev.every == 0))

    def evaluate(self, prompts: list[str], metadata: list[dict] | None) -> dict[str, float]:
        """ODE samples of the first ``eval.num_prompts`` prompts with fixed noise, with the EMA weights
        when there is an EMA; mean rewards: ``eval_reward_mean`` (the weighted training reward),
        ``eval_reward/NAME`` per training reward when there are several, and always for every
        ``eval.rewards`` reward (watched, not trained).

        The prompts are split over the processes (:func:`eval_shard`) and each process samples,
        decodes and scores its share ``eval.batch_size`` prompts at a time; the scores are gathered,
        so every process returns the same means. Prompt ``i`` always gets row ``i`` of one fixed
        noise draw, so its image does not depend on the number of processes or the chunk size."""
        cfg = self.cfg
        if self.eval_table is None:
            self.eval_table = sampling_table(self.adapter, cfg.sampler.eval_num_steps,
                                             height=cfg.sampler.resolution, width=cfg.sampler.resolution)
        n = min(cfg.eval.num_prompts, len(prompts))
        g = torch.Generator().manual_seed(cfg.eval.seed)
        noise = torch.randn((n, *self.latent_shape), generator=g)
        rewards = self.rewards + self.watched_rewards
        local = eval_shard(n, self.accelerator.process_index, self.accelerator.num_processes)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in rewards}
        for c0 in range(0, len(local), cfg.eval.batch_size):
            rows = local[c0:c0 + cfg.eval.batch_size]
            chunk = [prompts[i] for i in rows]
            model = GuidedModel(self.adapter, self.adapter.encode_prompt(chunk), self.uncond, cfg.sampler.guidance_scale,
                                max_rows=cfg.batch_size)
            dev = self.adapter.device
            with ema_weights(self.ema):
                final = sample(model, self.eval_table, noise[rows].to(dev), torch.arange(len(rows), device=dev),
                               solver=self.solver, net=self.policy.module)
            scored = score_images(self.adapter, final, chunk, [metadata[i] for i in rows] if metadata else None, rewards)
            del final  # the chunk's latents and images go before the next chunk samples
            for name in parts:
                parts[name].append(scored[name])
        scores = {name: torch.cat(v) for name, v in parts.items()}
        if self.accelerator.num_processes > 1:  # every process holds the same count (eval_shard pads)
            scores = {k: self.accelerator.gather(v.to(self.device)).cpu()[:n] for k, v in scores.items()}
        out = {"eval_reward_mean": float(sum(w * scores[name] for name, w, _ in self.rewards).mean())}
        if len(self.rewards) > 1:
            out.update({f"eval_reward/{name}": float(scores[name].mean()) for name, _, _ in self.rewards})
        out.update({f"eval_reward/{name}": float(scores[name].mean()) for name in self.watched})
        return out

    def metrics(self, step: int, plan: RolloutPlan, plan_info: dict, rolled: StepRollout, adv: StepAdvantages,
                stats: UpdateStats, train_seconds: float) -> dict:
        """The step's ``metrics.jsonl`` row (without eval and ``step_seconds``)."""
        cfg, acc, sel = self.cfg, self.accelerator, adv.selected
        local = {k: v / max(stats.micro_batches, 1) for k, v in stats.sums.items()}
        local.update({
            "advantage_abs_mean": float(adv.transitions.advantage[sel].abs().mean()) if sel.numel() else 0.0,
            "rollout_seconds": rolled.timings["rollout_seconds"], "train_seconds": train_seconds,
            "reward_seconds": rolled.timings["reward_seconds"], "reward_wait_seconds": rolled.timings["reward_wait_seconds"],
        })
        values = mean_across_processes(acc, local)
        mismatch = self._max_over_processes(stats.mismatch)
        values.update({
            "reward_mean": float(adv.combined.mean()),
            "reward_std": float(adv.combined.std(unbiased=False)),
            **({f"reward/{k}": float(v.mean()) for k, v in adv.scores.items()} if len(adv.scores) > 1 else {}),
            "zero_std_group_fraction": zero_std_group_fraction(adv.combined, adv.groups),
            "logprob_mismatch": mismatch,
            **({"first_update_max_log_ratio": self._max_over_processes(stats.first_log_ratio)}
               if cfg.loss.recompute_old_logprob else {}),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "stochastic_steps": len([i for i in plan.stochastic_steps if float(self.step_std[i]) > 0]),
            "transitions": int(sel.numel()),
            "model_rows": rolled.rollout.model_rows,
            "nonfinite_skipped": stats.skipped,
            "images_seen": step * cfg.prompts_per_step * cfg.group_size * acc.num_processes,
            **plan_info,
        })
        return values

    def _max_over_processes(self, value: float) -> float:
        acc = self.accelerator
        return value if acc.num_processes == 1 else float(acc.gather(torch.tensor([value], device=self.device)).max())

    def log(self, step: int, values: dict, progress) -> None:
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:
            self.logger.log(step, values)
        self.history.append({"step": step, **values})
        progress.set_postfix(reward=f"{values['reward_mean']:.4g}", kl=f"{values.get('approx_kl', 0.0):.2g}")

    def finish(self) -> dict:
        """Reward curve of the whole run (resumed parts included), weights (the EMA's, if any), model card."""
        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            metrics_path = out / "metrics.jsonl"
            rows = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                    if metrics_path.is_file() else [])
            if rows:
                save_reward_curve(rows, out / "reward_curve.png", self.watched)
        with ema_weights(self.ema):
            info = save_final(self.cfg, self.accelerator, self.adapter, self.policy.wrapped, self.logger.last, self.cfg.method)
        self.accelerator.end_training()
        return {"final": self.logger.last, "history": self.history, **info}


def train_grpo(cfg: GRPOConfig) -> dict:
    """Run ``method: grpo`` (see :class:`GRPORecipe`)."""
    return GRPORecipe(cfg).setup().train()


# ------------------------------------------------------------------------------------ pieces
def make_plan(cfg: GRPOConfig, iteration: int, generator: torch.Generator) -> tuple[RolloutPlan, dict]:
    """The rollout plan of training step ``iteration`` (0-based) and its metrics (window start)."""
    s, sch = cfg.sampler, cfg.schedule
    if sch.kind == "full":
        return full_plan(s.num_steps), {}
    if sch.kind == "window":
        w = sch.window
        start = window_start(iteration, s.num_steps, w.size, w.start, w.shift, w.interval, w.end, w.mode, generator,
                             w.sweep_end)
        stop = window_stop(start, s.num_steps, w.size, w.end, w.mode, w.sweep_end)
        return window_plan(s.num_steps, start, stop - start), {"window_start": start}
    t = sch.tree
    return tree_plan(s.num_steps, t.branch_steps, t.branch_factor, t.sde_between, t.split_noise_scale), {}


def rollout_table(cfg: GRPOConfig, table: SamplingTable, plan: RolloutPlan,
                  num_train_timesteps: int = 1000) -> tuple[SamplingTable, RolloutPlan]:
    """The table and plan a training rollout runs: ``(table, plan)`` unchanged, or with MixGRPO-Flash
    (``schedule.window.post_window_ratio``) the post-window steps compressed by
    :func:`~diffalign.pipelines.post_window_compressed`: on a ``time_shift`` table at the release's
    time-shifted points, ``post_window_to_zero`` choosing whether a rollout always ends at sigma 0."""
    w = cfg.schedule.window
    if cfg.schedule.kind != "window" or w.post_window_ratio is None:
        return table, plan
    shift = cfg.sampler.shift if cfg.sampler.sigma_schedule == "time_shift" else None
    return post_window_compressed(table, plan, w.post_window_ratio, shift, num_train_timesteps, w.post_window_to_zero)


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


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """The eval prompt indices process ``rank`` of ``world`` samples: a contiguous block of
    ``ceil(n / world)``, the last blocks padded with prompt ``n - 1`` so every process holds the same
    count (the gather needs it); gathered rank by rank and cut to ``n`` they are ``0 .. n-1``."""
    if n <= 0:
        return []
    per = -(-n // world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]


def max_across_processes(accelerator, value: int) -> int:
    """The largest ``value`` over processes (one all-reduce; ``value`` itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    return int(accelerator.gather(t).max())


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """``prompt_sampling: epoch``: the prompt order of pass ``epoch`` over ``n`` prompts (a function
    of ``seed`` and ``epoch`` alone, so every rank and a resumed run see the same order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * (epoch + 1)))


def initial_noise(prompts: int, per_prompt: int, shape, shared: bool, generator: torch.Generator) -> torch.Tensor:
    """Initial latents [prompts * per_prompt, *shape] (CPU), grouped by prompt; ``shared``: one
    draw per prompt repeated over its group (DanceGRPO, TempFlow-GRPO's seed groups)."""
    if shared:
        return torch.randn((prompts, *shape), generator=generator).repeat_interleave(per_prompt, dim=0)
    return torch.randn((prompts * per_prompt, *shape), generator=generator)


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


def gather_leaf_data(accelerator, scores: dict[str, torch.Tensor], groups: torch.Tensor, ancestors, rows_per_depth):
    """Rewards, groups and tree ancestors of all processes (indices offset per process)."""
    if accelerator.num_processes == 1:
        return scores, groups, ancestors
    dev = accelerator.device
    rank_ids = accelerator.gather(torch.full((groups.shape[0],), accelerator.process_index, device=dev)).cpu()
    g_scores = {k: accelerator.gather(v.to(dev)).cpu() for k, v in scores.items()}
    n_groups = int(groups.max()) + 1
    g_groups = accelerator.gather(groups.to(dev)).cpu() + rank_ids * n_groups
    g_anc = [accelerator.gather(a.to(dev)).cpu() + rank_ids * r for a, r in zip(ancestors, rows_per_depth)]
    return g_scores, g_groups, g_anc


def save_reward_curve(history: list[dict], path: Path, watched: list[str] | tuple[str, ...] = ()) -> None:
    """``reward_curve.png``: train reward mean +- std per step, and the eval reward; with ``watched``
    (the ``eval.rewards`` names) a second panel beside it: each watched reward's eval value minus its
    first one (rewards live on different scales), so a training reward that rises while a watched
    one falls — reward hacking — shows at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num = lambda v: isinstance(v, (int, float))  # noqa: E731 - NaN/inf are logged as strings
    rows = history
    history = [h for h in history if num(h.get("reward_mean")) and num(h.get("reward_std"))]
    if watched:
        fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
        for name in watched:
            pts = [(h["step"], h[f"eval_reward/{name}"]) for h in rows if num(h.get(f"eval_reward/{name}"))]
            if pts:
                ax_w.plot([p[0] for p in pts], [p[1] - pts[0][1] for p in pts], "o-", label=name)
        ax_w.axhline(0.0, color="grey", lw=0.5)
        ax_w.set_xlabel("step")
        ax_w.set_ylabel("change since first eval")
        ax_w.set_title("watched rewards (eval.rewards, not trained)")
        ax_w.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    mean = [h["reward_mean"] for h in history]
    std = [h["reward_std"] for h in history]
    ax.plot(steps, mean, label="train reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ev = [(h["step"], h["eval_reward_mean"]) for h in history if num(h.get("eval_reward_mean"))]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval reward (ODE)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("GRPO reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
