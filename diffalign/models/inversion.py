"""Deterministic inversion math (InPO noising), adapter-free: each family's adapter picks its own.

* UNets (DDPM schedules, eta = 0 DDIM): timestep grid ``s_k = round(k t / K)``, k = 1..K, and
  ``x^(0) = x0`` treated as exactly clean (``a^(0) = 1``); per step, with the model's noise
  prediction ``e = eps_ref(x^(k), s_k)`` (``s_0 = 0``)::

      x^(k+1) = sqrt(a_{k+1}) * (x^(k) - sqrt(1 - a_k) e) / sqrt(a_k) + sqrt(1 - a_{k+1}) e

  (:func:`ddim_invert`); the noise that ``x_t`` implies is :func:`implied_eps`.
* Flows (rectified flow, ``x_s = (1 - s) x0 + s n``): Euler steps of the probability-flow ODE
  on ``s_k = k sigma_t / K``: ``x^(k+1) = x^(k) + (s_{k+1} - s_k) v_ref(x^(k), s_k)`` (:func:`flow_invert`).

Every function takes a prediction function, so none needs a model; :meth:`DiffusionAdapter.invert`
of each family wires them to its schedule (``diffalign.trainers.inversion`` runs the reference).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..tensors import per_row


def ddim_inversion_step(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from cumulative alpha ``a_from`` to ``a_to`` (per sample, [B])."""
    a_from, a_to = per_row(a_from, x), per_row(a_to, x)
    x0_pred = (x - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_pred + (1.0 - a_to).sqrt() * eps


def inversion_grid(timesteps: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Integer timesteps ``s_0 = 0, s_1, ..., s_K = t`` (each [B], long), ``s_k = round(k t / K)``."""
    t = timesteps.float()
    return [torch.zeros_like(timesteps, dtype=torch.long)] + [
        (t * k / steps).round().long() for k in range(1, steps + 1)
    ]


@torch.no_grad()
def ddim_invert(
    predict_eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """DDIM inversion of ``x0`` [B,...] to integer ``timesteps`` [B] in ``steps`` steps.

    ``predict_eps(x, s)`` is the (reference) model's noise prediction at timesteps ``s`` [B]."""
    if steps < 1:
        raise ValueError(f"ddim_invert: steps must be >= 1, got {steps}")
    ac = alphas_cumprod.float().cpu()
    grid = inversion_grid(timesteps.cpu(), steps)
    x = x0.float()
    a_prev = torch.ones(x0.shape[0])
    for k in range(steps):
        eps = predict_eps(x, grid[k].to(x0.device)).float()
        a_next = ac[grid[k + 1]]
        x = ddim_inversion_step(x, eps, a_prev, a_next)
        a_prev = a_next
    return x


def implied_eps(x_t: torch.Tensor, x0: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """The noise ``eps`` with ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""
    a = per_row(a_t, x_t)
    return (x_t.float() - a.sqrt() * x0.float()) / (1.0 - a).sqrt().clamp_min(1e-8)


@torch.no_grad()
def flow_invert(
    predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Euler inversion of a rectified flow from ``x0`` (sigma 0) to ``sigmas`` [B] in ``steps`` steps.

    ``predict_v(x, s)`` is the (reference) velocity at noise levels ``s`` [B] (in [0, 1])."""
    if steps < 1:
        raise ValueError(f"flow_invert: steps must be >= 1, got {steps}")
    s_t = sigmas.float().to(x0.device)
    x = x0.float()
    for k in range(steps):
        s_k, s_next = s_t * k / steps, s_t * (k + 1) / steps
        x = x + per_row(s_next - s_k, x) * predict_v(x, s_k).float()
    return x


__all__ = ["ddim_inversion_step", "ddim_invert", "flow_invert", "implied_eps", "inversion_grid"]
