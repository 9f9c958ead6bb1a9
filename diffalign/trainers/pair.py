"""The offline pair trainer: Diffusion-DPO, MaPO, SFT-on-chosen, KTO, DCPO, TPO, IPO, CoPG, InPO.

One loop for every model family and every pair method. Per optimizer step:

1. a batch of (chosen, rejected, caption) pairs -> VAE latents and prompt conditioning;
2. one timestep and one noise draw per pair, shared by its chosen and rejected latents;
3. chosen and rejected concatenated into **one** forward of the trained model;
4. the reference forward (every method but MaPO and SFT): the same network with LoRA
   disabled, under no_grad;
5. the method's loss from ``diffalign.losses`` on per-sample MSEs; backward; clip; step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import BaseTrainConfig, _check
from ..data.variants import PERTURBATIONS, VariantDataOptions, variant_dataloader
from ..logging import is_quiet
from ..losses import (
    diffusion_copg_loss, diffusion_dpo_loss, diffusion_ipo_loss, diffusion_kto_loss, mapo_loss, per_sample_mse, sft_loss,
)
from ..models import cat_cond
from ..data.cache import cached_dataloader
from .checkpoint import Checkpointer
from .common import (
    MetricsLogger, Timer, build_trainable, make_optimizer, mean_across_processes, rank_generator,
    save_final, setup_accelerator, sum_across_processes,
)

PAIR_METHODS = ("dpo", "mapo", "sft", "kto", "dcpo", "tpo", "ipo", "copg", "inpo")
DEFAULT_BETA = {"dpo": 5000.0, "mapo": 0.1, "sft": 0.0, "kto": 5000.0, "dcpo": 5000.0, "tpo": 5000.0,
                "ipo": 5000.0, "copg": 5000.0, "inpo": 5000.0}
# Methods whose loss compares the model with the frozen reference (LoRA off / frozen copy).
REFERENCE_METHODS = ("dpo", "kto", "dcpo", "tpo", "ipo", "copg", "inpo")
# DPO-loss methods: dcpo (dual captions), inpo (inverted x_t), tpo with loss.base dpo.
DPO_LOSS_METHODS = ("dpo", "dcpo", "inpo")
NOISING_MODES = ("random", "ddim_inversion")


@dataclass
class PairLossOptions:
    beta: float | None = None  # None: the method's default (DEFAULT_BETA: dpo-like 5000, mapo 0.1)
    snr_value: float = 0.5  # MaPO's s
    max_nonfinite_steps: int = 5  # abort after this many consecutive NaN/inf steps
    lambda_d: float = 1.0  # KTO: weight of desirable examples
    lambda_u: float = 1.0  # KTO: weight of undesirable examples
    tau: float = 1.0  # IPO: target log-ratio margin 1/(2 tau)
    base: str = "dpo"  # TPO: dpo | kto loss on the caption pairs
    reward_chosen: float = 1.0  # CoPG: rewards when the batch carries none
    reward_rejected: float = 0.0
    noising: str | None = None  # random | ddim_inversion (InPO); None: ddim_inversion for inpo, else random
    inversion_steps: int = 4  # DDIM/Euler inversion steps for noising=ddim_inversion
    # Estimator variant (needs data_opts.cache_dir): one fixed (timestep, noise) per pair, and the
    # reference's losses at it computed once into the cache; no reference forward while training.
    cached_reference: bool = False


@dataclass
class PairTrainConfig(BaseTrainConfig):
    """Config of ``method: dpo | mapo | sft | kto | dcpo | tpo | ipo | copg | inpo``."""

    method: str = "dpo"
    data_opts: VariantDataOptions = field(default_factory=VariantDataOptions)
    loss: PairLossOptions = field(default_factory=PairLossOptions)

    @property
    def beta(self) -> float:
        return self.loss.beta if self.loss.beta is not None else DEFAULT_BETA[self.method]

    @property
    def noising(self) -> str:
        if self.loss.noising is not None:
            return self.loss.noising
        return "ddim_inversion" if self.method == "inpo" else "random"

    @property
    def loss_kind(self) -> str:
        """The loss that runs: dpo | mapo | sft | kto | ipo | copg."""
        if self.method in DPO_LOSS_METHODS:
            return "dpo"
        if self.method == "tpo":
            return self.loss.base
        return self.method

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS or self.noising == "ddim_inversion"

    def validate(self) -> None:
        super().validate()
        _check(self.method in PAIR_METHODS, "method", f"the pair trainer runs {', '.join(PAIR_METHODS)}")
        _check(self.data is not None, "data", "is required (hub id, dataset dir or parquet)")
        _check(self.loss.beta is None or self.loss.beta > 0 or self.method == "sft", "loss.beta", "must be > 0")
        _check(self.loss.snr_value > 0, "loss.snr_value", "must be > 0")
        _check(self.loss.lambda_d >= 0 and self.loss.lambda_u >= 0 and self.loss.lambda_d + self.loss.lambda_u > 0,
               "loss.lambda_d", "KTO weights lambda_d, lambda_u must be >= 0 and not both 0")
        _check(self.loss.tau > 0, "loss.tau", "must be > 0")
        _check(self.loss.base in ("dpo", "kto"), "loss.base", "must be dpo or kto (TPO's loss)")
        _check(self.loss.noising is None or self.loss.noising in NOISING_MODES, "loss.noising",
               f"must be one of {', '.join(NOISING_MODES)}")
        _check(self.loss.inversion_steps >= 1, "loss.inversion_steps", "must be >= 1")
        _check(self.data_opts.caption_perturbation in PERTURBATIONS, "data_opts.caption_perturbation",
               f"must be one of {', '.join(PERTURBATIONS)}")
        _check(0.0 <= self.data_opts.empty_prompt_prob <= 1.0, "data_opts.empty_prompt_prob", "must be in [0, 1]")
        _check(self.data_opts.resolution >= 8, "data_opts.resolution", "must be >= 8")
        if self.loss.cached_reference:
            _check(bool(self.data_opts.cache_dir), "loss.cached_reference", "needs data_opts.cache_dir (the losses live in the cache)")
            _check(self.method in ("dpo", "ipo", "copg"), "loss.cached_reference", "applies to dpo, ipo and copg")


def pair_loss(cfg: PairTrainConfig, mse_w, mse_l, ref_w=None, ref_l=None, num_train_timesteps: int = 1000, batch=None):
    """The method's loss on per-sample MSEs from :func:`pair_forward`. For KTO (and TPO with
    ``loss.base: kto``) ``*_w`` / ``*_l`` are the desirable / undesirable images' MSEs. CoPG takes
    per-pair rewards from ``batch`` (``rewards_w`` / ``rewards_l``) when given, else
    ``loss.reward_chosen`` / ``loss.reward_rejected``."""
    kind = cfg.loss_kind if hasattr(cfg, "loss_kind") else cfg.method
    o = cfg.loss
    if kind == "dpo":
        return diffusion_dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=cfg.beta)
    if kind == "mapo":
        return mapo_loss(mse_w, mse_l, beta=cfg.beta, snr_value=o.snr_value, num_train_timesteps=num_train_timesteps)
    if kind == "kto":
        return diffusion_kto_loss(mse_w, mse_l, ref_w, ref_l, beta=cfg.beta, lambda_d=o.lambda_d, lambda_u=o.lambda_u)
    if kind == "ipo":
        return diffusion_ipo_loss(mse_w, mse_l, ref_w, ref_l, beta=cfg.beta, tau=o.tau)
    if kind == "copg":
        if batch is not None and "rewards_w" in batch:
            rw, rl = batch["rewards_w"].to(mse_w.device), batch["rewards_l"].to(mse_w.device)
        else:
            rw, rl = o.reward_chosen, o.reward_rejected
        return diffusion_copg_loss(mse_w, mse_l, ref_w, ref_l, rw, rl, beta=cfg.beta)
    return sft_loss(mse_w, mse_l)


def _noised(adapter, reference, latents, noise, timesteps, cond, cfg):
    """(x_t, target): random forward noising, or InPO's inversion of the reference (no_grad)."""
    if cfg is not None and getattr(cfg, "noising", "random") == "ddim_inversion":
        from .inversion import inverted_input_and_target

        return inverted_input_and_target(adapter, latents, timesteps, cond, cfg.loss.inversion_steps, reference)
    return adapter.noisy_input_and_target(latents, noise, timesteps)


def fixed_pair_draws(adapter, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [2B], noise [2B], timesteps [2B]) of the cached-reference estimator: pair ``i``
    always gets the posterior samples, noise and timestep drawn from ``Generator(row_seed[i])``,
    so the reference losses stored in the cache belong to exactly this (x_t, t)."""
    means, stds, noises, ts = [], [], [], []
    for i, seed in enumerate(batch["row_seed"].tolist()):
        g = torch.Generator().manual_seed(int(seed))
        t = adapter.sample_timesteps(1, generator=g)
        shape = batch["mean_w"][i].shape
        eps_w, eps_l, noise = (torch.randn(shape, generator=g) for _ in range(3))
        means.append((batch["mean_w"][i] + batch["std_w"][i] * eps_w, batch["mean_l"][i] + batch["std_l"][i] * eps_l))
        noises.append(noise)
        ts.append(t)
    samples = torch.stack([m[0] for m in means] + [m[1] for m in means])
    latents = adapter.scale_latents(samples)
    noise = torch.stack(noises).to(latents.device)
    t = torch.cat(ts).to(latents.device)
    return latents, torch.cat([noise, noise]), torch.cat([t, t])


def _reference_mse(adapter, reference, x_t, timesteps, cond, target):
    with torch.no_grad():
        if reference is None:
            with adapter.adapters_disabled(adapter.denoiser):
                ref_pred = adapter.predict(x_t, timesteps, cond)
        else:
            ref_pred = adapter.predict(x_t, timesteps, cond, denoiser=reference)
        return per_sample_mse(ref_pred, target)


def pair_forward(adapter, net, reference, batch, generator, method: str, cfg):
    """Per-sample MSEs ``(model_w, model_l, ref_w, ref_l)`` for one batch (refs None unless the
    method compares with the reference).

    Pair batches: chosen and rejected share one timestep and one noise draw per pair, in one
    forward. ``captions_l`` (DCPO, TPO) conditions the rejected side on its own caption; a batch
    without ``pixels_l`` (TPO) uses the chosen image's latents on both sides. Unpaired batches
    (``pixels`` + ``desirable``; KTO) return the desirable images' MSEs as ``*_w`` and the
    undesirable ones' as ``*_l``.
    """
    if "desirable" in batch:
        return _unpaired_forward(adapter, net, reference, batch, generator, method, cfg)
    device = adapter.device
    if "ref_w" in batch:  # cached-reference estimator: fixed per-pair draws, reference losses precomputed
        cond = {k: v.to(device) for k, v in batch["cond"].items()}
        latents, noise2, t2 = fixed_pair_draws(adapter, batch)
        cond2 = cat_cond(cond, cond)
        x_t, target = adapter.noisy_input_and_target(latents, noise2, t2)
        mse_w, mse_l = per_sample_mse(adapter.predict(x_t, t2, cond2, denoiser=net), target).chunk(2)
        return mse_w, mse_l, batch["ref_w"].to(mse_w.device), batch["ref_l"].to(mse_l.device)
    if "mean_w" in batch:  # latent cache: precomputed VAE moments and conditioning
        n = batch["mean_w"].shape[0]
        cond = cond_l = {k: v.to(device) for k, v in batch["cond"].items()}
        latents = adapter.latents_from_moments(torch.cat([batch["mean_w"], batch["mean_l"]]),
                                               torch.cat([batch["std_w"], batch["std_l"]]))
    else:
        n = batch["pixels_w"].shape[0]
        cond = adapter.encode_prompt(batch["captions"])
        cond_l = adapter.encode_prompt(batch["captions_l"]) if "captions_l" in batch else cond
    if "mean_w" in batch:
        pass  # latents already sampled from the cached moments above
    elif "pixels_l" in batch:
        latents = adapter.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(device), generator=None)
    else:
        latents_w = adapter.encode_images(batch["pixels_w"].to(device), generator=None)
        latents = torch.cat([latents_w, latents_w])
    noise = torch.randn(latents[:n].shape, generator=generator).to(device)
    timesteps = adapter.sample_timesteps(n, generator=generator).to(device)
    noise2, t2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    cond2 = cat_cond(cond, cond_l)
    x_t, target = _noised(adapter, reference, latents, noise2, t2, cond2, cfg)
    pred = adapter.predict(x_t, t2, cond2, denoiser=net)
    mse_w, mse_l = per_sample_mse(pred, target).chunk(2)
    ref_w = ref_l = None
    if method in REFERENCE_METHODS:
        ref_w, ref_l = _reference_mse(adapter, reference, x_t, t2, cond2, target).chunk(2)
    return mse_w, mse_l, ref_w, ref_l


def _unpaired_forward(adapter, net, reference, batch, generator, method, cfg):
    device = adapter.device
    m = batch["pixels"].shape[0]
    cond = adapter.encode_prompt(batch["captions"])
    latents = adapter.encode_images(batch["pixels"].to(device), generator=None)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = adapter.sample_timesteps(m, generator=generator).to(device)
    x_t, target = _noised(adapter, reference, latents, noise, timesteps, cond, cfg)
    mse = per_sample_mse(adapter.predict(x_t, timesteps, cond, denoiser=net), target)
    d = batch["desirable"].to(mse.device)
    ref = _reference_mse(adapter, reference, x_t, timesteps, cond, target)
    return mse[d], mse[~d], ref[d], ref[~d]


def train_pairs(cfg: PairTrainConfig) -> dict:
    accelerator = setup_accelerator(cfg)
    adapter, params, reference = build_trainable(cfg, accelerator)
    optimizer, lr_scheduler = make_optimizer(cfg, params, accelerator)
    if cfg.data_opts.cache_dir:
        loader = cached_dataloader(cfg, adapter, accelerator)
    else:
        loader = variant_dataloader(cfg, rank=accelerator.process_index, world_size=accelerator.num_processes)
    net, optimizer, lr_scheduler = accelerator.prepare(adapter.denoiser, optimizer, lr_scheduler)
    generator = rank_generator(cfg.seed, accelerator)
    # Before any restore: creating a DataLoader iterator draws from the global RNG (its base seed).
    # The stream's own position is applied lazily, on the first next().
    data_iter = iter(loader)
    stream = loader.dataset if cfg.data_opts.num_workers == 0 else None
    ckpt = Checkpointer(cfg, accelerator, net, optimizer, lr_scheduler, generator, stream)
    start_step, resumed = ckpt.resume()
    logger = MetricsLogger(accelerator, cfg.output_dir, resume=start_step > 1)
    for _ in range(resumed.get("batches_consumed", 0)):  # workers > 0: replay the stream to its position
        next(data_iter)
    batches_consumed = (start_step - 1) * cfg.gradient_accumulation_steps
    skipped_total: dict[str, int] = resumed.get("skipped_total", {})
    nonfinite_in_a_row = resumed.get("nonfinite_in_a_row", 0)
    timer = Timer()

    progress = tqdm(range(start_step, cfg.max_steps + 1), initial=start_step - 1, total=cfg.max_steps,
                    desc=f"{cfg.method}", disable=not accelerator.is_main_process or is_quiet())
    for step in progress:
        sums: dict[str, float] = {}
        skipped_step: dict[str, int] = {}
        skipped_update = False
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(data_iter)
            batches_consumed += 1
            for k, v in batch["skipped"].items():
                skipped_step[k] = skipped_step.get(k, 0) + v
            with accelerator.accumulate(net):
                mse_w, mse_l, ref_w, ref_l = pair_forward(adapter, net, reference, batch, generator, cfg.method, cfg)
                loss, metrics = pair_loss(cfg, mse_w, mse_l, ref_w, ref_l, adapter.num_train_timesteps, batch=batch)
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="mean").item() == 1.0
                if finite:
                    accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and finite:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                        finite = False
                if finite:
                    optimizer.step()
                    lr_scheduler.step()
                else:
                    skipped_update = True
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.detach(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
            if grad_norm is not None:
                sums["grad_norm"] = float(grad_norm)

        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped_update else 0
        if nonfinite_in_a_row >= cfg.loss.max_nonfinite_steps:
            raise FloatingPointError(
                f"{nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss or gradient; likely causes: "
                "learning rate too high, fp16 overflow (try mixed_precision=bf16 or no), or corrupt data"
            )
        values = mean_across_processes(accelerator, sums)
        for k, v in sum_across_processes(accelerator, skipped_step).items():
            skipped_total[k] = skipped_total.get(k, 0) + v
        values.update({
            "lr": lr_scheduler.get_last_lr()[0],
            "beta": cfg.beta,
            "nonfinite_skipped": int(skipped_update),
            "skipped_rows": sum(skipped_total.values()),
            **{f"skipped_rows/{k}": v for k, v in sorted(skipped_total.items())},
            "pairs_seen": step * cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
            "step_seconds": timer.lap(),
        })
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            logger.log(step, values)
        progress.set_postfix(loss=f"{values['loss']:.4g}", acc=f"{values.get('implicit_acc', float('nan')):.2f}")
        ckpt.maybe_save(step, {"skipped_total": skipped_total, "nonfinite_in_a_row": nonfinite_in_a_row}, batches_consumed)

    info = save_final(cfg, accelerator, adapter, net, logger.last, cfg.method)
    if accelerator.is_main_process and skipped_total:
        used = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
        print(skipped_rows_line(skipped_total, used))
    accelerator.end_training()
    return {"final": logger.last, **info}


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
    return f"skipped {total} of {total + used} rows: {why} (counted in metrics.jsonl skipped_rows)"


@torch.no_grad()
def pair_margins(adapter, batch: dict, seed: int = 0, repeats: int = 4) -> dict[str, torch.Tensor]:
    """Per-pair denoising-error margins ``L_w - L_l`` of the model and of its LoRA-free reference,
    averaged over ``repeats`` fixed (timestep, noise) draws. Negative = the chosen image is
    denoised better. A held-out check of what DPO/MaPO/SFT learned, independent of the loss.
    """
    g = torch.Generator().manual_seed(seed)
    model_m, ref_m = [], []
    for _ in range(repeats):
        mse_w, mse_l, ref_w, ref_l = pair_forward(adapter, adapter.denoiser, None, batch, g, "dpo", None)
        model_m.append(mse_w - mse_l)
        ref_m.append(ref_w - ref_l)
    model_margin, ref_margin = torch.stack(model_m).mean(0), torch.stack(ref_m).mean(0)
    return {"model_margin": model_margin, "ref_margin": ref_margin,
            "implicit_acc": (model_margin < ref_margin).float().mean()}
