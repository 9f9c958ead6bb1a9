"""The offline pair trainer: every registered offline method (Diffusion-DPO, MaPO, SFT, KTO,
DCPO, TPO, IPO, CoPG, InPO, ...; see :mod:`diffalign.losses.methods`).

One loop for every model family and every method. Per optimizer step:

1. a batch (:mod:`diffalign.data.batches`) of the data variant the method reads -> VAE latents
   and prompt conditioning. By default pairs come from the latent cache
   (:mod:`diffalign.data.cache`: VAE moments and prompt embeddings computed once, the VAE and text
   encoders then freed), which changes no number of the estimator;
2. one timestep and one noise draw per pair, shared by its chosen and rejected latents: by
   default from this process's generator (:func:`.common.rank_generator`) in batch order; with
   ``data_opts.per_sample_draws`` from a generator keyed by the pair's (seed, epoch, data row)
   (:func:`diffalign.data.cache.keyed_pair_draws`), so the draws, and with the stream's
   round-robin dealing the steps, do not depend on the process count or the accumulation split;
3. chosen and rejected concatenated into **one** forward of the trained model;
4. the reference forward when the method needs it: the same network with LoRA disabled (or a
   frozen copy), under ``torch.inference_mode`` (no autograd bookkeeping);
5. the method's loss on the per-sample MSEs; backward; clip; step.

Metrics stay on the device between log steps (``log_every``): only logged steps copy them to the host.

Multi-process: DDP, or FSDP (``accelerate/fsdp``), which shards the denoiser in place at
``prepare``; the trainable parameters are re-read from the prepared module, the reference pass of
a sharded network runs under ``no_grad``, and checkpoints and the saved weights are gathered
(:mod:`.checkpoint`, :func:`.common.gathered_copy`).

The method's class says what differs (reference, data variant, noising, default beta); this
module names no method.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm.auto import tqdm

from ..data.batches import CachedPairBatch, PairBatch, UnpairedBatch
from ..data.cache import (
    cache_applies, cached_dataloader, fixed_pair_draws, keyed_image_draws, keyed_pair_draws, resolve_cache_dir,
)
from ..data.variants import variant_dataloader
from ..logging import info, is_quiet
from ..losses import per_sample_mse
from ..losses.methods import OfflineMethod, PairMSEs, offline_method
from ..models import cat_cond
from ..optim_step import count_nonfinite, guarded_step
from .checkpoint import Checkpointer
from .ema import ema_weights, make_ema
from .common import (
    MetricsLogger, Timer, build_trainable, is_sharded_tensor, make_optimizer, mean_across_processes, rank_generator,
    save_final, setup_accelerator, sharding_line, sharding_summary, sum_across_processes, trainable_parameters,
)
from .pair_config import PairLossOptions, PairTrainConfig


def pair_loss(cfg: PairTrainConfig, mse_w, mse_l, ref_w=None, ref_l=None, num_train_timesteps: int = 1000, batch=None):
    """The method's loss on per-sample MSEs from :func:`pair_forward`: ``cfg``'s method object
    called on them. For unpaired batches ``*_w`` / ``*_l`` are the desirable / undesirable
    images' MSEs; ``batch`` carries what a method may read besides (CoPG's rewards)."""
    return cfg.build_objective(num_train_timesteps)(PairMSEs(mse_w, mse_l, ref_w, ref_l), batch)


# ------------------------------------------------------------------------------ forward
def _noised(adapter, reference, latents, noise, timesteps, cond, cfg):
    """(x_t, target): random forward noising, or InPO's inversion of the reference (no_grad)."""
    if cfg is not None and cfg.noising == "ddim_inversion":
        from .inversion import inverted_input_and_target

        return inverted_input_and_target(adapter, latents, timesteps, cond, cfg.loss.inversion_steps, reference)
    return adapter.noisy_input_and_target(latents, noise, timesteps)


def reference_mse(adapter, reference, x_t, timesteps, cond, target) -> torch.Tensor:
    """Per-sample MSEs of the reference (``reference``, or the trained network with its
    adapters disabled when None), under ``torch.inference_mode``; returned as an ordinary tensor
    (a clone made outside inference mode), so the loss may use it in autograd. A network sharded
    by FSDP runs under ``torch.no_grad`` instead: FSDP reuses its all-gather buffers in the
    policy's forward, and a buffer made in inference mode cannot be written outside it."""
    net = reference if reference is not None else adapter.denoiser
    with torch.no_grad() if is_sharded_tensor(next(net.parameters(), None)) else torch.inference_mode():
        if reference is None:
            with adapter.adapters_disabled(adapter.denoiser):
                ref_pred = adapter.predict(x_t, timesteps, cond)
        else:
            ref_pred = adapter.predict(x_t, timesteps, cond, denoiser=reference)
        mse = per_sample_mse(ref_pred, target)
    return mse.clone()


def pair_forward(adapter, net, reference, batch, generator, method: str | type[OfflineMethod], cfg) -> PairMSEs:
    """Per-sample MSEs ``(model_w, model_l, ref_w, ref_l)`` for one batch; the refs are None
    unless the method (a name or a method class) needs the reference.

    :class:`PairBatch` / :class:`CachedPairBatch`: chosen and rejected share one timestep and
    one noise draw per pair, in one forward; each side is conditioned on its own captions. A
    :class:`CachedPairBatch` that carries reference losses uses its pairs' fixed draws.
    :class:`UnpairedBatch`: the desirable images' MSEs as ``*_w``, the undesirable ones' as ``*_l``.
    """
    method = offline_method(method) if isinstance(method, str) else method
    return _forward(adapter, net, reference, batch, generator, method.needs_reference, cfg)


def _forward(adapter, net, reference, batch, generator, with_reference: bool, cfg) -> PairMSEs:
    if isinstance(batch, UnpairedBatch):
        return _unpaired_forward(adapter, net, reference, batch, generator, cfg)
    if isinstance(batch, CachedPairBatch) and batch.has_reference:
        return _fixed_draws_forward(adapter, net, batch)
    return _paired_forward(adapter, net, reference, batch, generator, with_reference, cfg)


def _paired_forward(adapter, net, reference, batch: PairBatch | CachedPairBatch, generator, with_reference, cfg) -> PairMSEs:
    device = adapter.device
    if getattr(batch, "sample_seed", None) is not None:  # data_opts.per_sample_draws: each pair's own seed
        cond, cond_l = batch.conds(adapter)
        latents, noise2, t2 = keyed_pair_draws(adapter, batch.sample_seed.tolist(), *batch.moments(adapter))
        noise2, t2 = noise2.to(device), t2.to(device)
    else:  # this process's generator, in batch order (the posterior samples: the global RNG)
        latents, cond, cond_l = batch.latents_and_cond(adapter)
        n = len(batch)
        noise = torch.randn(latents[:n].shape, generator=generator).to(device)
        timesteps = adapter.sample_timesteps(n, generator=generator).to(device)
        noise2, t2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    cond2 = cat_cond(cond, cond_l)
    x_t, target = _noised(adapter, reference, latents, noise2, t2, cond2, cfg)
    # The reference first: its forward's buffers are gone before the policy's activations are
    # held for backward, so the step's peak memory does not stack the two.
    ref = reference_mse(adapter, reference, x_t, t2, cond2, target) if with_reference else None
    mse_w, mse_l = per_sample_mse(adapter.predict(x_t, t2, cond2, denoiser=net), target).chunk(2)
    if ref is None:
        return PairMSEs(mse_w, mse_l)
    ref_w, ref_l = ref.chunk(2)
    return PairMSEs(mse_w, mse_l, ref_w, ref_l)


def _fixed_draws_forward(adapter, net, batch: CachedPairBatch) -> PairMSEs:
    """The cached-reference estimator: each pair's fixed draws, its reference losses precomputed."""
    cond = {k: v.to(adapter.device) for k, v in batch.cond.items()}
    latents, noise2, t2 = fixed_pair_draws(adapter, batch)
    cond2 = cat_cond(cond, cond)
    x_t, target = adapter.noisy_input_and_target(latents, noise2, t2)
    mse_w, mse_l = per_sample_mse(adapter.predict(x_t, t2, cond2, denoiser=net), target).chunk(2)
    return PairMSEs(mse_w, mse_l, batch.ref_w.to(mse_w.device), batch.ref_l.to(mse_l.device))


def _unpaired_forward(adapter, net, reference, batch: UnpairedBatch, generator, cfg) -> PairMSEs:
    device = adapter.device
    cond = adapter.encode_prompt(batch.captions)
    if getattr(batch, "sample_seed", None) is not None:  # data_opts.per_sample_draws
        mean, std = adapter.encode_moments(batch.pixels.to(device))
        latents, noise, timesteps = keyed_image_draws(adapter, batch.sample_seed.tolist(), mean, std)
        noise, timesteps = noise.to(device), timesteps.to(device)
    else:
        latents = adapter.encode_images(batch.pixels.to(device), generator=None)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = adapter.sample_timesteps(len(batch), generator=generator).to(device)
    x_t, target = _noised(adapter, reference, latents, noise, timesteps, cond, cfg)
    mse = per_sample_mse(adapter.predict(x_t, timesteps, cond, denoiser=net), target)
    d = batch.desirable.to(mse.device)
    ref = reference_mse(adapter, reference, x_t, timesteps, cond, target)
    return PairMSEs(mse[d], mse[~d], ref[d], ref[~d])


# ------------------------------------------------------------------------------ the recipe
class PairRecipe:
    """The offline pair training loop: ``PairRecipe(cfg).setup()`` builds the model, optimizer,
    data and checkpointer (resuming when asked); ``train()`` runs the steps and saves the result."""

    def __init__(self, cfg: PairTrainConfig) -> None:
        self.cfg = cfg

    def setup(self) -> PairRecipe:
        cfg = self.cfg
        self.accelerator = setup_accelerator(cfg)
        # Training from the latent cache needs no VAE or text encoder: they are not loaded at all
        # (the cache build, on a first run, loads them for itself).
        self.cached, self.uncached_reason = cache_applies(cfg)
        self.adapter, self.params, self.reference = build_trainable(cfg, self.accelerator, encoders=not self.cached)
        optimizer, lr_scheduler = make_optimizer(cfg, self.params, self.accelerator)
        loader = self._dataloader()
        self.net, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.adapter.denoiser, optimizer, lr_scheduler)
        # FSDP replaces the parameters with sharded ones (DTensors) in prepare: clipping must see those.
        # Elsewhere (one process, DDP) these are the same objects, in the same order.
        self.params = trainable_parameters(self.net)
        line = sharding_line(sharding_summary(self.accelerator, self.net), self.accelerator.num_processes)
        if line and self.accelerator.is_main_process:
            info(line)
        self.generator = rank_generator(cfg.seed, self.accelerator)
        self._resume(loader)
        self.timer = Timer()
        return self

    def train(self) -> dict:
        cfg = self.cfg
        progress = tqdm(range(self.start_step, cfg.max_steps + 1), initial=self.start_step - 1, total=cfg.max_steps,
                        desc=f"{cfg.method}", disable=not self.accelerator.is_main_process or is_quiet())
        since_log = 0
        for step in progress:
            sums, skipped_step, skipped_update = self._accumulate()
            self._count_nonfinite(skipped_update)
            self._count_skipped_rows(skipped_step)
            since_log += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                values = self._step_values(step, sums, skipped_update, since_log)
                since_log = 0
                self.logger.log(step, values)
                progress.set_postfix(loss=f"{values['loss']:.4g}", acc=f"{values.get('implicit_acc', float('nan')):.2f}")
            self.ckpt.maybe_save(step, {"skipped_total": self.skipped_total, "nonfinite_in_a_row": self.nonfinite_in_a_row},
                                 self.batches_consumed)
        return self._finish()

    # -------------------------------------------------------------------------- setup parts
    def _dataloader(self):
        """The latent cache's loader (the default; the VAE and text encoders, if a cache build
        loaded them, are freed after it), or the data variant's pixel loader when the cache does
        not apply."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.cached:
            loader = cached_dataloader(cfg, self.adapter, accelerator, resolve_cache_dir(cfg, self.adapter))
            self.adapter.release_encoders()
            return loader
        if accelerator.is_main_process and not is_quiet():
            print(f"latent cache off ({self.uncached_reason}): the VAE and text encoders run on every batch", file=sys.stderr)
        return variant_dataloader(cfg, rank=accelerator.process_index, world_size=accelerator.num_processes)

    def _resume(self, loader) -> None:
        cfg = self.cfg
        # Before any restore: creating a DataLoader iterator draws from the global RNG (its base seed).
        # The stream's own position is applied lazily, on the first next().
        self.data_iter = iter(loader)
        stream = loader.dataset if cfg.data_opts.num_workers == 0 else None
        self.ema = make_ema(cfg.ema, self.accelerator.unwrap_model(self.net))  # the saved weights are its
        self.ckpt = Checkpointer(cfg, self.accelerator, self.net, self.optimizer, self.lr_scheduler, self.generator, stream,
                                 ema=self.ema)
        self.start_step, resumed = self.ckpt.resume()
        self.logger = MetricsLogger(self.accelerator, cfg.output_dir, resume=self.start_step > 1)
        for _ in range(resumed.get("batches_consumed", 0)):  # workers > 0: replay the stream to its position
            next(self.data_iter)
        self.batches_consumed = (self.start_step - 1) * cfg.gradient_accumulation_steps
        self.skipped_total: dict[str, int] = resumed.get("skipped_total", {})
        self.nonfinite_in_a_row: int = resumed.get("nonfinite_in_a_row", 0)

    # -------------------------------------------------------------------------- one step
    def _accumulate(self) -> tuple[dict[str, float], dict[str, int], bool]:
        """One optimizer step over ``gradient_accumulation_steps`` batches: (metric means as
        device tensors, rows skipped by the data stream, whether a NaN/inf skipped an update)."""
        cfg = self.cfg
        sums: dict[str, float] = {}
        skipped_step: dict[str, int] = {}
        skipped_update = False
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(self.data_iter)
            self.batches_consumed += 1
            for k, v in batch.skipped.items():
                skipped_step[k] = skipped_step.get(k, 0) + v
            with self.accelerator.accumulate(self.net):
                loss, metrics = self._loss(batch)
                stepped, grad_norm = self._optimizer_step(loss)
                if self.ema is not None and stepped and self.accelerator.sync_gradients:
                    self.ema.step()
            skipped_update = skipped_update or not stepped
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / cfg.gradient_accumulation_steps
            if grad_norm is not None:
                sums["grad_norm"] = grad_norm
        return sums, skipped_step, skipped_update

    def _loss(self, batch):
        mses = pair_forward(self.adapter, self.net, self.reference, batch, self.generator, self.cfg.objective, self.cfg)
        return pair_loss(self.cfg, *mses, self.adapter.num_train_timesteps, batch=batch)

    def _optimizer_step(self, loss: torch.Tensor):
        """The shared guarded step (:mod:`diffalign.optim_step`): no backward on a NaN/inf loss (on
        any rank), no step on a NaN/inf gradient norm. Returns (stepped, grad_norm)."""
        res = guarded_step(self.accelerator, loss, self.params, self.optimizer, self.lr_scheduler,
                           self.cfg.optim.max_grad_norm)
        return not res.skipped, res.grad_norm

    def _count_nonfinite(self, skipped_update: bool) -> None:
        self.nonfinite_in_a_row = count_nonfinite(
            self.nonfinite_in_a_row, skipped_update, self.cfg.loss.max_nonfinite_steps, "optimizer steps",
            "likely causes: learning rate too high, fp16 overflow (try mixed_precision=bf16 or no), or corrupt data")

    def _count_skipped_rows(self, skipped_step: dict) -> None:
        for k, v in sum_across_processes(self.accelerator, skipped_step).items():
            self.skipped_total[k] = self.skipped_total.get(k, 0) + v

    def _step_values(self, step: int, sums: dict, skipped_update: bool, steps_since_log: int) -> dict:
        """The logged step's ``metrics.jsonl`` row: its metrics copied to the host and averaged over
        processes, plus the counters; ``step_seconds`` is the mean over the steps since the last row."""
        cfg, accelerator = self.cfg, self.accelerator
        values = mean_across_processes(accelerator, {k: float(v) for k, v in sums.items()})
        values.update({
            "lr": self.lr_scheduler.get_last_lr()[0],
            "beta": cfg.beta,
            "nonfinite_skipped": int(skipped_update),
            "skipped_rows": sum(self.skipped_total.values()),
            **{f"skipped_rows/{k}": v for k, v in sorted(self.skipped_total.items())},
            "pairs_seen": step * cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
            "step_seconds": self.timer.lap() / steps_since_log,
        })
        return values

    def _finish(self) -> dict:
        cfg, accelerator = self.cfg, self.accelerator
        with ema_weights(self.ema):
            info = save_final(cfg, accelerator, self.adapter, self.net, self.logger.last, cfg.method)
        if accelerator.is_main_process and self.skipped_total:
            used = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
            print(skipped_rows_line(self.skipped_total, used))
        accelerator.end_training()
        return {"final": self.logger.last, **info}


def train_pairs(cfg: PairTrainConfig) -> dict:
    """Run the pair trainer (:class:`PairRecipe`) on ``cfg``."""
    return PairRecipe(cfg).setup().train()


SKIP_REASONS = {"bad_image": "undecodable image", "bad_caption": "missing or non-text caption",
                "bad_label": "unusable preference label", "unlabeled": "no preference label",
                "tie": "tie (data_opts.drop_ties)", "identical": "identical images (data_opts.drop_identical)"}


def skipped_rows_line(skipped: dict[str, int], used: int) -> str:
    """One console line for the rows the data stream skipped (metrics.jsonl counts them per step)."""
    total = sum(skipped.values())
    reasons = sorted(skipped.items(), key=lambda kv: -kv[1])
    if len(reasons) == 1:
        why = SKIP_REASONS.get(reasons[0][0], reasons[0][0])
    else:
        why = ", ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in reasons)
    # says which rows it counts: those training read, not the dataset or the cache (whose pair
    # count is printed when the cache is read and is usually larger)
    return (f"skipped {total} of the {total + used} rows training read for its {used} pairs: {why} "
            "(counted in metrics.jsonl skipped_rows)")


@torch.no_grad()
def pair_margins(adapter, batch, seed: int = 0, repeats: int = 4) -> dict[str, torch.Tensor]:
    """Per-pair denoising-error margins ``L_w - L_l`` of the model and of its LoRA-free reference,
    averaged over ``repeats`` fixed (timestep, noise) draws. Negative = the chosen image is
    denoised better. A held-out check of what DPO/MaPO/SFT learned, independent of the loss.
    """
    g = torch.Generator().manual_seed(seed)
    if getattr(batch, "sample_seed", None) is not None:  # fresh draws per repeat, not each pair's own
        batch = dataclasses.replace(batch, sample_seed=None)
    model_m, ref_m = [], []
    for _ in range(repeats):
        mse_w, mse_l, ref_w, ref_l = _forward(adapter, adapter.denoiser, None, batch, g, True, None)
        model_m.append(mse_w - mse_l)
        ref_m.append(ref_w - ref_l)
    model_margin, ref_margin = torch.stack(model_m).mean(0), torch.stack(ref_m).mean(0)
    return {"model_margin": model_margin, "ref_margin": ref_margin,
            "implicit_acc": (model_margin < ref_margin).float().mean()}


__all__ = [
    "PairLossOptions", "PairRecipe", "PairTrainConfig", "pair_forward", "pair_loss", "pair_margins", "reference_mse",
    "skipped_rows_line", "train_pairs",
]
