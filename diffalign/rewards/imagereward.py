"""ImageReward v1.0 -- Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences
for Text-to-Image Generation".

Architecture (BLIP, Li et al. 2022): a ViT-L/16 image encoder (224 px, width 1024, 24 blocks,
LayerNorm eps 1e-6) whose patch tokens feed the cross-attention of a 12-layer BERT text
encoder (BLIP's "med" BERT: word + absolute position embeddings, self-attention, then
cross-attention to the image tokens in every layer). The [CLS] state of the prompt goes through
the MLP head 768-1024-128-64-16-1 (no nonlinearities, as published). Then

    score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072

-- the published normalisation (mean/std of the raw head on their data), part of the reference
definition. Units: standard deviations above ImageReward's training-set mean (roughly -2..2).

Preprocessing (torchvision in the reference): resize shortest side to 224 bicubic, centre
crop 224 (offset rounded), OpenAI CLIP mean/std. Text: ``bert-base-uncased`` WordPiece with
BLIP's added ``[DEC]``/``[ENC]`` tokens, padded/truncated to 35 tokens.

The modules below are written for this reward; their parameter names follow the checkpoint
(``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``), so ``ImageReward.pt``
(hub ``THUDM/ImageReward``, read with ``torch.load(weights_only=True)``) loads without
renaming. ``imagereward=PATH``: a directory with ``ImageReward.pt`` and ``med_config.json``;
optional ``imagereward_config.json`` (vision size / tokenizer, used by the tiny test model) and
``tokenizer/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .base import Reward, RewardOutput
from .clip import AestheticMLP, resolve_dtype
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ResizeCropNormalize
from .weights import check_and_load, load_pretrained, load_state_dict_file, resolve_file

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


@dataclass
class ImageRewardConfig:
    """Architecture/preprocessing knobs; the defaults are ImageReward v1.0's."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    tokenizer: str = "bert-base-uncased"
    max_length: int = 35
    # text encoder (BLIP med_config.json; encoder_width is replaced by vision_width as in BLIP)
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"


# --------------------------------------------------------------------------------------------
# BLIP ViT
# --------------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _ViTMlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BLIPVisionTransformer(nn.Module):
    """Pre-norm ViT; returns all tokens after the final LayerNorm ``[B, 1 + N, width]``."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList([_ViTBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# BLIP "med" BERT with cross-attention
# --------------------------------------------------------------------------------------------


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(self, x, context, mask):
        b, n, c = x.shape
        h = self.heads

        def split(t):
            return t.reshape(b, t.shape[1], h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)), split(self.value(context)),
                                           attn_mask=mask)
        return y.transpose(1, 2).reshape(b, n, c)


class _BertSelfOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertSelfOutput(cfg)

    def forward(self, x, context, mask):
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # BERT's "gelu" is the exact erf form


class _BertOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class _BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, encoder_width: int):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, encoder_width)
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertOutput(cfg)

    def forward(self, x, self_mask, image_tokens, image_mask):
        x = self.attention(x, x, self_mask)
        x = self.crossattention(x, image_tokens, image_mask)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList([_BertLayer(cfg, encoder_width) for _ in range(cfg.num_hidden_layers)])


class BLIPTextEncoder(nn.Module):
    """BLIP's BERT in "multimodal" mode; returns the last hidden states ``[B, T, hidden]``."""

    def __init__(self, cfg: ImageRewardConfig, encoder_width: int):
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg, encoder_width)

    def forward(self, input_ids, attention_mask, image_tokens):
        x = self.embeddings(input_ids)
        # boolean masks: True = attend (padding keys are excluded, as BLIP's -10000 additive mask does)
        self_mask = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, self_mask, image_tokens, None)  # all image tokens are valid
        return x


class _BLIP(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = BLIPVisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width,
                                                    cfg.vision_depth, cfg.vision_heads)
        self.text_encoder = BLIPTextEncoder(cfg, cfg.vision_width)


class ImageRewardModel(nn.Module):
    """BLIP image/text encoders + MLP head; ``forward`` returns the *raw* head output ``[B]``."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.config = cfg
        self.blip = _BLIP(cfg)
        self.mlp = AestheticMLP(cfg.hidden_size)  # same 5-Linear head layout as the LAION predictor

    def forward(self, pixel_values, input_ids, attention_mask):
        image_tokens = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        return self.mlp(hidden[:, 0].float()).squeeze(-1)


# Parts of ImageReward.pt the scorer does not use (BLIP's contrastive projections, buffers).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def read_imagereward_config(directory: Path | None) -> ImageRewardConfig:
    cfg = ImageRewardConfig()
    fields = set(asdict(cfg))
    if directory is None:
        return cfg
    med = directory / "med_config.json"
    if med.is_file():
        data = json.loads(med.read_text())
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "layer_norm_eps", "pad_token_id", "hidden_act"):
            if k in data:
                setattr(cfg, k, type(getattr(cfg, k))(data[k]))
    extra = directory / "imagereward_config.json"
    if extra.is_file():
        data = json.loads(extra.read_text())
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UserError(f"imagereward: unknown key '{unknown[0]}' in '{extra}'; valid: {', '.join(sorted(fields))}")
        for k, v in data.items():
            setattr(cfg, k, v)
    if cfg.hidden_act != "gelu":
        raise UserError(f"imagereward: hidden_act '{cfg.hidden_act}' is not supported (BLIP uses gelu)")
    return cfg


def build_blip_tokenizer(name: str, what: str = "imagereward"):
    """bert-base-uncased WordPiece + BLIP's special tokens (``[DEC]`` as BOS, ``[ENC]``)."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer.from_pretrained, name, what,
                          "--reward imagereward=/path/to/dir (with a tokenizer/ folder)")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(Reward):
    """ImageReward v1.0 reward (see module docstring for reference, formula and units)."""

    name = "imagereward"
    needs_prompt = True
    differentiable = True
    units = "z (published mean/std)"

    def __init__(self, path: str | None = None, *, normalize: bool = True, batch_size: int = 16, device=None,
                 dtype=None, name: str | None = None):
        super().__init__(batch_size=batch_size, device=device)
        self.path = path
        self.normalize = normalize
        self.dtype = resolve_dtype(dtype, self.device)
        if name:
            self.name = name
        self.model: ImageRewardModel | None = None
        self.tokenizer = None
        self.preprocess: ResizeCropNormalize | None = None

    def load(self) -> None:
        hint = "--reward imagereward=/path/to/dir (holding ImageReward.pt and med_config.json)"
        directory: Path | None = None
        if self.path and Path(os.path.expanduser(self.path)).is_dir():
            directory = Path(os.path.expanduser(self.path))
            ckpt = resolve_file(str(directory), IMAGEREWARD_REPO, "ImageReward.pt", self.name, hint)
        else:
            ckpt = resolve_file(self.path or "", IMAGEREWARD_REPO, "ImageReward.pt", self.name, hint)
            directory = ckpt.parent
            if not (directory / "med_config.json").is_file() and not self.path:
                med = resolve_file("", IMAGEREWARD_REPO, "med_config.json", self.name, hint)
                directory = med.parent
        cfg = read_imagereward_config(directory)
        tok_name = cfg.tokenizer
        if not os.path.isabs(tok_name) and (directory / tok_name).is_dir():
            tok_name = str(directory / tok_name)
        self.tokenizer = build_blip_tokenizer(tok_name, self.name)
        if len(self.tokenizer) > cfg.vocab_size:
            raise UserError(f"imagereward: tokenizer '{tok_name}' has {len(self.tokenizer)} tokens but the text "
                            f"encoder has {cfg.vocab_size}")
        model = ImageRewardModel(cfg)
        check_and_load(model, load_state_dict_file(ckpt), self.name, ckpt, ignore_unexpected=_UNUSED_PREFIXES)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ResizeCropNormalize(size=cfg.image_size, crop=(cfg.image_size, cfg.image_size),
                                              mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_rounding="round")

    def score_batch(self, images, prompts, metadata):
        assert self.model is not None
        pixels = self.preprocess(images, device=self.device, dtype=self.dtype)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.model.config.max_length,
                             return_tensors="pt")
        raw = self.model(pixels, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        s = (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD if self.normalize else raw
        return RewardOutput(s, {self.name: s, "imagereward_raw": raw})


def init_like_blip(model: ImageRewardModel, std: float = 0.02) -> None:
    """Random init for tiny test models (truncated-normal-ish Linear/Embedding, unit LayerNorm)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.blip.visual_encoder.pos_embed, std=std)
    nn.init.normal_(model.blip.visual_encoder.cls_token, std=std)
    for name, p in model.mlp.named_parameters():
        if name.endswith("weight"):
            nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))
