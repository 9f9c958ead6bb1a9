"""More offline preference losses on per-sample denoising errors: Diffusion-KTO, IPO, CoPG.

Same conventions as :mod:`diffalign.losses.preference`: inputs are per-sample MSEs of shape
[B] (mean over latent elements, :func:`~diffalign.losses.preference.per_sample_mse`) of the
trained model (``model_*``) and of the frozen reference (``ref_*``), computed on the same
(x_t, t, target) draws; each function returns ``(loss, metrics)`` with a scalar loss and
detached scalar metrics.

The diffusion stand-in for a log-likelihood ratio is the one of Diffusion-DPO: for one sample,
``log pi(x0|c) / pi_ref(x0|c)`` is approximated (up to a positive, timestep-weighted constant
that the loss scale absorbs) by ``-(L_model - L_ref)``: the model is "more likely" than the
reference on an image exactly when it denoises it with a lower error.
"""

from __future__ import annotations

import torch

from .preference import implicit_accuracy


def _mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def diffusion_kto_loss(
    model_losses_d: torch.Tensor,
    model_losses_u: torch.Tensor,
    ref_losses_d: torch.Tensor,
    ref_losses_u: torch.Tensor,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-KTO (Li et al., 2024, "Aligning Diffusion Models by Optimizing Human Utility",
    arXiv:2404.04465): KTO's prospect-theory utility (Ethayarajh et al., 2024, arXiv:2402.01306)
    on per-image desirable / undesirable labels, no pairs needed::

        r_i = -(L_i - R_i)                          implicit reward of image i
        z   = max(0, mean_batch(R - L)).detach()    KL baseline (both label groups)
        loss_i = lambda_D * (1 - sigmoid(beta * (r_i - z)))   if image i is desirable
                 lambda_U * (1 - sigmoid(beta * (z - r_i)))   if image i is undesirable
        loss = mean_i(loss_i)                       (over the desirable and undesirable images)

    ``*_d`` are the desirable images' MSEs, ``*_u`` the undesirable ones' (either may be empty).
    Descending the loss lowers the model's error on desirable images and raises it on
    undesirable ones, relative to the reference. ``z`` is detached and clamped at 0 as in KTO's
    release, so it only shifts the sigmoid's operating point. Beta: ``r`` is a difference of
    mean-over-element MSEs as in our Diffusion-DPO convention, so it takes betas of the same
    order (our default 5000).

    Metrics: ``implicit_acc`` (fraction of images on the right side of ``z``: ``r > z`` for
    desirable, ``r < z`` for undesirable, ties half), ``kl`` (``z``), ``reward_d`` /
    ``reward_u`` (mean ``r`` per group), ``frac_desirable``, ``mse_d`` / ``mse_u``.
    """
    if beta <= 0:
        raise ValueError(f"diffusion_kto_loss: beta must be > 0, got {beta}")
    if model_losses_d.numel() + model_losses_u.numel() == 0:
        raise ValueError("diffusion_kto_loss: empty batch")
    r_d = -(model_losses_d - ref_losses_d)
    r_u = -(model_losses_u - ref_losses_u)
    z = torch.cat([r_d, r_u]).detach().mean().clamp_min(0.0)
    loss_d = lambda_d * (1.0 - torch.sigmoid(beta * (r_d - z)))
    loss_u = lambda_u * (1.0 - torch.sigmoid(beta * (z - r_u)))
    loss = torch.cat([loss_d, loss_u]).mean()
    inside = torch.cat([r_d - z, z - r_u]).detach()
    n = inside.numel()
    metrics = {
        "implicit_acc": implicit_accuracy(inside),
        "kl": z,
        "reward_d": _mean_or_zero(r_d.detach()),
        "reward_u": _mean_or_zero(r_u.detach()),
        "frac_desirable": torch.tensor(r_d.numel() / n),
        "mse_d": _mean_or_zero(model_losses_d.detach()),
        "mse_u": _mean_or_zero(model_losses_u.detach()),
    }
    return loss, metrics


def _log_ratio_margin(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta) -> torch.Tensor:
    # Diffusion-DPO's "inside": 0.5*beta*(log-ratio(w) - log-ratio(l)) with log-ratio = -(L - R).
    return -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))


def diffusion_ipo_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor,
    ref_losses_w: torch.Tensor,
    ref_losses_l: torch.Tensor,
    beta: float,
    tau: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036) on diffusion errors. IPO regresses the log-ratio margin
    ``h = log pi(w)/pi_ref(w) - log pi(l)/pi_ref(l)`` onto ``1/(2 tau)``; with the diffusion
    stand-in ``log-ratio = -(L - R)`` scaled as in our Diffusion-DPO convention::

        h    = -0.5 * beta * ((Lw - Ll) - (Rw - Rl))      (= Diffusion-DPO's "inside")
        loss = mean((h - 1/(2*tau))^2)

    Sign convention: ``h`` is the *negated* ``(model_diff - ref_diff) * scale`` of the squared
    form, so ``h > 0`` means the model lowered its error on the chosen image (relative to the
    rejected one) more than the reference did; descending the loss from ``h < 1/(2 tau)``
    lowers the chosen error and raises the rejected one. Unlike DPO the loss is bounded below
    at a finite margin (``1/(2 tau)``): the model is pulled *to* it, not beyond (and pushed
    back when it overshoots). ``beta`` converts MSE differences to log-ratio units
    (5000 as for DPO); ``tau`` is IPO's regulariser (larger = smaller target margin).

    Metrics: ``implicit_acc`` (fraction ``h > 0``), ``reward_margin`` (mean ``h``),
    ``target_margin``, ``mse_w`` / ``mse_l``, ``ref_mse_w`` / ``ref_mse_l``.
    """
    if beta <= 0 or tau <= 0:
        raise ValueError(f"diffusion_ipo_loss: beta and tau must be > 0, got beta={beta}, tau={tau}")
    h = _log_ratio_margin(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta)
    target = 1.0 / (2.0 * tau)
    loss = ((h - target) ** 2).mean()
    metrics = {
        "implicit_acc": implicit_accuracy(h.detach()),
        "reward_margin": h.detach().mean(),
        "target_margin": torch.tensor(target),
        "mse_w": model_losses_w.detach().mean(),
        "mse_l": model_losses_l.detach().mean(),
        "ref_mse_w": ref_losses_w.detach().mean(),
        "ref_mse_l": ref_losses_l.detach().mean(),
    }
    return loss, metrics


def diffusion_copg_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor,
    ref_losses_w: torch.Tensor,
    ref_losses_l: torch.Tensor,
    rewards_w: torch.Tensor | float,
    rewards_l: torch.Tensor | float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CoPG, contrastive policy gradient (Flet-Berliac et al., 2024, "Contrastive Policy Gradient:
    Aligning LLMs on sequence-level scores in a supervised-friendly fashion", arXiv:2406.19185),
    on diffusion errors. CoPG learns from two samples ``y, y'`` with *arbitrary scalar rewards*
    ``R(y), R(y')`` (not only preferences); its update is the policy gradient with the other
    sample's regularised reward as baseline::

        R_beta(y) = R(y) - beta * log pi(y)/pi_ref(y)
        update    = (R_beta(y) - R_beta(y')) * (grad log pi(y) - grad log pi(y')) / 2

    which is minus the gradient of ``(R(y) - R(y') - beta*(log-ratio(y) - log-ratio(y')))^2 / (4 beta)``
    (CoPG reduces to IPO when the reward gap is constant). We adopt this squared form with the
    diffusion stand-in of Diffusion-DPO, ``beta * log-ratio(y) -> -0.5 * beta * (L - R)``::

        h    = -0.5 * beta * ((Lw - Ll) - (Rw - Rl))
        loss = mean(0.5 * ((rewards_w - rewards_l) - h)^2)

    (the ``1/(4 beta)`` of the LLM form becomes ``1/2`` because ``beta`` here also carries the
    MSE-to-log-likelihood scale; only the step size differs). ``w`` / ``l`` need not be a
    preference pair: any two images of a prompt with rewards work, and a tie (equal rewards)
    pulls the two log-ratios together. With Pick-a-Pic labels as rewards (1 / 0) the target
    margin is 1; with reward-model scores (``reward_0`` / ``reward_1`` columns) it is the score
    gap, so scale the scores to O(1).

    Metrics: ``implicit_acc`` (fraction ``h > 0``), ``reward_margin`` (mean ``h``),
    ``reward_gap`` (mean ``rewards_w - rewards_l``), ``mse_w`` / ``mse_l``, ``ref_mse_w`` / ``ref_mse_l``.
    """
    if beta <= 0:
        raise ValueError(f"diffusion_copg_loss: beta must be > 0, got {beta}")
    h = _log_ratio_margin(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta)
    gap = torch.as_tensor(rewards_w, dtype=h.dtype, device=h.device) - torch.as_tensor(rewards_l, dtype=h.dtype, device=h.device)
    gap = gap.expand_as(h)
    loss = (0.5 * (gap - h) ** 2).mean()
    metrics = {
        "implicit_acc": implicit_accuracy(h.detach()),
        "reward_margin": h.detach().mean(),
        "reward_gap": gap.detach().mean(),
        "mse_w": model_losses_w.detach().mean(),
        "mse_l": model_losses_l.detach().mean(),
        "ref_mse_w": ref_losses_w.detach().mean(),
        "ref_mse_l": ref_losses_l.detach().mean(),
    }
    return loss, metrics


__all__ = ["diffusion_copg_loss", "diffusion_ipo_loss", "diffusion_kto_loss"]
