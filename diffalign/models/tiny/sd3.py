"""Tiny SD3 pipeline (MMDiT, three text encoders, flow-matching Euler)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import TINY_TEXT_DIM, tiny_clip_text_config, tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae


def build_sd3(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny SD3/SD3.5-layout pipeline: two CLIP encoders with projection and a T5 encoder.

    As in SD3, the concatenated CLIP hidden states (2*32) are zero-padded to the T5 width,
    which is the transformer's ``joint_attention_dim``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5_dim = 2 * TINY_TEXT_DIM
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_TEXT_DIM,
        out_channels=4,
        pos_embed_max_size=32,
    )
    t5_tok = tiny_t5_tokenizer()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=t5_dim,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(shifted=True),
        text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config()),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
