"""FLUX.2 (``Flux2Pipeline``: dev, Mistral3 text encoder) and FLUX.2-klein (``Flux2KleinPipeline``: Qwen3).

The denoiser's latent space is not the VAE's: ``Flux2Pipeline`` patchifies the VAE latents 2x2
into channels (``[B, 4C, H/2, W/2]``) and normalises every channel with the VAE's BatchNorm
running statistics; the transformer then reads each spatial position as one token. Latents here
are that patchified, normalised ``[B, 4C, H/2, W/2]`` tensor (:meth:`Flux2Adapter.scale_latents`
maps raw VAE latents into it, :meth:`~Flux2Adapter.decode_latents` back), and
:meth:`~Flux2Adapter.predict` flattens it to tokens and back, so losses and log-probs over latent
elements are those of the pipeline's own sequence.

As in diffusers ``pipeline_flux2.py`` / ``pipeline_flux2_klein.py``:

* prompt: hidden states of three intermediate layers of the chat-formatted text encoder,
  concatenated per token (the pipeline's ``encode_prompt``); text ids ``(0, 0, 0, l)``;
* image ids ``(0, row, col, 0)``; the transformer's ``timestep`` is ``t / 1000``;
* FLUX.2-dev embeds the guidance value (no unconditional pass); klein runs true CFG against the
  empty prompt unless its pipeline config says ``is_distilled`` (then neither);
* sampling sigmas ``linspace(1, 1/N, N)`` shifted by ``mu = compute_empirical_mu(seq_len, N)``
  (FLUX.2's fit, which depends on the step count too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Cond
from .flux import FluxAdapter


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]``: each 2x2 patch into channels ordered (c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def token_position_ids(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """``[B, H*W, 4]`` image token ids ``(t=0, row, col, l=0)``, row-major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1).unsqueeze(0).expand(batch, -1, -1)


def text_position_ids(batch: int, length: int, device=None) -> torch.Tensor:
    """``[B, L, 4]`` text token ids ``(0, 0, 0, l)``."""
    pos = torch.arange(length, device=device)
    zeros = torch.zeros_like(pos)
    return torch.stack([zeros, zeros, zeros, pos], dim=-1).unsqueeze(0).expand(batch, -1, -1)


class Flux2Adapter(FluxAdapter):
    """FLUX.2-dev through ``Flux2Pipeline``: guidance-distilled, Mistral3 prompt encoder."""

    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    distilled_guidance = True
    # attention of the double blocks, the fused QKV+MLP input of the single blocks, and the
    # double blocks' feed-forwards (FLUX.2 names; DiffSynth-Studio's FLUX.2 LoRA set)
    default_lora_targets = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_qkv_mlp_proj", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    )

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels  # already the patchified 4C

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2  # as Flux2Pipeline.prepare_latents
        return (self.latent_channels, height // f, width // f)

    def encode_prompt(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                                                max_sequence_length=self.opts.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    # ----------------------------------------------------------------------- latent space
    latent_stats_in_vae_weights = True

    def keep_from_vae(self, vae) -> None:
        self._bn_stats = (vae.bn.running_mean.detach().clone(), vae.bn.running_var.detach().clone(),
                          vae.config.batch_norm_eps)

    def _bn_moments(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE BatchNorm's running mean and std (kept by :meth:`keep_from_vae` once the VAE is released)."""
        stats = getattr(self, "_bn_stats", None) if self.pipe.vae is None else None
        running_mean, running_var, eps = stats or (self.vae.bn.running_mean, self.vae.bn.running_var,
                                                   self.vae.config.batch_norm_eps)
        mean = running_mean.view(1, -1, 1, 1).to(ref.device, torch.float32)
        std = torch.sqrt(running_var.view(1, -1, 1, 1).to(ref.device, torch.float32) + eps)
        return mean, std

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the transformer's space: 2x2 patchify, then BatchNorm-normalise."""
        x = patchify(latents.to(self.device).float())
        mean, std = self._bn_moments(x)
        return (x - mean) / std

    @torch.no_grad()
    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        mean, std = self._bn_moments(latents)
        raw = unpatchify(latents.to(vae.device).float() * std + mean)
        images = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------- forward
    def predict(self, x_t, timesteps, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        dtype = next(net.parameters()).dtype  # the called network's: the frozen bf16 reference is not the fp32 policy
        b, c, h, w = x_t.shape
        text = cond["encoder_hidden_states"]
        with self.attention_context():
            out = net(
                hidden_states=x_t.flatten(2).transpose(1, 2).to(dtype),
                timestep=timesteps.to(x_t.device, torch.float32) / self.num_train_timesteps,
                guidance=self.guidance_input(cond, b, x_t.device),
                encoder_hidden_states=text.to(dtype),
                txt_ids=text_position_ids(b, text.shape[1], x_t.device),
                img_ids=token_position_ids(b, h, w, x_t.device),
                return_dict=False,
            )[0]
        return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w)

    # ----------------------------------------------------------------------- sampling
    def image_seq_len(self, height: int | None, width: int | None) -> int:
        default = self.pipe.default_sample_size * self.vae_scale_factor
        _, lh, lw = self.latent_shape(height or default, width or default)
        return lh * lw

    def set_timesteps_kwargs(self, num_steps: int, height: int | None, width: int | None) -> dict:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        use_flow_sigmas = self.noise_scheduler.config.get("use_flow_sigmas", False)
        sigmas = None if use_flow_sigmas else np.linspace(1.0, 1 / num_steps, num_steps)
        return {"sigmas": sigmas, "mu": compute_empirical_mu(self.image_seq_len(height, width), num_steps)}


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2-klein through ``Flux2KleinPipeline``: Qwen3 prompt encoder, no guidance embedding;
    true CFG against the empty prompt (none for the step-distilled klein, ``is_distilled``)."""

    family = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"

    @property
    def distilled_guidance(self) -> bool:  # type: ignore[override]
        return bool(self.pipe.config.get("is_distilled", False))

    @property
    def guidance_embedded(self) -> bool:
        return False  # the klein pipeline passes guidance=None
