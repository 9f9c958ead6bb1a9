"""CLIP-family rewards on transformers' ``CLIPModel``: CLIPScore, PickScore, LAION aesthetic.

All three embed images with a CLIP vision tower after :class:`ResizeCropNormalize` (parameters
read from the checkpoint's ``preprocessor_config.json``), computed in torch on the reward's
device so they are differentiable w.r.t. the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from .base import Reward, RewardOutput, TextEmbeddingCache, stack_rows
from .preprocess import ResizeCropNormalize
from .weights import check_and_load, load_pretrained, load_state_dict_file, resolve_file


def projected_features(out) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` return a tensor in transformers 4.x and
    may return a model-output object (projected ``pooler_output``) in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read features from {type(out).__name__}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16")
    return table[dtype]


class CLIPEmbedder:
    """A frozen transformers ``CLIPModel`` + tokenizer + torch preprocessing.

    ``image_embeds(pixels)`` and ``text_embeds(prompts)`` return L2-normalised projections.
    Shared by the CLIP rewards and by reward-model training (so training and scoring
    preprocess identically).
    """

    def __init__(self, model, tokenizer, preprocess: ResizeCropNormalize, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_length: int = 77):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.max_length = min(max_length, int(getattr(model.config.text_config, "max_position_embeddings", max_length)))

    @classmethod
    def from_pretrained(cls, model_name: str, processor_name: str | None, device: torch.device,
                        dtype: torch.dtype = torch.float32, what: str = "clip", local_hint: str = "NAME=/path/to/dir",
                        trainable: bool = False) -> CLIPEmbedder:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        model = load_pretrained(CLIPModel.from_pretrained, model_name, what, local_hint)
        processor_name = processor_name or model_name
        image_proc = load_pretrained(CLIPImageProcessor.from_pretrained, processor_name, what, local_hint)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor_name, what, local_hint)
        model = model.to(device=device, dtype=dtype)
        if not trainable:
            model.eval().requires_grad_(False)
        return cls(model, tokenizer, ResizeCropNormalize.from_image_processor(image_proc), device, dtype)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def pixel_values(self, images) -> torch.Tensor:
        return self.preprocess(images, device=self.device, dtype=self.dtype)

    def image_embeds(self, images, normalize: bool = True) -> torch.Tensor:
        emb = projected_features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()
        return emb / emb.norm(dim=-1, keepdim=True) if normalize else emb

    def text_embeds(self, prompts: list[str], normalize: bool = True) -> torch.Tensor:
        emb = projected_features(self.model.get_text_features(**self.tokenize(prompts))).float()
        return emb / emb.norm(dim=-1, keepdim=True) if normalize else emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().float()


class _CLIPTextImageReward(Reward):
    """Shared machinery: lazy CLIP load, cached normalised text embeddings, cosine per pair."""

    needs_prompt = True
    differentiable = True

    def __init__(self, model: str, processor: str | None = None, *, batch_size: int = 16, device=None,
                 dtype: str | torch.dtype | None = None, cache_text: bool = True, cache_size: int = 4096):
        super().__init__(batch_size=batch_size, device=device)
        self.model_name = model
        self.processor_name = processor
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache_text = cache_text
        self.text_cache = TextEmbeddingCache(cache_size)
        self.embedder: CLIPEmbedder | None = None

    def _processor_for(self, model: str) -> str | None:
        return self.processor_name

    def load(self) -> None:
        self.embedder = CLIPEmbedder.from_pretrained(
            self.model_name, self._processor_for(self.model_name), self.device, self.dtype,
            what=self.name, local_hint=f"--reward {self.name}=/path/to/dir",
        )

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        assert self.embedder is not None
        if not self.cache_text:
            return self.embedder.text_embeds(prompts)
        rows = self.text_cache.get_many(prompts, self.embedder.text_embeds, self.batch_size)
        return stack_rows(rows)

    def cosine(self, images, prompts: list[str]) -> torch.Tensor:
        assert self.embedder is not None
        img = self.embedder.image_embeds(images)
        txt = self.text_embeds(prompts).to(img.device)
        return (img * txt).sum(dim=-1)


class CLIPScore(_CLIPTextImageReward):
    """CLIPScore: prompt-image agreement of a CLIP model.

    Two published conventions (``convention``):

    * ``"hessel"`` (default, registry name ``clipscore``): Hessel et al. 2021, "CLIPScore: A
      Reference-free Evaluation Metric for Image Captioning" -- ``2.5 * max(cos(E_I, E_T), 0)``
      on ViT-B/32 (``openai/clip-vit-base-patch32``). Unitless, in [0, 2.5].
    * ``"x100"`` (registry name ``clipscore_l14``): ``100 * cos(E_I, E_T)`` on ViT-L/14
      (``openai/clip-vit-large-patch14``), the scale most T2I papers report (~20-35).
      torchmetrics additionally clamps at 0; pass ``clamp_min=0`` for that.

    ``details['clip_cosine']`` holds the raw cosine.
    """

    name = "clipscore"
    units = "2.5*max(cos,0)"
    CONVENTIONS = {
        "hessel": ("openai/clip-vit-base-patch32", 2.5, 0.0),
        "x100": ("openai/clip-vit-large-patch14", 100.0, None),
    }

    def __init__(self, model: str | None = None, *, convention: str = "hessel", scale: float | None = None,
                 clamp_min: float | None | str = "default", name: str | None = None, **kwargs):
        if convention not in self.CONVENTIONS:
            raise UserError(f"clipscore: unknown convention '{convention}'; valid: {', '.join(self.CONVENTIONS)}")
        default_model, default_scale, default_clamp = self.CONVENTIONS[convention]
        super().__init__(model or default_model, **kwargs)
        self.convention = convention
        self.scale = float(default_scale if scale is None else scale)
        self.clamp_min = default_clamp if clamp_min == "default" else clamp_min
        self.name = name or ("clipscore" if convention == "hessel" else "clipscore_l14")
        self.units = f"{self.scale:g}*{'max(cos,%g)' % self.clamp_min if self.clamp_min is not None else 'cos'}"

    def score_batch(self, images, prompts, metadata):
        cos = self.cosine(images, prompts)
        s = cos.clamp_min(self.clamp_min) if self.clamp_min is not None else cos
        s = self.scale * s
        return RewardOutput(s, {self.name: s, "clip_cosine": cos})


class PickScore(_CLIPTextImageReward):
    """PickScore v1 -- Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences
    for Text-to-Image Generation".

    ``score = logit_scale.exp() * cos(E_I, E_T)`` with model ``yuvalkirstain/PickScore_v1`` (a
    CLIP ViT-H/14 fine-tuned on Pick-a-Pic; ``logit_scale.exp() == 100``) and the processor of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest side 224 bicubic, centre crop 224, OpenAI
    mean/std). Units: CLIP logits (typically ~18-24); the softmax over a set of images' scores
    is the predicted preference probability.

    A local directory (``pickscore=PATH``, e.g. from ``diffalign train-reward``) supplies both
    model and processor when it holds ``preprocessor_config.json``.
    """

    name = "pickscore"
    units = "logit_scale*cos"
    DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
    DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(self, model: str | None = None, processor: str | None = None, *, name: str | None = None, **kwargs):
        super().__init__(model or self.DEFAULT_MODEL, processor, **kwargs)
        if name:
            self.name = name

    def _processor_for(self, model: str) -> str | None:
        if self.processor_name:
            return self.processor_name
        local = Path(os.path.expanduser(model))
        if (local / "preprocessor_config.json").is_file() or (local / "processor_config.json").is_file():
            return model
        return self.DEFAULT_PROCESSOR

    def score_batch(self, images, prompts, metadata):
        cos = self.cosine(images, prompts)
        assert self.embedder is not None
        s = self.embedder.logit_scale.to(cos.device) * cos
        return RewardOutput(s, {self.name: s, "clip_cosine": cos})


class AestheticMLP(nn.Module):
    """The LAION "improved aesthetic predictor" head: Linear layers 768-1024-128-64-16-1 with
    dropout in between and no nonlinearity (as published; the ReLUs are commented out).
    Parameter names ``layers.{0,2,4,6,7}`` match ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _mlp_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Some mirrors save the bare nn.Sequential ("0.weight") rather than the module ("layers.0.weight").
    if sd and all(k.split(".")[0].isdigit() for k in sd):
        return {f"layers.{k}": v for k, v in sd.items()}
    return sd


class LAIONAesthetic(Reward):
    """LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", 2022), as used
    by DDPO (Black et al. 2023) and many T2I papers.

    ``score = MLP(E_I / ||E_I||)`` with ``E_I`` the CLIP ViT-L/14 image projection
    (``openai/clip-vit-large-patch14``) and the MLP head ``sac+logos+ava1-l14-linearMSE.pth``
    (hub mirror ``camenduru/improved-aesthetic-predictor``). Units: predicted mean rating on the
    1-10 AVA scale (SD images typically score 4.5-7). Prompt is ignored.

    ``aesthetic=PATH``: a directory with a CLIP model dir ``clip/`` and a head file
    (``aesthetic_head.safetensors`` or ``*.pth``), or a head file alone (CLIP from the hub).
    """

    name = "aesthetic"
    needs_prompt = False
    differentiable = True
    units = "AVA rating (1-10)"
    DEFAULT_CLIP = "openai/clip-vit-large-patch14"
    HEAD_REPO = "camenduru/improved-aesthetic-predictor"
    HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"

    def __init__(self, path: str | None = None, *, clip_model: str | None = None, head: str | None = None,
                 batch_size: int = 16, device=None, dtype=None):
        super().__init__(batch_size=batch_size, device=device)
        self.path = path
        self.clip_model = clip_model
        self.head = head
        self.dtype = resolve_dtype(dtype, self.device)
        self.embedder: CLIPEmbedder | None = None
        self.mlp: AestheticMLP | None = None

    def _resolve(self) -> tuple[str, Path]:
        clip_model, head = self.clip_model, self.head
        hint = "--reward aesthetic=/path/to/dir (with clip/ and the head file)"
        if self.path:
            p = Path(os.path.expanduser(self.path))
            if p.is_dir():
                if clip_model is None and (p / "clip").is_dir():
                    clip_model = str(p / "clip")
                if head is None:
                    for cand in ["aesthetic_head.safetensors", self.HEAD_FILE, "aesthetic-model.pth"]:
                        if (p / cand).is_file():
                            head = str(p / cand)
                            break
                    else:
                        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.pth"))
                        if not found:
                            raise UserError(f"aesthetic: directory '{p}' has no head file "
                                            f"(aesthetic_head.safetensors or {self.HEAD_FILE})")
                        head = str(found[0])
            elif p.is_file():
                head = str(p)
            else:
                raise UserError(f"aesthetic: path '{self.path}' does not exist")
        head_path = resolve_file(head or "", self.HEAD_REPO, self.HEAD_FILE, "aesthetic", hint)
        return clip_model or self.DEFAULT_CLIP, head_path

    def load(self) -> None:
        clip_model, head_path = self._resolve()
        self.embedder = CLIPEmbedder.from_pretrained(clip_model, None, self.device, self.dtype, what="aesthetic",
                                                     local_hint="--reward aesthetic=/path/to/dir")
        sd = _mlp_state_dict(load_state_dict_file(head_path))
        in_dim = sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else 768
        mlp = AestheticMLP(in_dim)
        check_and_load(mlp, sd, "aesthetic", head_path)
        proj = int(self.embedder.model.config.projection_dim)
        if in_dim != proj:
            raise UserError(f"aesthetic: head '{head_path}' expects {in_dim}-d CLIP embeddings but '{clip_model}' "
                            f"projects to {proj}")
        self.mlp = mlp.to(self.device).eval().requires_grad_(False)

    def score_batch(self, images, prompts, metadata):
        assert self.embedder is not None and self.mlp is not None
        emb = self.embedder.image_embeds(images)  # L2-normalised, float32
        return self.mlp(emb).squeeze(-1)


def save_aesthetic_head(mlp: AestheticMLP, path: str | os.PathLike) -> None:
    from ..files import save_safetensors as save_file

    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
