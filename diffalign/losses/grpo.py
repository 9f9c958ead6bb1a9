"""Online RL losses over denoising transitions (DDPO, Flow-GRPO, DanceGRPO, MixGRPO, BranchGRPO).

Pure tensor functions. Conventions shared by every function here:

* A *transition* is one stochastic denoising step ``x_t -> x_next`` with Gaussian policy
  ``x_next ~ N(mean_theta(x_t, t), std_t^2 I)``. ``std_t`` depends on the schedule only (never on
  the network), so the old and new policies of a transition share it.
* **Log-prob reduction.** The log-density of a transition is reduced over the latent elements
  (C*H*W) with ``reduction="mean"`` (default; what the DDPO, Flow-GRPO and DanceGRPO releases
  do) or ``"sum"`` (the exact log-density of the whole latent). The rollout engine records
  log-probs with the same function and reduction the trainer recomputes them with; the
  closed-form KL and RatioNorm's bias term use the same reduction. With ``mean`` the log-ratio
  of a transition is ~``1/(C*H*W)`` of the exact one, which is why the papers' clip ranges are
  small (``1e-4``).
* Per-transition inputs are shaped [N]; losses are means over the N transitions (optionally
  weighted) and come back as ``(loss, metrics)`` with detached scalar metrics.
"""

from __future__ import annotations

import math

import torch

from ..tensors import per_row

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
REDUCTIONS = ("mean", "sum")
# the divisor of the closed-form KL (see gaussian_kl_same_std): gaussian | flow_grpo
KL_FORMS = ("gaussian", "flow_grpo")
# the log-prob of a transition: gaussian (gaussian_log_prob) | flow_grpo (squared_error_log_prob, CPS)
LOG_PROB_FORMS = ("gaussian", "flow_grpo")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: str = "mean") -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2 I)``, in fp32, reduced per sample: [B, ...] -> [B].

    ``log p = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)`` per element, then the mean
    (default) or sum over every non-batch dimension. ``std`` is a scalar, a per-sample [B]
    tensor, or a tensor broadcastable to ``x``.
    """
    std = per_row(std, x)
    diff = x.float() - mean.float()
    elem = -(diff**2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return _reduce(elem.expand_as(diff), reduction)


def squared_error_log_prob(x: torch.Tensor, mean: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """flow_grpo's CPS "log-prob" (``sde_type == "cps"`` in flow_grpo's ``sd3_sde_with_logprob.py``,
    after Wang & Yu 2025, arXiv:2509.05952): ``-(x - mean)^2`` per element, reduced like
    :func:`gaussian_log_prob`: [B, ...] -> [B], fp32.

    No ``1 / (2 std^2)`` and no normaliser: the log-ratio of two policies sharing ``std`` is the
    Gaussian one times ``2 std^2`` (the normaliser cancels), so per step it is ``2 std_t^2`` of
    ours — which is why flow_grpo's CPS clip range (``1e-5``) does not carry over to the Gaussian
    form. ``sampler.cps_logprob: flow_grpo`` selects it.
    """
    diff = x.float() - mean.float()
    return _reduce(-(diff**2), reduction)


def gaussian_kl_same_std(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) = ||mean - mean_ref||^2 / (2 std^2), reduced per sample.

    Flow-GRPO's closed-form KL to the reference policy on the step means: both policies share the
    schedule's ``std``, so the KL depends on the means only. Same ``reduction`` convention as
    :func:`gaussian_log_prob` (``mean``: averaged over latent elements). Zero when model == reference.

    Which ``std`` (``loss.kl_form``; the trainer passes ``StepKind.kl_std``):

    * ``gaussian`` (default): the transition's true std, ``g(s) * sqrt(ds)`` for the flow SDEs — the
      exact KL between the two Gaussian transitions.
    * ``flow_grpo``: flow_grpo's ``train_sd3.py``, ``kl_loss = ((prev_sample_mean -
      prev_sample_mean_ref)**2).mean(dim=(1,2,3)) / (2 * std_dev_t**2)`` with ``std_dev_t`` the
      diffusion coefficient ``g(s) = a sqrt(s / (1 - s))`` *without* ``sqrt(ds)`` (for CPS its
      ``std_dev_t`` is the true std, so both forms agree there). For the SDE kinds the gaussian KL
      is therefore ``1 / ds`` times flow_grpo's per step (``ds = s_t - s_next``, the step's sigma
      decrement): 25, 21, 18, 15, 12, 9.5, 7.3, 5.4, 3.7, 112 on SD3's 10-step table (23x on
      average), so a ``kl_beta`` from the Flow-GRPO paper is that much stronger under ``gaussian``.
    """
    std = per_row(std, mean)
    return _reduce(((mean.float() - mean_ref.float()) ** 2) / (2 * std**2), reduction)


def ratio_norm_log_ratio(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    std: torch.Tensor | float,
    reduction: str = "mean",
) -> torch.Tensor:
    """RatioNorm of GRPO-Guard (Wang et al., 2025, "GRPO-Guard: Mitigating Implicit
    Over-Optimization in Flow Matching via Regulated Clipping", arXiv:2510.22319)::

        b         = ||mean - old_mean||^2 / (2 std^2)                (reduced like the log-prob)
        log_ratio = (log_prob - old_log_prob + b) * std

    With ``x_next = old_mean + std * z``, ``log_prob - old_log_prob = -<z, d>/std - ||d||^2/(2 std^2)``
    (``d = mean - old_mean``): the second term shifts every ratio below 1 and the first scales
    with ``1/std``, which differs by orders of magnitude across steps. Adding ``b`` removes the
    shift; multiplying by ``std`` makes the spread step-consistent, so one clip range fits every
    step. Returns the normalised log-ratio [N] (0 on-policy).
    """
    b = gaussian_kl_same_std(mean, old_mean.detach(), std, reduction)
    s = torch.as_tensor(std, dtype=torch.float32, device=log_prob.device)
    return (log_prob - old_log_prob + b) * s


def grpo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    *,
    log_ratio: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO/PPO surrogate used by DDPO, Flow-GRPO and DanceGRPO, per transition::

        r    = exp(log_prob - old_log_prob)              (or exp(log_ratio), e.g. RatioNorm)
        L_pg = max(-A * r, -A * clip(r, 1 - eps, 1 + eps))
        loss = mean_n( w_n * L_pg_n ) + kl_beta * mean_n( kl_n )

    ``A`` are the transitions' advantages (already normalised/clamped), ``eps = clip_range``,
    ``w`` optional per-transition weights (e.g. noise-aware step weights, mean 1), ``kl`` the
    per-transition KL to the reference (:func:`gaussian_kl_same_std`). Minimising ``L_pg``
    raises ``log_prob`` of positive-advantage transitions and lowers it for negative ones; once
    the ratio leaves ``[1-eps, 1+eps]`` in the advantage's direction the gradient is zero.

    Metrics: ``policy_loss``, ``clip_fraction`` (fraction with ``|r - 1| > eps``), ``approx_kl``
    (``0.5 * mean((log_prob - old_log_prob)^2)``, DDPO's estimator of KL(old || new)),
    ``ratio_mean``, and ``kl`` when given.
    """
    if clip_range <= 0:
        raise ValueError(f"grpo_clip_loss: clip_range must be > 0, got {clip_range}")
    diff = log_prob - old_log_prob
    lr = diff if log_ratio is None else log_ratio
    ratio = torch.exp(lr)
    adv = advantages.to(ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per = torch.maximum(unclipped, clipped)
    if weights is not None:
        per = per * weights.to(per)
    policy_loss = per.mean()
    loss = policy_loss
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_fraction": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
        "ratio_mean": ratio.detach().mean(),
    }
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_beta * kl_mean
        metrics["kl"] = kl_mean.detach()
    return loss, metrics
