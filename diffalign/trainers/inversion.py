"""InPO-style noising: x_t by a few deterministic inversion steps of the reference model.

InPO (Lu et al., 2025, "InPO: Inversion Preference Optimization with Reparametrization of
Diffusion Models", arXiv:2503.18454) replaces the random forward noising
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, eps ~ N(0, I)`` of Diffusion-DPO by the latent that
*the model itself* maps to ``x0``: DDIM inversion of ``x0`` up to ``t``. The training target is
then the noise that this ``x_t`` implies, so the per-sample error measures how well the model
reproduces *its own* trajectory to the image, which assigns the image-level preference to the
single step more faithfully than a random draw.

Here (``loss.noising: ddim_inversion``, ``loss.inversion_steps: K``):

* UNets (DDPM schedules, eta = 0 DDIM): timestep grid ``s_k = round(k t / K)``, k = 1..K, and
  ``x^(0) = x0`` treated as exactly clean (``a^(0) = 1``); per step, with the model's noise
  prediction ``e = eps_ref(x^(k), s_k)`` (``s_0 = 0``; v-prediction converted to eps)::

      x^(k+1) = sqrt(a_{k+1}) * (x^(k) - sqrt(1 - a_k) e) / sqrt(a_k) + sqrt(1 - a_{k+1}) e

  target (epsilon models) ``eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)``; v-prediction models
  get ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``.
* Flows (rectified flow, ``x_s = (1 - s) x0 + s n``): Euler steps of the probability-flow ODE
  on ``s_k = k sigma_t / K``: ``x^(k+1) = x^(k) + (s_{k+1} - s_k) v_ref(x^(k), s_k)``;
  target ``v = (x_t - x0) / sigma_t`` (the velocity of the straight path through the inverted point).

The inversion runs the *reference* (the LoRA-off network, or the frozen copy when fully
fine-tuning) under ``no_grad``, so for a given ``x0``, ``t`` and prompt, ``x_t`` is
deterministic and does not move while the trained model changes. The pure pieces
(:func:`ddim_inversion_step`, :func:`ddim_invert`, :func:`flow_invert`, :func:`implied_eps`)
take a prediction function and are adapter-free; they live in :mod:`diffalign.models.inversion`
(each adapter's :meth:`~diffalign.models.DiffusionAdapter.invert` picks its own) and are re-exported here.
"""

from __future__ import annotations

import torch

from ..models.inversion import ddim_inversion_step, ddim_invert, flow_invert, implied_eps, inversion_grid


def _reference_predict(adapter, reference, cond):
    def predict(x, t):
        if reference is not None:
            return adapter.predict(x, t, cond, denoiser=reference)
        with adapter.adapters_disabled(adapter.denoiser):
            return adapter.predict(x, t, cond)

    return predict


@torch.no_grad()
def inverted_input_and_target(adapter, latents, timesteps, cond, steps: int, reference=None):
    """InPO noising through a model adapter: ``(x_t, target)`` like ``adapter.noisy_input_and_target``,
    with ``x_t`` from the adapter's own inversion (:meth:`DiffusionAdapter.invert`: DDIM for UNets,
    Euler for flows) of the reference."""
    return adapter.invert(_reference_predict(adapter, reference, cond), latents, timesteps, steps)


__all__ = [
    "ddim_inversion_step", "ddim_invert", "flow_invert", "implied_eps",
    "inversion_grid", "inverted_input_and_target",
]
