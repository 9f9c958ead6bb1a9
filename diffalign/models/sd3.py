"""Flow-matching DiT family: SD3 / SD3.5 (MMDiT, rectified-flow velocity target)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Cond
from .flow import FlowMatchAdapter


def zero_t5_tokens(pipe) -> int | None:
    """For an SD3 pipeline saved without its T5 encoder, the number of zero T5 tokens it was
    trained with, if the checkpoint records it (``testbed_base.json``: the testbed's flow base);
    else None. Without T5 those tokens are identical zeros, yet the MMDiT attends to every one,
    so their count is part of the model: the pipeline's default of 256 would change its output."""
    import json
    from pathlib import Path

    if getattr(pipe, "text_encoder_3", None) is not None:
        return None
    info = Path(str(getattr(pipe, "name_or_path", "") or "")) / "testbed_base.json"
    try:
        return int(json.loads(info.read_text(encoding="utf-8"))["config"]["max_sequence_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SD3Adapter(FlowMatchAdapter):
    """SD3 / SD3.5: three text encoders (T5 optional), pooled projections, joint-attention MMDiT."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    # Joint-attention projections of every MMDiT block (diffusers' SD3 LoRA default).
    default_lora_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )

    def __init__(self, pipe, model_id: str, opts) -> None:
        super().__init__(pipe, model_id, opts)
        self.max_sequence_length = zero_t5_tokens(pipe) or opts.max_sequence_length

    def encode_prompt(self, prompts: list[str]) -> Cond:
        prompts = list(prompts)
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
                num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, x_t, timesteps, cond: Cond, denoiser: Any = None) -> torch.Tensor:
        net = denoiser if denoiser is not None else self.denoiser
        dtype = next(net.parameters()).dtype  # the called network's: the frozen bf16 reference is not the fp32 policy
        with self.attention_context():
            return net(
                hidden_states=x_t.to(dtype),
                timestep=timesteps.to(x_t.device, torch.float32),
                encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                pooled_projections=cond["pooled_projections"].to(dtype),
                return_dict=False,
            )[0]
