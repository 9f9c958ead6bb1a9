"""The forward-process strategy of the online loop: DiffusionNFT (``method: nft``) and AWM (``method: awm``).

Inside the loop of :class:`~diffalign.trainers.online.OnlineRecipe` (prompts, groups, rewards,
advantages, evaluation, checkpoints, logging), :class:`ForwardProcessStrategy` supplies:

1. the rollout: *deterministic* sampling with ``sampler.ode_solver`` (any solver; both papers sample
   with an ODE; ``forward.sde_rollouts`` takes the sampler's stochastic step instead) and independent
   initial noise. DiffusionNFT samples with its "old" policy (a slowly updated copy of the trained
   weights, :meth:`~ForwardProcessStrategy.sampling_weights`); AWM with the current one. Only the
   clean final latents are used: no trajectory, no log-probs.
2. :meth:`~ForwardProcessStrategy.advantages`: one advantage per image (group-normalised as in GRPO).
3. :meth:`~ForwardProcessStrategy.update`: every image is re-noised by the forward process at
   ``forward.train_timesteps`` steps of the sampling table (fresh noise), and the method's loss
   (:mod:`diffalign.losses.forward`) is minimised on those rows in ``updates_per_epoch`` guarded
   optimizer steps per pass. After the step DiffusionNFT moves its old policy towards the trained
   weights (``nft.old_decay_*``); AWM with ``awm.ema_beta > 0`` moves its EMA-KL anchor, a
   lagging copy of the trained weights whose velocity the loss is pulled towards
   (``awm.kl_ema_*``).

Both methods need a flow-matching model (their losses are defined on the rectified-flow velocity).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

from ..config import ConfigError
from ..losses.forward import (awm_log_prob, awm_policy_loss, kl_ema_decay, nft_loss, nft_optimality, old_policy_decay,
                              velocity_kl)
from ..pipelines import DeterministicStep, GuidedModel, RolloutPlan, StepKind, make_step_kind, split_prediction
from ..tensors import per_row
from .forward_config import train_step_pool
from .strategy import Advantages, OnlineStrategy, StepRewards, StepRollout, UpdateStats


@dataclass
class NoisedRows:
    """Training rows: image ``sample`` re-noised at table step ``step`` with ``noise``."""

    sample: torch.Tensor  # [R] index into the step's images
    step: torch.Tensor  # [R] index into the sampling table
    noise: torch.Tensor  # [R, C, H, W]
    old_log_prob: torch.Tensor | None = None  # [R] AWM: log-prob under the weights of the rollout

    def __getitem__(self, idx: torch.Tensor) -> NoisedRows:
        return NoisedRows(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                             for f in fields(self)})


@dataclass
class ImageAdvantages(Advantages):
    """The step's clean images with their advantages (this process)."""

    final: torch.Tensor  # [L, C, H, W] clean latents
    prompt: torch.Tensor  # [L] prompt index (into the step's conditioning)
    advantage: torch.Tensor  # [L]

    @property
    def trained_advantages(self) -> torch.Tensor:
        return self.advantage


def draw_train_steps(num_images: int, num_steps: int, cfg_forward, generator: torch.Generator) -> torch.Tensor:
    """Table steps each image is trained at: ``[num_images, K]``.

    The pool ``[first, end)`` and ``K`` come from :func:`~.forward_config.train_step_pool`
    (``first = 1`` when ``skip_first_step``). ``per_sample``: each image its own ``K`` distinct
    steps of the pool, uniformly at random; with ``fraction_mode: count`` the pool is the whole
    table and ``K = int(N * timestep_fraction)`` (DiffusionNFT's per-sample shuffle of all ``N``
    steps, of which the first ``K`` train), with ``range`` the pool is the first
    ``int(N * timestep_fraction)`` steps. ``stratified``: the range cut into ``K`` equal strata, one
    uniform step from each, the same for every image (AWM's ``discrete`` time types).
    """
    first, end, k = train_step_pool(num_steps, cfg_forward)
    if cfg_forward.timestep_draw == "per_sample":
        keys = torch.rand((num_images, end - first), generator=generator)
        return keys.argsort(dim=1)[:, :k] + first
    bounds = torch.linspace(first, end, k + 1)
    lo, hi = bounds[:-1].long(), bounds[1:].long()
    pick = lo + (torch.rand(k, generator=generator) * (hi - lo).float()).long()
    pick = torch.minimum(pick, torch.full_like(pick, end - 1))
    return pick.unsqueeze(0).expand(num_images, k).clone()


class ForwardProcessStrategy(OnlineStrategy):
    """DiffusionNFT / AWM on the re-noised clean images (see the module docstring)."""

    # ---- setup
    def check_model(self) -> None:
        loop = self.loop
        if not loop.adapter.is_flow:
            raise ConfigError(f"config key 'model': method {loop.cfg.method} trains a flow-matching model "
                              f"(SD3/FLUX-style); {loop.cfg.model!r} is a {loop.adapter.family} model")

    def step_kind(self) -> StepKind:
        # ODE rollouts: every step runs the solver; sde_rollouts: the sampler's stochastic step (no
        # log-prob is used, only the final images)
        s = self.loop.cfg.sampler
        return (make_step_kind(s.step, s.noise_level, True, s.cps_logprob) if self.loop.cfg.forward.sde_rollouts
                else DeterministicStep(0.0))

    def setup(self) -> None:
        cfg, params = self.loop.cfg, self.loop.params
        # DiffusionNFT's old (sampling) policy starts as the (possibly resumed) trained weights
        self.old_params = [p.detach().clone() for p in params] if cfg.method == "nft" else None
        # AWM's EMA-KL anchor (the release's "ema" adapter) starts as the trained weights too
        self.kl_ema_params = ([p.detach().clone() for p in params]
                              if cfg.method == "awm" and cfg.awm.ema_beta > 0 else None)
        self.optimizer_steps = 0

    @contextlib.contextmanager
    def swapped_weights(self, values: list[torch.Tensor] | None):
        """``values`` swapped into the trained parameters for the block (no copy); None: as is."""
        if values is None:
            yield
            return
        params = self.loop.params
        current = [p.data for p in params]
        for p, v in zip(params, values):
            p.data = v
        try:
            yield
        finally:
            for p, cur in zip(params, current):
                p.data = cur

    def sampling_weights(self):
        """DiffusionNFT: the old policy's weights swapped into the network (no copy); AWM: as is."""
        return self.swapped_weights(self.old_params)

    # ---- advantages and the update
    def advantages(self, rolled: StepRollout, rewards: StepRewards, step: int) -> ImageAdvantages:
        """One advantage per final image (the last depth; there is no tree)."""
        ro = rolled.rollout
        return ImageAdvantages(rewards, ro.final, ro.prompt_index, rewards.per_depth[-1].to(self.loop.device))

    def update(self, model: GuidedModel, adv: ImageAdvantages) -> UpdateStats:
        """Re-noise every image at its training steps; ``inner_epochs`` shuffled passes over the
        rows (with ``awm.loss_type: sum_first`` whole samples), ``updates_per_epoch`` guarded optimizer
        steps each; then the old-policy (NFT) or EMA-KL anchor (AWM) decay."""
        loop, cfg = self.loop, self.loop.cfg
        num_images = adv.final.shape[0]
        steps = draw_train_steps(num_images, loop.table.num_steps, cfg.forward, loop.generator)
        k = steps.shape[1]
        sample_idx = torch.arange(num_images).repeat_interleave(k)  # rows are sample-major
        rows = NoisedRows(sample_idx.to(loop.device), steps.reshape(-1).to(loop.device),
                          torch.randn((sample_idx.shape[0], *loop.latent_shape), generator=loop.generator).to(loop.device))
        if cfg.method == "awm" and cfg.inner_epochs * cfg.updates_per_epoch > 1:
            rows.old_log_prob = self._awm_log_probs(model, adv, rows)  # later updates are off-policy
        whole_samples = cfg.method == "awm" and cfg.awm.loss_type == "sum_first"
        stats = UpdateStats()
        for _epoch in range(cfg.inner_epochs):
            if whole_samples:  # shuffle samples, keep each sample's rows together (one ratio per sample)
                sperm = torch.randperm(num_images, generator=loop.generator)
                splits = [(s[:, None] * k + torch.arange(k)).reshape(-1).to(loop.device)
                          for s in torch.tensor_split(sperm, cfg.updates_per_epoch)]
            else:
                perm = torch.randperm(sample_idx.shape[0], generator=loop.generator).to(loop.device)
                splits = torch.tensor_split(perm, cfg.updates_per_epoch)
            for uidx in splits:
                if uidx.numel():
                    taken = loop.guarded_update(uidx, lambda midx: self.rows_loss(model, adv, rows[midx]), stats)
                    self.optimizer_steps += int(taken)
        self._decay_old_policy()
        self._decay_kl_ema()
        return stats

    # ---- pieces of the update
    def _noised(self, adv: ImageAdvantages, batch: NoisedRows):
        table = self.loop.table
        co = table.coeffs(batch.step)
        x0 = adv.final[batch.sample].float()
        x_t = per_row(co.alpha, x0) * x0 + per_row(co.sigma, x0) * batch.noise
        return x0, x_t, co, table.timesteps.to(self.loop.device)[batch.step], adv.prompt[batch.sample]

    def rows_loss(self, model: GuidedModel, adv: ImageAdvantages, batch: NoisedRows):
        """The method's loss on ``batch`` (+ the velocity KL). Returns ``(loss, metrics)``."""
        loop, cfg = self.loop, self.loop.cfg
        x0, x_t, co, t, prompt = self._noised(adv, batch)
        out = model(x_t, t, prompt, loop.policy.wrapped)
        a = adv.advantage[batch.sample]
        if cfg.method == "nft":
            with torch.no_grad(), self.sampling_weights():
                out_old = model(x_t, t, prompt, loop.policy.module)
            x0_theta, _ = split_prediction(out, x_t, co.alpha, co.sigma, loop.table.parametrization)
            x0_old, _ = split_prediction(out_old, x_t, co.alpha, co.sigma, loop.table.parametrization)
            n = cfg.nft
            per, metrics = nft_loss(x0_theta, x0_old, x0, nft_optimality(a, n.adv_clip_max), n.beta,
                                    adaptive_weight=n.adaptive_weight)
            loss = per.mean() * (n.loss_scale if n.loss_scale is not None else n.adv_clip_max)
            metrics = {**metrics, "policy_loss": loss.detach()}
        else:
            w = cfg.awm
            log_prob = awm_log_prob(out, batch.noise, x0, co.sigma, w.weighting, w.ghuber_power)
            old = batch.old_log_prob if batch.old_log_prob is not None else log_prob.detach()
            loss, metrics = awm_policy_loss(log_prob, old, self._awm_advantage(a), w.clip_range, w.loss_type,
                                            batch.sample)
        if cfg.forward.kl_beta > 0:
            with torch.no_grad():
                ref = loop.policy.reference_output(loop.adapter, model, x_t, t, prompt)
            kl = velocity_kl(out, ref).mean()
            loss = loss + cfg.forward.kl_beta * kl
            metrics["kl"] = kl.detach()
        if self.kl_ema_params is not None:  # AWM's EMA-KL: towards the lagging EMA copy of the weights
            with torch.no_grad(), self.swapped_weights(self.kl_ema_params):
                out_ema = model(x_t, t, prompt, loop.policy.module)
            ema_kl = velocity_kl(out, out_ema).mean()
            loss = loss + cfg.awm.ema_beta * ema_kl
            metrics["ema_kl"] = ema_kl.detach()
        return loss, metrics

    def _awm_advantage(self, a: torch.Tensor) -> torch.Tensor:
        clip, top = self.loop.cfg.advantage.clip, self.loop.cfg.awm.advantage_max
        return a if top is None else a / clip * top

    @torch.no_grad()
    def _awm_log_probs(self, model: GuidedModel, adv: ImageAdvantages, rows: NoisedRows) -> torch.Tensor:
        loop = self.loop
        w, out = loop.cfg.awm, []
        for idx in torch.split(torch.arange(rows.sample.shape[0], device=loop.device),
                               loop.cfg.train_batch_size or loop.cfg.batch_size):
            batch = rows[idx]
            x0, x_t, co, t, prompt = self._noised(adv, batch)
            pred = model(x_t, t, prompt, loop.policy.module)
            out.append(awm_log_prob(pred, batch.noise, x0, co.sigma, w.weighting, w.ghuber_power))
        return torch.cat(out)

    def old_policy_decay_now(self) -> float:
        n = self.loop.cfg.nft
        return old_policy_decay(self.optimizer_steps, n.old_decay_rate, n.old_decay_cap, n.old_decay_delay)

    @torch.no_grad()
    def _decay_old_policy(self) -> None:
        """DiffusionNFT: ``theta_old <- d * theta_old + (1 - d) * theta`` after the step's updates."""
        if self.old_params is None:
            return
        d = self.old_policy_decay_now()
        for old, p in zip(self.old_params, self.loop.params):
            old.mul_(d).add_(p.detach(), alpha=1.0 - d)

    def kl_ema_decay_now(self) -> float:
        w = self.loop.cfg.awm
        return kl_ema_decay(self.optimizer_steps, w.kl_ema_decay, w.kl_ema_decay_type, w.kl_ema_decay_rate)

    @torch.no_grad()
    def _decay_kl_ema(self) -> None:
        """AWM: ``theta_ema <- d * theta_ema + (1 - d) * theta`` after the step's updates."""
        if self.kl_ema_params is None:
            return
        d = self.kl_ema_decay_now()
        for e, p in zip(self.kl_ema_params, self.loop.params):
            e.mul_(d).add_(p.detach(), alpha=1.0 - d)

    # ---- metrics
    def metrics(self, plan: RolloutPlan, plan_info: dict, adv: ImageAdvantages, stats: UpdateStats) -> dict:
        """The decays the step ended with (NFT's old policy, AWM's EMA-KL anchor)."""
        out = {}
        if self.old_params is not None:
            out["old_policy_decay"] = self.old_policy_decay_now()
        if self.kl_ema_params is not None:
            out["kl_ema_decay"] = self.kl_ema_decay_now()
        return out
