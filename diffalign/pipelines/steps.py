"""Denoising step kinds: one small class per sampler, each with a pure mean/std/log-prob.

Every family is written in one notation, ``x_t = alpha_t * x0 + sigma_t * eps``:

* UNets (DDPM, epsilon or v-prediction): ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``;
* flow-matching DiTs (SD3): ``alpha = 1 - s``, ``sigma = s`` (the rectified-flow sigma).

The network output is first split into ``(x0_hat, eps_hat)`` (:func:`split_prediction`); a step
kind then maps ``(x_t, x0_hat, eps_hat, coefficients)`` to the Gaussian transition
``x_next ~ N(mean, std^2 I)``. SDE kinds derived for rectified flow (Flow-SDE, Dance-SDE, Heun)
run in the *flow space* of the step: ``y = x / (alpha + sigma)`` has ``y = (1 - s) x0 + s eps`` with
``s = sigma / (alpha + sigma)`` (the DDIM <-> flow-matching change of variables), so every kind
works on every family; for SD3 the change of variables is the identity. With noise level 0 every
stochastic kind reduces to the deterministic DDIM / flow-Euler step (:class:`EulerODE`).

The log-prob of a transition is :func:`diffalign.losses.grpo.gaussian_log_prob` (see its
module docstring for the reduction over latent elements), or flow_grpo's CPS convention
:func:`~diffalign.losses.grpo.squared_error_log_prob` (``log_prob_form="flow_grpo"``); the rollout
records it through :meth:`StepKind.sample` and training recomputes it through
:meth:`StepKind.log_prob_and_moments`, both the same function of ``(x_next, kind.mean(...),
kind.std(co))``, so recorded and recomputed log-probs agree to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..losses.grpo import KL_FORMS, LOG_PROB_FORMS, gaussian_log_prob, squared_error_log_prob
from ..tensors import per_row

PARAMETRIZATIONS = ("epsilon", "v_prediction", "flow")


@dataclass
class StepCoeffs:
    """Per-row noise coefficients of one step ``t -> next`` (each a float32 tensor [B]).

    ``sigma_cap`` is the flow-space sigma that replaces ``s = 1`` in Flow-SDE's ``sqrt(s / (1 - s))``
    (Flow-GRPO uses the schedule's second sigma there).
    """

    alpha: torch.Tensor
    sigma: torch.Tensor
    alpha_next: torch.Tensor
    sigma_next: torch.Tensor
    sigma_cap: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:  # c_t = alpha + sigma: x = c * y
        return self.alpha + self.sigma

    @property
    def scale_next(self) -> torch.Tensor:
        return self.alpha_next + self.sigma_next

    @property
    def s(self) -> torch.Tensor:  # flow-space sigma at t
        return self.sigma / self.scale

    @property
    def s_next(self) -> torch.Tensor:
        return self.sigma_next / self.scale_next

    def index(self, idx) -> "StepCoeffs":
        return StepCoeffs(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device) -> "StepCoeffs":
        """These coefficients on ``device``; the copy keeps these ones as its ``host`` attribute, so a
        branch on the schedule (:func:`at_schedule_end`) reads the host copy instead of syncing."""
        out = StepCoeffs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
        out.host = self.host if self.host is not None else self
        return out

    host = None  # class default (not a field): the CPU copy set by :meth:`to`, else None


def at_schedule_end(co: StepCoeffs, alpha: bool = False) -> bool:
    """Whether any row's step lands on ``sigma_next <= 0`` (or, with ``alpha``, starts at ``alpha <= 0``):
    the schedule's ends, where the higher-order solvers fall back to Euler. Read from ``co.host`` when
    it has one (a rollout's device coefficients), which is the same values on the CPU: a ``bool()`` of
    a device tensor waits for the device."""
    c = co.host if co.host is not None else co
    return bool((c.sigma_next <= 0).any()) or (alpha and bool((c.alpha <= 0).any()))


def split_prediction(out: torch.Tensor, x: torch.Tensor, alpha, sigma, parametrization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output -> ``(x0_hat, eps_hat)`` in fp32, such that ``x = alpha x0_hat + sigma eps_hat``.

    * ``epsilon``: ``x0 = (x - sigma out) / alpha``, ``eps = out``;
    * ``v_prediction`` (VP, ``alpha^2 + sigma^2 = 1``): ``x0 = alpha x - sigma v``, ``eps = sigma x + alpha v``;
    * ``flow`` (velocity ``v = eps - x0``, ``alpha = 1 - sigma``): ``x0 = x - sigma v``, ``eps = x + alpha v``.
    """
    out, x = out.float(), x.float()
    a, s = per_row(alpha, x), per_row(sigma, x)
    if parametrization == "epsilon":
        return (x - s * out) / a, out
    if parametrization == "v_prediction":
        return a * x - s * out, s * x + a * out
    if parametrization == "flow":
        return x - s * out, x + a * out
    raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")


# --------------------------------------------------------------------------------- stochastic
class StepKind:
    """A Gaussian denoising transition. Subclasses implement :meth:`std` and :meth:`mean`."""

    name = "base"
    default_noise_level = 1.0

    def __init__(self, noise_level: float | None = None, log_prob_form: str = "gaussian") -> None:
        if log_prob_form not in LOG_PROB_FORMS:
            raise ValueError(f"log_prob_form must be one of {LOG_PROB_FORMS}, got {log_prob_form!r}")
        self.noise_level = float(self.default_noise_level if noise_level is None else noise_level)
        # gaussian: gaussian_log_prob; flow_grpo: squared_error_log_prob (flow_grpo's CPS convention)
        self.log_prob_form = log_prob_form

    def std(self, co: StepCoeffs) -> torch.Tensor:
        """Per-row standard deviation [B] of ``x_next`` (schedule only, never the network)."""
        raise NotImplementedError

    def diffusion_std(self, co: StepCoeffs) -> torch.Tensor:
        """flow_grpo's ``std_dev_t`` of the step: the std without the step-size factor. The same as
        :meth:`std` for kinds without one (DDIM, CPS); SDE kinds return their diffusion ``g``."""
        return self.std(co)

    def kl_std(self, co: StepCoeffs, form: str = "gaussian") -> torch.Tensor:
        """The std the closed-form KL divides by (``loss.kl_form``, see
        :func:`diffalign.losses.grpo.gaussian_kl_same_std`): :meth:`std` (``gaussian``) or
        :meth:`diffusion_std` (``flow_grpo``)."""
        if form not in KL_FORMS:
            raise ValueError(f"kl form must be one of {KL_FORMS}, got {form!r}")
        return self.std(co) if form == "gaussian" else self.diffusion_std(co)

    def _log_prob(self, x_next, mean, std, reduction: str) -> torch.Tensor:
        if self.log_prob_form == "flow_grpo":
            return squared_error_log_prob(x_next, mean, reduction)
        return gaussian_log_prob(x_next, mean, std, reduction)

    def mean(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, co: StepCoeffs) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x_next, x, x0, eps, co: StepCoeffs, reduction: str = "mean") -> torch.Tensor:
        """Pure: log N(x_next; mean(x, x0, eps), std^2), reduced over latent elements -> [B]."""
        return self.log_prob_and_moments(x_next, x, x0, eps, co, reduction)[0]

    def log_prob_and_moments(self, x_next, x, x0, eps, co: StepCoeffs, reduction: str = "mean"):
        """:meth:`log_prob` with the step's ``mean`` and ``std`` it used: ``(log_prob, mean, std)``
        (training needs them for the KL and RatioNorm). The trainer's recomputation path."""
        mean, std = self.mean(x, x0, eps, co), self.std(co)
        return self._log_prob(x_next, mean, std, reduction), mean, std

    def sample(self, x, x0, eps, co: StepCoeffs, noise: torch.Tensor, reduction: str = "mean"):
        """``x_next = mean + std * noise``; returns ``(x_next, log_prob, mean, std)``. The rollout's path."""
        mean, std = self.mean(x, x0, eps, co), self.std(co)
        x_next = mean + per_row(std, mean) * noise.to(mean)
        return x_next, self._log_prob(x_next, mean, std, reduction), mean, std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(noise_level={self.noise_level}, log_prob_form={self.log_prob_form!r})"


class DDIMStep(StepKind):
    """DDIM with eta (Song et al., 2021; the sampler of DDPO, Black et al., 2023, arXiv:2305.13301)::

        std  = eta * sigma_next * sqrt(1 - (alpha_t sigma_next / (alpha_next sigma_t))^2)
        mean = alpha_next x0 + sqrt(sigma_next^2 - std^2) eps

    For a VP UNet ``std^2 = eta^2 (1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)``, diffusers'
    ``DDIMScheduler.step(eta=...)``; eta = 1 is DDPM's posterior, eta = 0 the deterministic DDIM step.
    """

    name = "ddim"
    default_noise_level = 1.0

    def std(self, co):
        ratio = (co.alpha * co.sigma_next) / (co.alpha_next * co.sigma).clamp_min(1e-20)
        return self.noise_level * co.sigma_next * (1.0 - ratio**2).clamp_min(0.0).sqrt()

    def mean(self, x, x0, eps, co):
        std = self.std(co)
        return per_row(co.alpha_next, x0) * x0 + per_row((co.sigma_next**2 - std**2).clamp_min(0.0).sqrt(), eps) * eps


class CPSStep(StepKind):
    """Coefficients-preserving sampling (Wang & Yu, 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching", arXiv:2509.05952)::

        std  = sigma_next * sin(eta * pi / 2)
        mean = alpha_next x0 + sigma_next cos(eta * pi / 2) eps

    so ``x_next`` keeps exactly the noise level ``sigma_next`` of the schedule (the Flow-SDE's
    discretisation overshoots it). The last step (``sigma_next = 0``) is deterministic.
    """

    name = "cps"
    default_noise_level = 0.8

    def std(self, co):
        return co.sigma_next * math.sin(self.noise_level * math.pi / 2)

    def mean(self, x, x0, eps, co):
        return per_row(co.alpha_next, x0) * x0 + per_row(co.sigma_next * math.cos(self.noise_level * math.pi / 2), eps) * eps


class _FlowSpaceSDE(StepKind):
    """Euler-Maruyama step of the marginal-preserving reverse SDE of a rectified flow::

        dy = [v + g(s)^2 / (2 s) * eps_hat] ds + g(s) dw,    v = eps_hat - x0_hat
        mean_y = y + ds * (v + g^2 / (2 s) * eps_hat),   std_y = g * sqrt(-ds)

    (``-eps_hat / s`` is the score of the flow's marginal), computed in the step's flow space and
    mapped back with ``x = (alpha + sigma) y``. Subclasses choose the diffusion ``g``.
    """

    def g(self, co: StepCoeffs) -> torch.Tensor:
        raise NotImplementedError

    def std(self, co):
        ds = (co.s - co.s_next).clamp_min(0.0)
        return co.scale_next * self.g(co) * ds.sqrt()

    def diffusion_std(self, co):
        """``g(s)`` (in x space: ``(alpha_next + sigma_next) g``), flow_grpo's ``std_dev_t``: :meth:`std` / sqrt(ds)."""
        return co.scale_next * self.g(co)

    def mean(self, x, x0, eps, co):
        s, ds = co.s, co.s_next - co.s
        y = x / per_row(co.scale, x)
        g2 = self.g(co) ** 2
        mean_y = y + per_row(ds, y) * ((eps - x0) + per_row(g2 / (2 * s), eps) * eps)
        return per_row(co.scale_next, mean_y) * mean_y


class FlowSDEStep(_FlowSpaceSDE):
    """Flow-GRPO's SDE (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online
    RL", arXiv:2505.05470): ``g(s) = a * sqrt(s / (1 - s))`` with noise level ``a`` (paper: 0.7);
    at ``s = 1`` the denominator uses ``1 - sigma_cap`` (the schedule's second sigma), as there.
    """

    name = "flow_sde"
    default_noise_level = 0.7

    def g(self, co):
        s = co.s
        s_den = torch.where(s >= 1.0 - 1e-6, co.sigma_cap, s)
        return self.noise_level * (s / (1.0 - s_den)).sqrt()


class DanceSDEStep(_FlowSpaceSDE):
    """DanceGRPO's SDE (Xue et al., 2025, "DanceGRPO: Unleashing GRPO on Visual Generation",
    arXiv:2505.07818): constant diffusion ``g = eta`` (paper: 0.3), so ``std = eta * sqrt(s - s_next)``
    and the drift adds ``-eta^2/2`` times the score estimate ``-eps_hat / s``.
    """

    name = "dance"
    default_noise_level = 0.3

    def g(self, co):
        return torch.full_like(co.s, self.noise_level)


STEP_KINDS: dict[str, type[StepKind]] = {k.name: k for k in (DDIMStep, CPSStep, FlowSDEStep, DanceSDEStep)}


def make_step_kind(name: str, noise_level: float | None = None, is_flow: bool | None = None,
                   log_prob_form: str = "gaussian") -> StepKind:
    """``auto`` picks Flow-SDE for flow models and DDIM-eta for UNets; ``log_prob_form``: see :class:`StepKind`."""
    if name == "auto":
        if is_flow is None:
            raise ValueError("make_step_kind('auto') needs is_flow")
        name = "flow_sde" if is_flow else "ddim"
    if name not in STEP_KINDS:
        raise ValueError(f"unknown step kind {name!r}; valid: auto, {', '.join(STEP_KINDS)}")
    return STEP_KINDS[name](noise_level, log_prob_form)


# --------------------------------------------------------------------------------- ODE solvers
class ODESolver:
    """A deterministic step (no log-prob). ``state`` carries multistep history per rollout;
    ``predict_next(x) -> (x0, eps)`` evaluates the model at the step's next timestep (or is None)."""

    name = "base"

    def step(self, x, x0, eps, co: StepCoeffs, state: dict, predict_next=None) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, x0, co: StepCoeffs, state: dict) -> None:
        """A step the solver did not take (a stochastic one) whose ``x0`` it may keep as history; by
        default the history resets."""
        state.clear()


class EulerODE(ODESolver):
    """``x_next = alpha_next x0 + sigma_next eps``: DDIM(eta=0) for UNets, flow-matching Euler for DiTs
    (the same step: DDIM is Euler in flow space)."""

    name = "euler"

    def step(self, x, x0, eps, co, state, predict_next=None):
        state.clear()
        return per_row(co.alpha_next, x0) * x0 + per_row(co.sigma_next, eps) * eps


class HeunODE(ODESolver):
    """Heun's 2nd-order method in flow space: an Euler predictor, the velocity at its end, and the
    trapezoid ``y_next = y + ds (v + v') / 2``. Two model calls per step; the last step (no next
    timestep, or ``sigma_next = 0``) falls back to Euler, as EDM's sampler does."""

    name = "heun"

    def step(self, x, x0, eps, co, state, predict_next=None):
        state.clear()
        x_euler = per_row(co.alpha_next, x0) * x0 + per_row(co.sigma_next, eps) * eps
        if predict_next is None or at_schedule_end(co):
            return x_euler
        x0_n, eps_n = predict_next(x_euler)
        y = x / per_row(co.scale, x)
        ds = per_row(co.s_next - co.s, y)
        y_next = y + ds * 0.5 * ((eps - x0) + (eps_n - x0_n))
        return per_row(co.scale_next, y_next) * y_next


class DPMSolver2M(ODESolver):
    """DPM-Solver++(2M) (Lu et al., 2022), data prediction, multistep: no extra model calls; the
    2nd-order correction uses the previous step's ``x0_hat`` (MixGRPO-Flash's ODE outside the window).
    With ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda_t``::

        x_next = (sigma_next / sigma_t) x - alpha_next expm1(-h) D,
        D = x0 + (x0 - x0_prev) / (2 r),   r = h_prev / h   (first order: D = x0)

    The history resets after every stochastic step (or, MixGRPO-Flash, continues from it:
    :meth:`observe`) and at the ends of the schedule.
    """

    name = "dpm2m"

    def step(self, x, x0, eps, co, state, predict_next=None):
        x_euler = per_row(co.alpha_next, x0) * x0 + per_row(co.sigma_next, eps) * eps
        if at_schedule_end(co, alpha=True):
            state.clear()
            state["x0"], state["h"] = x0, None
            return x_euler
        h = torch.log(co.alpha_next / co.sigma_next) - torch.log(co.alpha / co.sigma)
        d = x0
        if state.get("x0") is not None and state.get("h") is not None:
            r = state["h"] / h
            d = x0 + (x0 - state["x0"]) / per_row(2 * r, x0)
        x_next = per_row(co.sigma_next / co.sigma, x) * x - per_row(co.alpha_next * torch.expm1(-h), d) * d
        state["x0"], state["h"] = x0, h
        return x_next

    def observe(self, x0, co, state):
        """MixGRPO-Flash: a stochastic step's ``x0`` and ``h`` become the history of the next ODE step."""
        state.clear()
        if not at_schedule_end(co, alpha=True):
            state["x0"], state["h"] = x0, torch.log(co.alpha_next / co.sigma_next) - torch.log(co.alpha / co.sigma)


ODE_SOLVERS: dict[str, type[ODESolver]] = {k.name: k for k in (EulerODE, HeunODE, DPMSolver2M)}


def make_ode_solver(name: str) -> ODESolver:
    if name not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {name!r}; valid: {', '.join(ODE_SOLVERS)}")
    return ODE_SOLVERS[name]()
