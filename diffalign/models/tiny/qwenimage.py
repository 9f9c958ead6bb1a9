"""Tiny random-init Qwen-Image pipeline (``QwenImagePipeline``) for tests and CPU smoke runs.

Same contract as :mod:`diffalign.models.tiny`: ``build_qwenimage(dir)`` writes a complete diffusers
directory that ``DiffusionPipeline.from_pretrained(dir)`` loads offline, in seconds, well under 20 MB.

* **Tokenizer**: a real ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer regex) whose merges
  are learnt here with the ``tokenizers`` library from the pipeline's prompt template and a few
  hundred common caption words. It carries the chat special tokens the template uses
  (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``), and the template's system part tokenizes
  to exactly the ``prompt_template_encode_start_idx`` (34) tokens the pipeline drops, as with the
  real 151k-token vocabulary: the embeddings the transformer sees start at the user's prompt.
* **Text encoder**: ``Qwen2_5_VLForConditionalGeneration`` with a 2-layer, 32-wide language model
  (multimodal RoPE sections scaled down) and a 1-block vision tower the pipeline never calls.
* **VAE**: ``AutoencoderKLQwenImage`` (causal 3D convs, frame dim) with one spatial downsample (x2)
  and 4 latent channels; like :func:`~diffalign.models.tiny` VAEs it is made near-deterministic
  and its per-channel ``latents_mean`` / ``latents_std`` are calibrated so latents have unit std.
* **Transformer**: ``QwenImageTransformer2DModel``, 2 layers, 2 heads of 16 (RoPE axes 4/6/6).
* **Scheduler**: Qwen/Qwen-Image's own ``scheduler_config.json`` values (dynamic shifting with an
  exponential time shift, base/max shift 0.5/0.9 over 256..8192 tokens, ``shift_terminal`` 0.02).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .common import deterministic_posterior

TEXT_DIM = 32
LATENT_CHANNELS = 4
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWENIMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)

_WORDS = (
    "a an the of and with in on at by to from for is are two three one small large big red green blue yellow "
    "orange purple pink black white brown gray grey cat dog bird horse car bus apple banana tree flower house "
    "city street beach mountain river sky sun moon photo painting picture portrait drawing of an old young man "
    "woman child people sitting standing running next behind under over near left right top bottom circle square "
    "triangle object objects background foreground bright dark warm cool light style art digital realistic"
)


def tiny_qwen2_tokenizer(template: str, save_dir: str | os.PathLike | None = None):
    """A ``Qwen2Tokenizer`` whose BPE merges are learnt from ``template`` (the pipeline's prompt
    template) and common caption words: a few hundred tokens, any string still tokenizes (bytes)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    system = template.split("{}")[0]
    # the chat roles follow a special token, so they are words of their own (no leading space)
    parts = re.split("|".join(map(re.escape, SPECIAL_TOKENS)), system)
    corpus = parts * 50 + [_WORDS, " " + _WORDS] * 20
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def tiny_qwen25vl_text_encoder(vocab_size: int, pad_token_id: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
            # head_dim 16: the three multimodal RoPE sections (t, h, w) share its 8 frequency pairs
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=pad_token_id, eos_token_id=pad_token_id, pad_token_id=pad_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
                           fullatt_block_indexes=[0]),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def calibrated_qwenimage_vae():
    """A 2x-downsampling ``AutoencoderKLQwenImage`` whose posterior is near-deterministic
    (log-variance -12) and whose ``latents_mean`` / ``latents_std`` whiten latents of smooth
    coloured images per channel, as the real VAE's published statistics do."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False], latents_mean=[0.0] * LATENT_CHANNELS,
                                 latents_std=[1.0] * LATENT_CHANNELS)
    with torch.no_grad():
        images = deterministic_posterior(vae, LATENT_CHANNELS)
        mean = vae.encode(images.unsqueeze(2)).latent_dist.mean[:, :, 0]  # [B, C, 1, h, w] -> frame 0
    dims = (0, 2, 3)
    vae.register_to_config(latents_mean=mean.mean(dims).tolist(), latents_std=mean.std(dims).tolist())
    return vae


def build_qwenimage(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny Qwen-Image pipeline: Qwen2.5-VL text encoder, Qwen-Image VAE, MMDiT, dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    # the template and the number of its tokens the pipeline drops live on the pipeline instance
    probe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    template, drop = probe.prompt_template_encode, probe.prompt_template_encode_start_idx
    tokenizer = tiny_qwen2_tokenizer(template)
    prefix = tokenizer(template.split("{}")[0])["input_ids"]
    if len(prefix) != drop:  # the pipeline would keep part of the system prompt, or cut the user's
        raise RuntimeError(f"tiny Qwen2 tokenizer: the template's system part is {len(prefix)} tokens, the pipeline drops {drop}")
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER),
        vae=calibrated_qwenimage_vae(),
        text_encoder=tiny_qwen25vl_text_encoder(len(tokenizer), tokenizer.pad_token_id),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
