"""Offline preference losses on per-sample denoising errors. Pure tensor functions.

Conventions shared by every function here:

* Inputs ``*_losses_*`` are per-sample denoising MSEs of shape [B]: the squared error between
  the network output and the training target, **averaged** over all latent elements
  (C*H*W), as in the Diffusion-DPO and MaPO reference releases. Use :func:`per_sample_mse`.
* ``w`` = chosen (winner), ``l`` = rejected (loser). The chosen and rejected sample of a pair
  must share the same timestep and noise.
* Each loss returns ``(loss, metrics)``: a scalar loss (mean over the batch) and a dict of
  detached scalar metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, in fp32: [B, ...] -> [B]."""
    err = (pred.float() - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    # Ties (inside == 0, e.g. at initialisation when model == reference) count as half right,
    # as in the Diffusion-DPO reference release.
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


def diffusion_dpo_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor,
    ref_losses_w: torch.Tensor,
    ref_losses_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference
    Optimization", arXiv:2311.12908), as in its reference release (SalesforceAIResearch/DiffusionDPO)::

        inside = -0.5 * beta * ((Lw - Ll) - (Rw - Rl))
        loss   = -mean(logsigmoid(inside))

    where ``L`` are the trained model's and ``R`` the frozen reference's per-sample MSEs (mean
    over latent elements). The loss falls when the model lowers its error on the chosen image
    relative to the rejected one, more than the reference does.

    Beta convention: the ``0.5`` is the reference release's constant in front of beta; diffusers'
    ``train_diffusion_dpo.py`` example drops it, so a diffusers ``beta_dpo`` of X equals
    ``beta = 2 * X`` here. The papers' SD1.5/SDXL runs used
    ``beta = 5000`` (this convention) with mean-over-pixels MSE.

    Metrics: ``implicit_acc`` (fraction of pairs with ``inside > 0``, ties half), ``reward_margin``
    (mean of ``inside``, the implicit reward margin), ``mse_w`` / ``mse_l`` (model), ``ref_mse_w`` / ``ref_mse_l``.
    """
    if beta <= 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be > 0, got {beta}")
    model_diff = model_losses_w - model_losses_l
    ref_diff = ref_losses_w - ref_losses_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    metrics = {
        "implicit_acc": implicit_accuracy(inside.detach()),
        "reward_margin": inside.detach().mean(),
        "mse_w": model_losses_w.detach().mean(),
        "mse_l": model_losses_l.detach().mean(),
        "ref_mse_w": ref_losses_w.detach().mean(),
        "ref_mse_l": ref_losses_l.detach().mean(),
    }
    return loss, metrics


def _mapo_log_odds_term(losses: torch.Tensor, snr_value: float) -> torch.Tensor:
    # s*L / (exp(s*L) - 1): a smooth, decreasing map of the error; its limit at L -> 0 is 1.
    x = snr_value * losses
    return x / torch.expm1(x).clamp_min(1e-12)


def mapo_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor,
    beta: float,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MaPO, margin-aware preference optimisation (Hong et al., 2024, "Margin-aware Preference
    Optimization for Aligning Diffusion Models without Reference", arXiv:2406.06424), as in its
    reference release (mapo-t2i/mapo). Reference-free::

        f(L)   = s*L / (exp(s*L) - 1)                     (s = snr_value)
        margin = f(Lw) - f(Ll)
        loss   = mean(Lw) - beta * mean(logsigmoid(T * margin))     (T = num_train_timesteps)

    ``L`` are per-sample MSEs (mean over latent elements). The first term is SFT on the chosen
    image; the second widens the likelihood margin between chosen and rejected. ``f`` is
    decreasing, so lowering ``Lw`` or raising ``Ll`` both lower the loss. The paper's SDXL runs
    used ``beta = 0.1`` (the release's ``beta_mapo``).

    Metrics: ``implicit_acc`` (fraction with ``margin > 0``), ``reward_margin`` (mean ``margin``),
    ``ratio_loss`` (the second term), ``mse_w`` / ``mse_l``.
    """
    if beta < 0:
        raise ValueError(f"mapo_loss: beta must be >= 0, got {beta}")
    margin = _mapo_log_odds_term(model_losses_w, snr_value) - _mapo_log_odds_term(model_losses_l, snr_value)
    ratio = F.logsigmoid(margin * num_train_timesteps)
    ratio_loss = -beta * ratio.mean()
    loss = model_losses_w.mean() + ratio_loss
    metrics = {
        "implicit_acc": implicit_accuracy(margin.detach()),
        "reward_margin": margin.detach().mean(),
        "ratio_loss": ratio_loss.detach(),
        "mse_w": model_losses_w.detach().mean(),
        "mse_l": model_losses_l.detach().mean(),
    }
    return loss, metrics


def sft_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT on the chosen image (the supervised baseline of the Diffusion-DPO paper)::

        loss = mean(Lw)

    The rejected image does not enter the loss; when ``model_losses_l`` is given its MSE and the
    implicit accuracy ``mean(Lw < Ll)`` are reported for comparison with DPO/MaPO runs.
    """
    loss = model_losses_w.mean()
    metrics = {"mse_w": model_losses_w.detach().mean()}
    if model_losses_l is not None:
        metrics["mse_l"] = model_losses_l.detach().mean()
        metrics["implicit_acc"] = implicit_accuracy((model_losses_l - model_losses_w).detach())
    return loss, metrics
