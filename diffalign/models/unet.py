"""UNet family: SD1.5 / SD2.1 (epsilon or v-prediction) and SDXL (two encoders, micro-conditioning)."""

from __future__ import annotations

from typing import Any

import torch

from ..tensors import per_row

from .base import Cond, DiffusionAdapter, Predict, SamplingSchedule


class UNetAdapter(DiffusionAdapter):
    """Discrete-time DDPM backbones. Timesteps are integers in [0, num_train_timesteps)."""

    family = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    is_flow = False
    denoiser_name = "unet"
    # Attention projections, as diffusers' DPO/LoRA examples target.
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(self, pipe, model_id: str, opts) -> None:
        from diffusers import DDPMScheduler

        # Training always uses the DDPM forward process of the checkpoint's betas, whatever
        # sampler the pipeline ships with (diffusers' training scripts do the same).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        super().__init__(pipe, model_id, opts)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.noise_scheduler.alphas_cumprod

    def encode_prompt(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device="cpu").long()

    def noisy_input_and_target(self, latents, noise, timesteps):
        t = timesteps.to(latents.device)
        x_t = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in {self.model_id} scheduler config")
        return x_t, target

    def predict(self, x_t, timesteps, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        dtype = next(net.parameters()).dtype  # the called network's: the frozen bf16 reference is not the fp32 policy
        with self.attention_context():
            return net(
                x_t.to(dtype),
                timesteps.to(x_t.device),
                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                added_cond_kwargs=self._added_cond(x_t, cond, dtype),
                return_dict=False,
            )[0]

    def _added_cond(self, x_t, cond, dtype):
        return None

    def sampling_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> SamplingSchedule:
        """diffusers' ``DDIMScheduler`` timesteps of the checkpoint's own scheduler config (spacing,
        ``steps_offset``, ``set_alpha_to_one``), whatever sampler the pipeline ships with."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.pipe.scheduler.config)
        ddim.set_timesteps(num_steps)
        ts = ddim.timesteps.long().cpu()
        prev = ts - ddim.config.num_train_timesteps // num_steps  # DDIMScheduler.step's previous timestep
        abar = ddim.alphas_cumprod.float()
        a_t = abar[ts]
        a_prev = torch.where(prev >= 0, abar[prev.clamp_min(0)], torch.as_tensor(ddim.final_alpha_cumprod, dtype=torch.float32))
        nxt = torch.where(prev >= 0, prev, torch.full_like(prev, -1)).float()
        a_prev_s, sig_prev = a_prev.sqrt(), (1 - a_prev).sqrt()
        cap = float(sig_prev[0] / (a_prev_s[0] + sig_prev[0]))
        return SamplingSchedule(self.prediction_type, ts.float(), nxt, a_t.sqrt(), (1 - a_t).sqrt(), a_prev_s, sig_prev, cap)

    def invert(self, predict: Predict, latents, timesteps, steps: int):
        """eta = 0 DDIM inversion on the integer grid ``round(k t / K)`` (v-prediction converted to eps);
        target: the implied eps, or for v-prediction ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
        from .inversion import ddim_invert, implied_eps

        ac = self.alphas_cumprod.float().cpu()
        ptype = self.prediction_type
        if ptype not in ("epsilon", "v_prediction"):
            raise ValueError(f"ddim_inversion noising: unsupported prediction_type {ptype!r}")

        def predict_eps(x, s):
            out = predict(x, s).float()
            if ptype == "epsilon":
                return out
            a = per_row(ac[s.cpu()], x)
            return a.sqrt() * out + (1.0 - a).sqrt() * x  # v -> eps

        x_t = ddim_invert(predict_eps, latents, timesteps, ac, steps)
        a_t = ac[timesteps.cpu().long()]
        eps = implied_eps(x_t, latents, a_t)
        if ptype == "epsilon":
            return x_t, eps
        a = per_row(a_t, x_t)
        return x_t, a.sqrt() * eps - (1.0 - a).sqrt() * latents.float()


class SDXLAdapter(UNetAdapter):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_kwargs = {}

    def encode_prompt(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def time_ids(self, batch: int, height: int, width: int, crop_top_left=(0, 0), original_size=None, device=None):
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        original_size = original_size or (height, width)
        ids = torch.tensor([list(original_size) + list(crop_top_left) + [height, width]], dtype=torch.float32)
        return ids.repeat(batch, 1).to(device or self.device)

    def _added_cond(self, x_t, cond, dtype):
        if "time_ids" in cond:
            time_ids = cond["time_ids"]
        else:
            f = self.vae_scale_factor
            time_ids = self.time_ids(x_t.shape[0], x_t.shape[-2] * f, x_t.shape[-1] * f, device=x_t.device)
        return {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": time_ids.to(dtype)}
