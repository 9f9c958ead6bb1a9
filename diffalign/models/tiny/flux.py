"""Tiny FLUX.1 pipelines (dev: guidance-distilled; schnell: no guidance input)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import TINY_TEXT_DIM, flux_scheduler, tiny_clip_text_config, tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae


def build_flux(out: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Tiny FLUX.1-layout pipeline: CLIP (pooled) + T5 encoders, one double and one single block.
    ``guidance_embeds`` gives the dev flavour (guidance-distilled); False the schnell one."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5_dim = 2 * TINY_TEXT_DIM
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=t5_dim, pooled_projection_dim=TINY_TEXT_DIM, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    t5_tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=t5_dim, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    pipe = FluxPipeline(
        scheduler=flux_scheduler(), vae=tiny_vae(shifted=True), text_encoder=CLIPTextModel(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def build_flux_schnell(out: str | os.PathLike, seed: int = 0) -> Path:
    return build_flux(out, seed, guidance_embeds=False)
