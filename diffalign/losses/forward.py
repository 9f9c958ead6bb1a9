"""Forward-process online RL losses: DiffusionNFT and Advantage Weighted Matching (AWM).

Pure tensor functions. Both methods train on *clean* samples ``x0`` of the sampling policy
(generated with any solver, ODE by default), noised again by the forward process, so they need
no log-probs of the sampler and no trajectory. Conventions shared here:

* **Rectified flow.** ``x_t = (1 - sigma) x0 + sigma eps``; the network predicts the velocity
  ``v = eps - x0``, so ``x0_hat = x_t - sigma v``. The losses take *x0 predictions*
  (``x0_hat``), which every adapter produces (:func:`diffalign.pipelines.split_prediction`);
  for a flow model they are exactly the papers' quantities.
* Per-sample inputs are shaped ``[B, ...]``; per-sample losses come back as ``[B]`` (means over
  the latent elements); the trainer takes the batch mean.
"""

from __future__ import annotations

import torch

from .grpo import grpo_clip_loss

AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
AWM_LOSS_TYPES = ("exp_first", "sum_first")
KL_EMA_DECAY_TYPES = ("linear", "constant")


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r in [0, 1]`` of each sample from its advantage::

        r = clamp( clamp(A, -c, c) / c / 2 + 1/2, 0, 1 ),   c = adv_clip_max

    (Zheng et al., 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
    arXiv:2509.16117; the release's ``adv_clip_max`` is 5.) ``A = 0`` gives ``r = 1/2``: the
    positive and negative terms balance and the sample pulls the policy nowhere.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def _adaptive_x0_loss(x0_hat: torch.Tensor, x0: torch.Tensor, adaptive: bool) -> torch.Tensor:
    err = (x0_hat.float() - x0.float()) ** 2
    if not adaptive:
        return _per_sample_mean(err)
    with torch.no_grad():
        w = _per_sample_mean((x0_hat.double() - x0.double()).abs()).clamp_min(1e-5).float()
    return _per_sample_mean(err) / w


def nft_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    *,
    adaptive_weight: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's negative-aware flow-matching loss per sample (arXiv:2509.16117, eq. 7-8).

    The trained velocity ``v_theta`` and the (frozen) sampling policy's ``v_old`` define an
    implicit positive and an implicit negative policy::

        v+ = beta * v_theta + (1 - beta) * v_old
        v- = (1 + beta) * v_old - beta * v_theta
        L  = [ r * ||x0+ - x0||^2 / w+  +  (1 - r) * ||x0- - x0||^2 / w- ] / beta

    with ``x0+- = x_t - sigma v+-`` (so ``x0+ = beta x0_theta + (1 - beta) x0_old`` and
    ``x0- = (1 + beta) x0_old - beta x0_theta``: the mixing is linear and carries over to x0
    predictions unchanged), squared errors averaged over latent elements, and the release's
    adaptive weights ``w+- = stopgrad(mean |x0+- - x0|)`` (clamped at 1e-5; ``adaptive_weight=False``
    drops them). Minimising it moves ``v_theta`` towards high-``r`` samples and away from low-``r``
    ones; at ``v_theta = v_old`` its gradient is ``2 (2r - 1)/beta``-weighted flow matching, and it
    is zero for ``r = 1/2``.

    Inputs ``[B, ...]`` (``r``: [B]). Returns ``(loss [B], metrics)``; the release multiplies the
    batch mean by ``adv_clip_max`` (the trainer's ``loss_scale``).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    x0_old = x0_old.detach()
    x0_pos = beta * x0_theta + (1.0 - beta) * x0_old
    x0_neg = (1.0 + beta) * x0_old - beta * x0_theta
    pos = _adaptive_x0_loss(x0_pos, x0, adaptive_weight)
    neg = _adaptive_x0_loss(x0_neg, x0, adaptive_weight)
    r = r.to(pos)
    loss = (r * pos + (1.0 - r) * neg) / beta
    metrics = {
        "positive_loss": pos.detach().mean(),
        "negative_loss": neg.detach().mean(),
        "old_deviation": _per_sample_mean((x0_theta.detach().float() - x0_old.float()) ** 2).mean(),
    }
    return loss, metrics


def awm_log_prob(
    v_pred: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    weighting: str = "uniform",
    ghuber_power: float = 0.25,
) -> torch.Tensor:
    """AWM's surrogate log-likelihood of a clean sample: the negative (weighted) flow-matching
    error (Xue et al., 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in
    Diffusion Models", arXiv:2509.25050)::

        e        = mean over elements of (v_pred - (noise - x0))^2       (fp64, then fp32)
        uniform: log p = -e
        t:       log p = -sigma * e
        t2:      log p = -sigma^2 * e
        huber:   log p = -(sqrt(e + 1e-10) - 1e-5) * sigma
        ghuber:  log p = -((e + 1e-10)^p - 1e-10^p) * sigma / p          (p = ghuber_power)

    ``sigma`` is the flow time of ``x_t`` ([B]). The names follow the release's ``weighting``
    option (its SD3.5 recipes use ``ghuber`` with ``p = 0.25``). Returns ``[B]``.
    """
    e = _per_sample_mean((v_pred.double() - (noise.double() - x0.double())) ** 2)
    s = sigma.to(e).reshape(-1)
    if weighting == "uniform":
        out = -e
    elif weighting == "t":
        out = -e * s
    elif weighting == "t2":
        out = -e * s**2
    elif weighting == "huber":
        out = -(torch.sqrt(e + 1e-10) - 1e-5) * s
    elif weighting == "ghuber":
        p = float(ghuber_power)
        out = -((e + 1e-10) ** p - 1e-10**p) * s / p
    else:
        raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    return out.float()


def awm_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    loss_type: str = "exp_first",
    samples: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's clipped policy objective over training rows (one row = one clean sample re-noised at
    one timestep; ``log_prob`` from :func:`awm_log_prob`), in the release's two ``loss_type`` values
    (Xue et al., 2025, arXiv:2509.25050; ``scxue/advantage_weighted_matching``,
    ``scripts/train_sd3_awm.py``)::

        exp_first:  r_i = exp(lp_i - old_i)                     per row i
                    L   = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps))
        sum_first:  r_s = exp(mean_{i in s} lp_i - mean_{i in s} old_i)   per sample s
                    L   = mean_s max(-A_s r_s, -A_s clip(r_s, 1 - eps, 1 + eps))

    ``sum_first`` averages each sample's log-likelihood over its training timesteps *before* the
    ratio (one ratio per clean sample, the sample's rows identified by ``samples`` [R]; every row of
    a sample must be in the batch); ``exp_first`` takes one ratio per row. On-policy (``lp = old``,
    one update per rollout) the two have the same value and gradient; they differ in what is
    clipped off-policy. ``A`` is the sample's advantage, repeated on its rows. Returns
    ``(loss, metrics)`` as :func:`~diffalign.losses.grpo.grpo_clip_loss` (computed per sample for
    ``sum_first``).
    """
    if loss_type == "exp_first":
        return grpo_clip_loss(log_prob, old_log_prob, advantages, clip_range)
    if loss_type != "sum_first":
        raise ValueError(f"loss_type must be one of {AWM_LOSS_TYPES}, got {loss_type!r}")
    if samples is None:
        raise ValueError("sum_first needs the sample index of every row")
    ids, inverse = torch.unique(samples, return_inverse=True)
    count = torch.zeros(ids.shape[0], dtype=log_prob.dtype, device=log_prob.device).index_add_(
        0, inverse, torch.ones_like(log_prob))

    def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
        x = x.to(log_prob.dtype)
        return torch.zeros(ids.shape[0], dtype=x.dtype, device=x.device).index_add(0, inverse, x) / count

    return grpo_clip_loss(per_sample_mean(log_prob), per_sample_mean(old_log_prob), per_sample_mean(advantages),
                          clip_range)


def kl_ema_decay(step: int, cap: float, kind: str = "linear", rate: float = 0.001) -> float:
    """Decay of AWM's KL anchor, the EMA copy of the trained weights its EMA-KL term pulls towards
    (``scxue/advantage_weighted_matching``, ``scripts/train_sd3_awm.py``: the ``ema`` LoRA adapter,
    updated after every epoch as ``theta_ema <- d * theta_ema + (1 - d) * theta``)::

        linear:    d = min(cap, rate * step)       (release: cap = kl_ema_decay 0.3, rate 0.001)
        constant:  d = cap

    ``step`` is the number of optimizer updates taken so far (the release's ``global_step`` after
    the epoch's update). The anchor starts equal to the trained weights.
    """
    if kind == "linear":
        return min(cap, rate * step)
    if kind == "constant":
        return cap
    raise ValueError(f"kind must be one of {KL_EMA_DECAY_TYPES}, got {kind!r}")


def velocity_kl(v_pred: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """The velocity-space KL surrogate both releases add to the loss, ``mean((v - v_ref)^2)``
    per sample ([B]); DiffusionNFT weighs it by ``train.beta`` (1e-4 in its SD3.5 configs), AWM by
    ``train.beta`` with ``kl_weight='Uniform'`` (1e-4 PickScore, 3e-3 GenEval/OCR). AWM adds it a
    second time with the EMA anchor's velocity as ``v_ref`` (:func:`kl_ema_decay`), weighted by
    ``train.ema_beta`` (1 in its SD3.5 configs, ``kl_ema_weight='Uniform'``)."""
    return _per_sample_mean((v_pred.float() - v_ref.detach().float()) ** 2)


def old_policy_decay(step: int, rate: float, cap: float, delay: int = 0) -> float:
    """DiffusionNFT's decay of the sampling ("old") policy, updated after every training step as
    ``theta_old <- d * theta_old + (1 - d) * theta``::

        d = 0                               if step < delay
        d = min((step - delay) * rate, cap) otherwise

    The release's ``decay_type`` 1 is ``rate=0.001, cap=0.5, delay=0`` (its default), 2 is
    ``rate=0.0075, cap=0.999, delay=75``; ``rate=0`` keeps the old policy equal to the current one.
    """
    if step < delay:
        return 0.0
    return min((step - delay) * rate, cap)
