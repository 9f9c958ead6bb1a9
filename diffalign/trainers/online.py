"""The online trainer: one loop for every online method, every model family.

:class:`OnlineRecipe` owns what every online method shares: prompts, rollout scheduling, reward
scoring, the group-normalised advantages, evaluation, metrics, the EMA, the guarded optimizer step,
checkpoints and the run's outputs. What differs between the two families of methods is its
``strategy`` (:class:`~diffalign.trainers.strategy.OnlineStrategy`, chosen by ``method``):
:class:`~diffalign.trainers.trajectory.TrajectoryStrategy` for ``grpo`` (the GRPO family, trained
on recorded transitions and their log-probs) and
:class:`~diffalign.trainers.forward_process.ForwardProcessStrategy` for ``nft`` / ``awm`` (trained
on the re-noised final images). ``OnlineRecipe(cfg).setup()`` then ``.train()``; per training step
(``max_steps`` of them):

1. :meth:`~OnlineRecipe.rollout`: ``prompts_per_step`` prompts (per process), ``group_size``
   samples each, rolled out in batches of ``batch_size`` images with
   :func:`diffalign.pipelines.rollout` along this step's plan (:mod:`.rollout_schedule`: all steps,
   a sliding window or a tree) with the strategy's step rule and sampling weights; CFG batched into
   one forward. Each batch's final latents are decoded and scored on a worker thread while the next
   batch rolls out.
2. :meth:`~OnlineRecipe.advantages`: rewards gathered over processes, advantages per prompt group
   (per tree depth for trees), several rewards combined (:func:`~.strategy.step_rewards`); the
   strategy spreads them over the rows it trains.
3. the strategy's update: optimizer updates, each one :meth:`~OnlineRecipe.guarded_update` (the
   EMA, if any, follows every update taken); then one learning-rate scheduler step.
4. :meth:`~OnlineRecipe.log`: ``metrics.jsonl`` (the loop's keys, then the strategy's);
   :meth:`~OnlineRecipe.evaluate` with ODE sampling at ``sampler.eval_num_steps``; at the end the
   LoRA, model card and ``reward_curve.png`` (:mod:`.plots`). With ``ema.enabled`` the EMA of the
   trained parameters (:mod:`.ema`) is what evaluation samples with and what the LoRA holds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import check
from ..files import fix_safetensors_modes
from ..logging import is_quiet
from ..optim_step import count_nonfinite, guarded_backward, guarded_step
from ..pipelines import (
    GuidedModel, RolloutPlan, cat_rollouts, make_ode_solver, rollout, sample, sampling_table, time_shift_table,
)
from ..rewards.base import resolve_device
from .advantages import zero_std_group_fraction
from .checkpoint import Checkpointer
from .common import (
    MetricsLogger, Timer, build_trainable, make_optimizer, mean_across_processes, rank_generator, save_final,
    setup_accelerator, trainable_parameters,
)
from .ema import ema_weights, make_ema
from .forward_config import FORWARD_METHODS
from .forward_process import ForwardProcessStrategy
from .grpo_config import GRPOConfig
from .grpo_rewards import load_prompts, preload_reward, resolve_reward, score_images, use_device_in_thread
from .plots import save_reward_curve
from .rollout_schedule import epoch_permutation, eval_shard, initial_noise, make_plan, rollout_table
from .strategy import Advantages, OnlineStrategy, Policy, StepRollout, UpdateStats, step_rewards
from .trajectory import TrajectoryStrategy

# the strategy of each online method
STRATEGIES: dict[str, type[OnlineStrategy]] = {
    "grpo": TrajectoryStrategy, **{m: ForwardProcessStrategy for m in FORWARD_METHODS},
}


class OnlineRecipe:
    """``OnlineRecipe(cfg).setup()`` then ``.train()``; :func:`train_online` does both."""

    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg = cfg
        self.strategy: OnlineStrategy = STRATEGIES[cfg.method](self)

    # ---- setup
    def setup(self) -> OnlineRecipe:
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
        self.strategy.setup()  # last: its state starts from the (possibly resumed) trained weights
        return self

    def _setup_model(self) -> None:
        self.adapter, self.params, frozen_reference = build_trainable(self.cfg, self.accelerator)
        optimizer, lr_scheduler = make_optimizer(self.cfg, self.params, self.accelerator)
        wrapped, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.adapter.denoiser, optimizer, lr_scheduler)
        self.params = trainable_parameters(wrapped)  # under FSDP the sharded ones (clipping, EMA, strategies use them)
        self.policy = Policy(wrapped, self.accelerator.unwrap_model(wrapped), frozen_reference)

    def _setup_sampling(self) -> None:
        """The ODE solvers, the rollout sampling table, the latent shape, the CFG conditioning, and
        the strategy's step rule with its noise per table step."""
        s = self.cfg.sampler
        self.strategy.check_model()
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
        self.kind = self.strategy.step_kind()
        self.step_std = self.kind.std(self.table.coeffs(torch.arange(s.num_steps)))
        self.strategy.check_sampling()

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
                self.policy.wrapped.train()
                stats = self.strategy.update(rolled.model, adv)
                self.lr_scheduler.step()
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
        """Roll out prompts ``pick`` batch by batch with the strategy's sampling weights; score each
        batch while the next one rolls out."""
        cfg, s, gen = self.cfg, self.cfg.sampler, self.generator
        prompts = [self.prompts[i] for i in pick]
        meta = [self.metadata[i] for i in pick] if self.metadata else None
        with self.strategy.sampling_weights():
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
                args = (self.adapter, scored_latents, [prompts[i] for i in rows],
                        [meta[i] for i in rows] if meta else None, self.rewards)
                pending.append(self.executor.submit(score_images, *args) if self.executor is not None
                               else score_images(*args))
                parts.append(part)
            wait = Timer()
            scored = [p.result() if self.executor is not None else p for p in pending]
        timings = {"reward_wait_seconds": wait.lap(), "reward_seconds": float(sum(sc["_seconds"] for sc in scored))}
        scores = {name: torch.cat([sc[name] for sc in scored]) for name, _, _ in self.rewards}
        return StepRollout(model, cat_rollouts(parts), scores, timings)

    def advantages(self, rolled: StepRollout, step: int) -> Advantages:
        """The step's group-normalised advantages (shared), spread by the strategy over the rows
        training step ``step`` trains."""
        return self.strategy.advantages(rolled, step_rewards(self.accelerator, self.cfg, rolled), step)

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

        The prompts are split over the processes (:func:`~.rollout_schedule.eval_shard`) and each
        process samples, decodes and scores its share ``eval.batch_size`` prompts at a time; the scores
        are gathered, so every process returns the same means. Prompt ``i`` always gets row ``i`` of one
        fixed noise draw, so its image does not depend on the number of processes or the chunk size."""
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

    def metrics(self, step: int, plan: RolloutPlan, plan_info: dict, rolled: StepRollout, adv: Advantages,
                stats: UpdateStats, train_seconds: float) -> dict:
        """The step's ``metrics.jsonl`` row (without eval and ``step_seconds``): the update's loss
        metrics and the timings (averaged over processes), the rewards, then the strategy's keys."""
        cfg, acc, trained, rewards = self.cfg, self.accelerator, adv.trained_advantages, adv.rewards
        local = {k: v / max(stats.micro_batches, 1) for k, v in stats.sums.items()}
        local.update({
            "advantage_abs_mean": float(trained.abs().mean()) if trained.numel() else 0.0,
            "rollout_seconds": rolled.timings["rollout_seconds"], "train_seconds": train_seconds,
            "reward_seconds": rolled.timings["reward_seconds"], "reward_wait_seconds": rolled.timings["reward_wait_seconds"],
        })
        values = mean_across_processes(acc, local)
        values.update({
            "reward_mean": float(rewards.combined.mean()),
            "reward_std": float(rewards.combined.std(unbiased=False)),
            **({f"reward/{k}": float(v.mean()) for k, v in rewards.scores.items()} if len(rewards.scores) > 1 else {}),
            "zero_std_group_fraction": zero_std_group_fraction(rewards.combined, rewards.groups),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "model_rows": rolled.rollout.model_rows,
            "nonfinite_skipped": stats.skipped,
            "images_seen": step * cfg.prompts_per_step * cfg.group_size * acc.num_processes,
        })
        values.update(self.strategy.metrics(plan, plan_info, adv, stats))
        return values

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


def train_online(cfg: GRPOConfig) -> dict:
    """Run an online method (``grpo``, ``nft``, ``awm``; see :class:`OnlineRecipe`)."""
    return OnlineRecipe(cfg).setup().train()
