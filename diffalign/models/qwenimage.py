"""Qwen-Image (``QwenImagePipeline``): Qwen2.5-VL prompt encoding, a video-style VAE, a packed MMDiT.

What differs from SD3, all of it as ``diffusers/pipelines/qwenimage/pipeline_qwenimage.py`` defines it:

* **Prompt**: the pipeline's own ``encode_prompt`` (chat template, last hidden state of the Qwen2.5-VL
  language model, the template's system tokens dropped, a mask over the valid tokens). The pipeline
  pads a batch to its longest prompt; here every batch is padded (zeros, mask 0) to
  ``model_opts.max_sequence_length`` so conditioning of different batches concatenates (CFG rows,
  cached captions). The transformer masks padded keys in its joint attention and gives text tokens
  positions from 0, so padding does not change the image tokens' output.
* **Latents**: ``AutoencoderKLQwenImage`` works on ``[B, C, frames, H, W]``; images are one frame.
  Latents are normalised per channel with the VAE's ``latents_mean`` / ``latents_std``. diffalign
  keeps latents unpacked, ``[B, C, h, w]`` (what the rollout engine, the losses and the cache see);
  :meth:`QwenImageAdapter.predict` packs them into the transformer's 2x2-patch tokens and unpacks
  its output, with ``img_shapes`` = (1 frame, h/2, w/2) per row.
* **Sampling**: sigmas ``linspace(1, 1/N, N)`` shifted with ``mu`` from the image token count
  (``calculate_shift`` with the scheduler's base/max shift and sequence lengths).
* **Guidance**: true CFG with a negative prompt (the empty prompt here, as the GRPO trainer's
  unconditional row), followed by the pipeline's norm-preserving rescale: per image token the
  guided velocity is scaled to the norm of the conditional one (:meth:`QwenImageAdapter.guide`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Cond
from .flow import FlowMatchAdapter, pack_patches, unpack_patches


class QwenImageAdapter(FlowMatchAdapter):
    """Qwen-Image: Qwen2.5-VL text encoder, Qwen-Image VAE, 2x2-packed dual-stream MMDiT, true CFG."""

    family = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser_name = "transformer"
    # diffusers' Qwen-Image LoRA script default (examples/dreambooth/train_dreambooth_lora_qwen_image.py):
    # the image stream's attention projections. Pass lora.target_modules for the text stream
    # (add_q_proj, add_k_proj, add_v_proj, to_add_out) and the MLPs (img_mlp.net.0.proj, ...).
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(self, pipe, model_id: str, opts) -> None:
        super().__init__(pipe, model_id, opts)
        self.max_sequence_length = int(opts.max_sequence_length)

    # ----------------------------------------------------------------------- components
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae_config.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        # as the pipeline's prepare_latents: latent sides rounded down to even (whole 2x2 patches)
        f = self.vae_scale_factor
        return (self.latent_channels, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    # ----------------------------------------------------------------------- prompts
    def encode_prompt(self, prompts: list[str]) -> Cond:
        n = self.max_sequence_length
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(list(prompts), device=self.device, max_sequence_length=n)
        b, length, _ = embeds.shape
        if mask is None:  # the pipeline drops an all-valid mask
            mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, n - length))
        mask = torch.nn.functional.pad(mask.long(), (0, n - length))
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    # ----------------------------------------------------------------------- images
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae_config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of each image as a one-frame video, frame dim dropped: ``[B, C, h, w]``."""
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the transformer's space: ``(z - latents_mean) / latents_std`` per channel."""
        z = latents.to(self.device).float()
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(vae.device).float()
        mean, std = self._latent_stats(z)
        images = vae.decode((z * std + mean).to(vae.dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------------- forward
    def predict(self, x_t, timesteps, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        dtype = next(net.parameters()).dtype  # the called network's: the frozen bf16 reference is not the fp32 policy
        b, _, h, w = x_t.shape
        with self.attention_context():
            out = net(
                hidden_states=pack_patches(x_t.to(dtype)),
                timestep=timesteps.to(x_t.device, torch.float32) / self.num_train_timesteps,
                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                encoder_hidden_states_mask=cond["encoder_hidden_states_mask"].to(x_t.device).bool(),
                img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False,
            )[0]
        return unpack_patches(out, h, w)

    def guide(self, cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
        """True CFG, then the pipeline's rescale: each image token's guided velocity (its 2x2 patch
        across channels) gets the norm of the conditional velocity of that token."""
        h, w = cond_out.shape[-2:]
        c, u = pack_patches(cond_out), pack_patches(uncond_out)
        guided = u + scale * (c - u)
        guided = guided * (c.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        return unpack_patches(guided, h, w)

    @classmethod
    def pipeline_guidance_kwargs(cls, scale: float, batch_size: int) -> dict:
        """``QwenImagePipeline`` ignores ``guidance_scale`` (guidance-distilled variants only); its CFG is
        ``true_cfg_scale`` and runs only with a negative prompt: the empty one, as in training."""
        if scale <= 1.0:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": scale, "negative_prompt": [""] * batch_size}

    # ----------------------------------------------------------------------- sampling
    def set_timesteps_kwargs(self, num_steps: int, height: int | None, width: int | None) -> dict:
        """The pipeline's ``sigmas = linspace(1, 1/N, N)`` and ``mu = calculate_shift(image tokens)``;
        the default size is the pipeline's (``default_sample_size * vae_scale_factor``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        default = self.pipe.default_sample_size * self.vae_scale_factor
        _, h, w = self.latent_shape(height or default, width or default)
        cfg = self.noise_scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps).tolist(), "mu": mu}
