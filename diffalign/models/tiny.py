"""Tiny random-init models in diffusers format, for tests and CPU smoke runs.

Each builder writes a complete pipeline directory (``model_index.json``, scheduler,
tokenizers, text encoders, VAE, denoiser) that ``DiffusionPipeline.from_pretrained(dir)``
loads with no network, exactly as it would load ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
Sizes are chosen so a build takes seconds and the directory stays well under 20 MB.

The tokenizer is a real ``CLIPTokenizer`` with a byte-level vocabulary (one token per
byte, no merges): every string tokenizes, without shipping the 49k-entry CLIP BPE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tiny_qwenimage import build_qwenimage
from .tiny_flux import FLUX2_BUILDERS, deterministic_posterior, flux_scheduler

TINY_TEXT_DIM = 32
TINY_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte -> printable unicode table (a public fact of byte-level BPE).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_tokenizer(save_dir: str | os.PathLike | None = None):
    """A CLIPTokenizer over a 514-token byte-level vocabulary; saved to ``save_dir`` if given."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_LENGTH)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def tiny_clip_text_config(projection_dim: int = TINY_TEXT_DIM, hidden: int = TINY_TEXT_DIM):
    from transformers import CLIPTextConfig

    tok_vocab = 514
    return CLIPTextConfig(
        vocab_size=tok_vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tok_vocab - 2,
        eos_token_id=tok_vocab - 1,
        pad_token_id=tok_vocab - 1,
        hidden_act="gelu",
    )


def _tiny_vae(latent_channels: int = 4, shifted: bool = False):
    """A tiny AutoencoderKL that behaves like a trained one where training code can tell.

    Random init would give a posterior std near 1, so every ``latent_dist.sample()`` would be
    mostly noise and nothing downstream could learn. As with real VAEs we make the encoder
    near-deterministic (log-variance -12) and calibrate ``scaling_factor`` (and ``shift_factor``
    for SD3-style VAEs) so latents of natural-ish images have unit std, as SD's 0.18215 does.
    """
    from diffusers import AutoencoderKL

    # Two blocks -> spatial factor 2 (SD's VAE uses 8); the pipeline reads the factor from config.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=32,
    )
    with torch.no_grad():
        images = deterministic_posterior(vae, latent_channels)
        mean = vae.encode(images).latent_dist.mean
    shift = float(mean.mean()) if shifted else None
    std = float((mean - (shift or 0.0)).std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    return vae


def build_sd15(out: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Tiny SD1.5/SD2.1-layout pipeline (``prediction_type='v_prediction'`` gives the SD2.1 flavour)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    # Training scheduler of SD1.5 (scaled_linear betas); the pipeline swaps in its own sampler.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def build_sdxl(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny SDXL-layout pipeline: two text encoders, pooled embeds, text_time add-embedding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=2 * TINY_TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + TINY_TEXT_DIM,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(tiny_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def tiny_t5_tokenizer(save_dir: str | os.PathLike | None = None):
    """A T5Tokenizer (Unigram) over single characters: tiny, but tokenizes any ASCII text."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


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
        vae=_tiny_vae(shifted=True),
        text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config()),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


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
        scheduler=flux_scheduler(), vae=_tiny_vae(shifted=True), text_encoder=CLIPTextModel(tiny_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def build_flux_schnell(out: str | os.PathLike, seed: int = 0) -> Path:
    return build_flux(out, seed, guidance_embeds=False)


BUILDERS = {
    "sd15": build_sd15,
    "sd21": lambda out, seed=0: build_sd15(out, seed, prediction_type="v_prediction"),
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "qwenimage": build_qwenimage,
    "flux": build_flux,
    "flux-schnell": build_flux_schnell,
    **FLUX2_BUILDERS,
}


def dir_size_mb(path: str | os.PathLike) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def describe(path: str | os.PathLike) -> str:
    index = json.loads((Path(path) / "model_index.json").read_text())
    return f"{index['_class_name']} at {path} ({dir_size_mb(path):.1f} MB)"
