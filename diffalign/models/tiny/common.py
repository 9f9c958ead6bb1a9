"""What the tiny builders share: the byte-level CLIP and T5 tokenizers, the CLIP text config, the
KL VAE, FLUX's scheduler config and the VAE calibration (a near-deterministic posterior and the
batch that sets the latent scale statistics). Conventions: :mod:`diffalign.models.tiny`.

The CLIP tokenizer is a real ``CLIPTokenizer`` with a byte-level vocabulary (one token per byte, no
merges): every string tokenizes, without shipping the 49k-entry CLIP BPE.
"""

from __future__ import annotations

import os

import torch

TINY_TEXT_DIM = 32
TINY_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
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

    chars = list(bytes_to_unicode().values())
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


def tiny_vae(latent_channels: int = 4, shifted: bool = False):
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




def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1's scheduler config: resolution-dependent shift (mu) instead of a fixed one
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def deterministic_posterior(vae, latent_channels: int) -> torch.Tensor:
    """Make a random-init VAE's encoder near-deterministic (log-variance -12, as real VAEs are) and
    return the calibration batch: 16 natural-ish 32 px images (flat colours with a horizontal ramp)
    in [-1, 1], whose latents the tiny builders use to set the latent scale statistics."""
    vae.quant_conv.weight[latent_channels:] = 0.0
    vae.quant_conv.bias[latent_channels:] = -12.0
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(16, 3, 1, 1, generator=g)
    ramp = torch.linspace(-0.3, 0.3, 32).view(1, 1, 1, 32)
    return (colours + ramp * torch.rand(16, 1, 1, 1, generator=g)).expand(-1, -1, 32, -1).clamp(0, 1) * 2 - 1
