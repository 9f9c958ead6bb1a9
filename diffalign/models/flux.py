"""FLUX.1 (dev and schnell): rectified flow on 2x2-packed latents, T5 + pooled CLIP conditioning.

Latents stay ``[B, C, H, W]`` everywhere outside this module (the trainers' noise, targets and
per-sample MSEs, the rollout engine's steps): :meth:`FluxAdapter.predict` packs them into the
``[B, H/2 * W/2, 4C]`` token sequence ``FluxPipeline`` feeds its transformer and unpacks the
velocity back. Packing is a permutation, so every loss and log-prob over latent elements is the
same over either layout.

What ``FluxPipeline`` does that this adapter reproduces (diffusers ``pipeline_flux.py``):

* prompt: T5 hidden states (``encoder_hidden_states``) and CLIP's pooled output
  (``pooled_projections``); text position ids are zeros;
* image position ids ``(0, row, col)`` of each 2x2 patch;
* the transformer's ``timestep`` is ``t / 1000`` (sigma);
* FLUX.1-dev is guidance-distilled (``transformer.config.guidance_embeds``): the guidance value is a
  network input and there is no unconditional pass; schnell (step-distilled) takes none;
* sampling sigmas ``linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(image_seq_len)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Cond
from .flow import FlowMatchAdapter, pack_patches, unpack_patches


def patch_position_ids(height: int, width: int, device=None) -> torch.Tensor:
    """``[H/2 * W/2, 3]`` position ids ``(0, row, col)`` of the packed tokens, row-major."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's dynamic shift: ``mu`` linear in the image token count, ``base_shift`` at
    ``base_seq_len`` and ``max_shift`` at ``max_seq_len`` (the defaults of FLUX.1's scheduler config)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


class FluxAdapter(FlowMatchAdapter):
    """FLUX.1-dev / schnell through ``FluxPipeline``."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    # the pipeline's guidance_scale is never CFG (dev embeds it, schnell ignores it)
    distilled_guidance = True
    # diffusers' train_dreambooth_lora_flux.py default: attention and feed-forward of the double
    # blocks, and the MLP input projection of the single blocks
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    )

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches

    @property
    def guidance_embedded(self) -> bool:
        """FLUX.1-dev: the guidance value is an input of the transformer."""
        return bool(self.denoiser.config.guidance_embeds)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        # as FluxPipeline.prepare_latents: even latent sides, so 2x2 patches tile them
        f = self.vae_scale_factor * 2
        return (self.latent_channels, 2 * (height // f), 2 * (width // f))

    def encode_prompt(self, prompts: list[str]) -> Cond:
        prompts = list(prompts)
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.opts.max_sequence_length,
            )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def with_guidance(self, cond: Cond, guidance_scale: float) -> Cond:
        if not self.guidance_embedded:
            return cond
        rows = next(iter(cond.values())).shape[0]
        return {**cond, "guidance": torch.full((rows,), float(guidance_scale), device=self.device)}

    def guidance_input(self, cond: Cond, rows: int, device) -> torch.Tensor | None:
        """The ``guidance`` argument of the transformer: the sampler's value (:meth:`with_guidance`),
        else ``model_opts.guidance`` (pair training); None for a model without guidance embedding."""
        if not self.guidance_embedded:
            return None
        if "guidance" in cond:
            return cond["guidance"].to(device, torch.float32)
        return torch.full((rows,), float(self.opts.guidance), device=device)

    def predict(self, x_t, timesteps, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        dtype = next(net.parameters()).dtype  # the called network's: the frozen bf16 reference is not the fp32 policy
        b, _, h, w = x_t.shape
        text = cond["encoder_hidden_states"]
        with self.attention_context():
            out = net(
                hidden_states=pack_patches(x_t).to(dtype),
                timestep=timesteps.to(x_t.device, torch.float32) / self.num_train_timesteps,
                guidance=self.guidance_input(cond, b, x_t.device),
                pooled_projections=cond["pooled_projections"].to(dtype),
                encoder_hidden_states=text.to(dtype),
                txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device),
                img_ids=patch_position_ids(h, w, x_t.device),
                return_dict=False,
            )[0]
        return unpack_patches(out, h, w)

    # ----------------------------------------------------------------------- sampling
    def image_seq_len(self, height: int | None, width: int | None) -> int:
        """Packed tokens of a ``height`` x ``width`` image (None: the pipeline's default size)."""
        default = self.pipe.default_sample_size * self.vae_scale_factor
        _, lh, lw = self.latent_shape(height or default, width or default)
        return (lh // 2) * (lw // 2)

    def set_timesteps_kwargs(self, num_steps: int, height: int | None, width: int | None) -> dict:
        cfg = self.noise_scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self.image_seq_len(height, width), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return {"sigmas": sigmas, "mu": mu}
