"""Rectified-flow adapters (SD3, and any DiT family sampled by ``FlowMatchEulerDiscreteScheduler``).

Everything that follows from the flow itself lives here: the training timestep density, the
noisy input and velocity target, the sampling schedule and the inversion. A family subclasses
:class:`FlowMatchAdapter` with its prompt encoding and forward; a family whose sampling schedule
depends on the image size (FLUX's dynamic shifting) overrides only :meth:`~FlowMatchAdapter.set_timesteps_kwargs`.
"""

from __future__ import annotations

import torch

from ..tensors import per_row

from .base import DiffusionAdapter, Predict, SamplingSchedule


def pack_patches(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]``: each 2x2 patch one token, features ordered (c, dy, dx)
    (the packing of ``FluxPipeline`` and of ``QwenImagePipeline``, whose frame dim is dropped)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_patches(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_patches` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


class FlowMatchAdapter(DiffusionAdapter):
    """Rectified flow: x_t = (1 - sigma) x_0 + sigma * noise, target v = noise - x_0.

    Timesteps are ``sigma * num_train_timesteps`` (floats), drawn from the checkpoint's shifted
    sigma table, as diffusers' SD3 training scripts do; ``model_opts.timestep_sampling`` picks the
    density (uniform, logit_normal, mode) of SD3's paper.
    """

    is_flow = True
    lora_keys_in_diffusers_format = False

    def __init__(self, pipe, model_id: str, opts) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, model_id, opts)

    @property
    def train_sigmas(self) -> torch.Tensor:
        """The shifted sigma table, descending, one per training timestep."""
        return self.noise_scheduler.sigmas[: self.num_train_timesteps].float()

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        o = self.opts
        if o.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            # diffusers' helper draws from the global RNG; fork so `generator` alone decides.
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                u = compute_density_for_timestep_sampling(
                    o.timestep_sampling, n, logit_mean=o.logit_mean, logit_std=o.logit_std, mode_scale=o.mode_scale
                )
        idx = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.train_sigmas[idx] * self.num_train_timesteps

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps

    def noisy_input_and_target(self, latents, noise, timesteps):
        s = per_row(self.sigma(timesteps), latents)
        return (1.0 - s) * latents + s * noise, noise - latents

    # ----------------------------------------------------------------------- sampling
    def set_timesteps_kwargs(self, num_steps: int, height: int | None, width: int | None) -> dict:
        """Extra keyword arguments of the scheduler's ``set_timesteps`` for sampling at ``height`` x
        ``width``: none for SD3 (a fixed shift). FLUX-style dynamic shifting overrides this to return
        ``mu`` from the image sequence length (and its own ``sigmas``), as its diffusers pipeline does."""
        return {}

    def sampling_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> SamplingSchedule:
        """``FlowMatchEulerDiscreteScheduler``'s shifted sigmas, so an ODE rollout is exactly the
        pipeline's default sampler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        # a private copy: the adapter's training scheduler is untouched
        sched.set_timesteps(num_steps, **self.set_timesteps_kwargs(num_steps, height, width))
        sig = sched.sigmas.float().cpu()  # [S+1], ends with 0
        ts = sched.timesteps.float().cpu()
        s, s_next = sig[:-1], sig[1:]
        nxt = s_next * self.num_train_timesteps
        nxt = torch.where(s_next > 0, nxt, torch.full_like(nxt, -1.0))
        return SamplingSchedule("flow", ts, nxt, 1.0 - s, s, 1.0 - s_next, s_next, float(s_next[0]))

    def invert(self, predict: Predict, latents, timesteps, steps: int):
        """Euler steps of the probability-flow ODE on ``s_k = k sigma_t / K``; target
        ``v = (x_t - x0) / sigma_t``, the velocity of the straight path through the inverted point."""
        from .inversion import flow_invert

        T = self.num_train_timesteps
        sigmas = self.sigma(timesteps).to(latents.device)
        x_t = flow_invert(lambda x, s: predict(x, s * T), latents, sigmas, steps)
        target = (x_t - latents.float()) / per_row(sigmas.clamp_min(1e-6), x_t)
        return x_t, target
