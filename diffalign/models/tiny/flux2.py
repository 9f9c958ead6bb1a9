"""Tiny random-init FLUX.2 pipelines (dev: Mistral3 encoder; klein: Qwen3 encoder).

FLUX.2's text encoders are decoder LLMs whose pipelines read fixed intermediate layers (Mistral3:
10, 20, 30; Qwen3: 9, 18, 27), so the tiny encoders keep that depth at a width of 16. Their
tokenizers are byte-level BPE tokenizers built with the ``tokenizers`` library (no merges), with the
special tokens and a chat template of the real one's shape, saved as fast tokenizers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .common import deterministic_posterior, flux_scheduler


# ------------------------------------------------------------------------------------ FLUX.2
TINY_LLM_DIM = 16

# Mistral Small 3's chat layout (system prompt, then one [INST] turn), for message contents given
# as strings or as lists of {"type": "text"} parts, as Flux2Pipeline's format_input builds them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's chat layout with thinking disabled (an empty think block), as Flux2KleinPipeline renders it
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_level_vocab(special: list[str]) -> tuple[dict[str, int], list[str]]:
    """One token per byte (byte-level BPE with no merges) followed by ``special``."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for tok in special:
        vocab[tok] = len(vocab)
    return vocab, []


def tiny_mistral_processor():
    """A PixtralProcessor (Flux2Pipeline's ``tokenizer``) over a byte-level tokenizer with Mistral's
    special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
               "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab, merges = _byte_level_vocab(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    # The pipeline's system message is one token here, so the prompt after it fits in a few hundred
    # tokens as it does with Mistral's 131k vocabulary (one token per byte would take ~190).
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    backend.add_tokens([SYSTEM_MESSAGE])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=512)
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=16), tokenizer=tok, patch_size=16,
                            spatial_merge_size=1, chat_template=MISTRAL_CHAT_TEMPLATE)


def tiny_mistral3_encoder(processor):
    """Mistral3ForConditionalGeneration with a 30-layer, 16-wide language model (Flux2Pipeline
    stacks hidden states 10, 20 and 30) and a one-layer vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok = processor.tokenizer
    text = MistralConfig(vocab_size=len(tok), hidden_size=TINY_LLM_DIM, intermediate_size=2 * TINY_LLM_DIM,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=TINY_LLM_DIM, intermediate_size=2 * TINY_LLM_DIM, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=64, patch_size=16)
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                            spatial_merge_size=1)
    return Mistral3ForConditionalGeneration(config)


def tiny_qwen3_tokenizer():
    """A Qwen2 tokenizer (Flux2KleinPipeline's) over a byte-level vocabulary with Qwen's chat tokens."""
    from transformers import Qwen2TokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab, merges = _byte_level_vocab(special)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=512)
    tok.add_tokens(special, special_tokens=True)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def tiny_qwen3_encoder(tokenizer):
    """Qwen3ForCausalLM, 27 layers of width 16 (Flux2KleinPipeline stacks hidden states 9, 18, 27)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TINY_LLM_DIM, intermediate_size=2 * TINY_LLM_DIM, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    ))


def tiny_flux2_vae():
    """A tiny AutoencoderKLFlux2 calibrated like :func:`.common.tiny_vae`: near-deterministic posterior
    (log-variance -12), and BatchNorm running statistics of natural-ish images' patchified latents,
    so the transformer's latents have unit scale as with the real VAE."""
    from diffusers import AutoencoderKLFlux2

    from ..flux2 import patchify

    latent_channels = 4
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels, sample_size=32,
    )
    with torch.no_grad():
        images = deterministic_posterior(vae, latent_channels)
        z = patchify(vae.encode(images).latent_dist.mean)
        vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))
    return vae


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=guidance_embeds,
    )


def build_flux2(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny FLUX.2-dev-layout pipeline: Mistral3 encoder (PixtralProcessor), guidance embedding."""
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    processor = tiny_mistral_processor()
    pipe = Flux2Pipeline(scheduler=flux_scheduler(), vae=tiny_flux2_vae(), text_encoder=tiny_mistral3_encoder(processor),
                         tokenizer=processor, transformer=_flux2_transformer(3 * TINY_LLM_DIM, guidance_embeds=True))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def build_flux2_klein(out: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny FLUX.2-klein-layout pipeline: Qwen3 encoder, no guidance embedding (true CFG)."""
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_qwen3_tokenizer()
    pipe = Flux2KleinPipeline(scheduler=flux_scheduler(), vae=tiny_flux2_vae(), text_encoder=tiny_qwen3_encoder(tokenizer),
                              tokenizer=tokenizer, transformer=_flux2_transformer(3 * TINY_LLM_DIM, guidance_embeds=False))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


FLUX2_BUILDERS = {"flux2": build_flux2, "flux2-klein": build_flux2_klein}
