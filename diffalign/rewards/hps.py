"""HPSv2 / HPSv2.1 -- Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis".

An open_clip ViT-H/14 fine-tuned on HPD v2. ``score = cos(E_I, E_T)`` (the diagonal of
``image_features @ text_features.T`` with both L2-normalised; no logit scale). Units: cosine,
typically 0.2-0.35. Images are letterboxed (longest side 224, zero padding; see
:class:`~diffalign.rewards.preprocess.Letterbox`) as in HPSv2's ``ResizeMaxSize``.

Weights: hub repo ``xswu/HPSv2``, file ``HPS_v2.1_compressed.pt`` (``version="v2.1"``,
default) or ``HPS_v2_compressed.pt`` (``"v2.0"``): a ``{"state_dict": ...}`` checkpoint read
with ``torch.load(weights_only=True)``. ``hpsv2=PATH`` accepts that file, or a directory
holding it -- plus, for non-ViT-H-14 architectures (the tiny test model), an
``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) that is registered
with open_clip at load time.

open_clip (``pip install open-clip-torch``) is imported only when the reward is first used.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import UserError
from .base import Reward, RewardOutput, TextEmbeddingCache, stack_rows
from .clip import resolve_dtype
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Letterbox
from .weights import check_and_load, load_state_dict_file, resolve_file

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}
HPS_ARCH = "ViT-H-14"


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise UserError(
            f"hpsv2 needs open_clip, which is not importable ({e}); install it with `pip install open-clip-torch` "
            "(it also needs torchvision)"
        ) from None
    return open_clip


class HPSv2(Reward):
    """HPSv2/HPSv2.1 reward (see module docstring for reference, formula and units)."""

    name = "hpsv2"
    needs_prompt = True
    differentiable = True
    units = "cos"

    def __init__(self, path: str | None = None, *, version: str = "v2.1", batch_size: int = 16, device=None,
                 dtype=None, cache_text: bool = True, cache_size: int = 4096, name: str | None = None):
        super().__init__(batch_size=batch_size, device=device)
        if version not in HPS_FILES:
            raise UserError(f"hpsv2: unknown version '{version}'; valid: {', '.join(HPS_FILES)}")
        self.path = path
        self.version = version
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache_text = cache_text
        self.text_cache = TextEmbeddingCache(cache_size)
        self.name = name or ("hpsv2" if version == "v2.1" else "hpsv2.0")
        self.model = None
        self.tokenizer = None
        self.preprocess: Letterbox | None = None

    def _checkpoint_and_config(self) -> tuple[Path, Path | None]:
        filename = HPS_FILES[self.version]
        hint = f"--reward {self.name}=/path/to/{filename}"
        if self.path:
            p = Path(os.path.expanduser(self.path))
            if p.is_dir():
                cfg = p / "open_clip_config.json"
                cands = [p / filename] + sorted(p.glob("*.pt")) + sorted(p.glob("*.safetensors"))
                ckpt = next((c for c in cands if c.is_file()), None)
                if ckpt is None:
                    raise UserError(f"{self.name}: directory '{p}' has no checkpoint ({filename})")
                return ckpt, cfg if cfg.is_file() else None
            return resolve_file(self.path, HPS_REPO, filename, self.name, hint), None
        return resolve_file("", HPS_REPO, filename, self.name, hint), None

    def load(self) -> None:
        open_clip = import_open_clip()
        ckpt, cfg_path = self._checkpoint_and_config()
        log = logging.getLogger()
        level = log.level
        log.setLevel(logging.ERROR)  # open_clip logs a warning for "no pretrained weights": we load them below
        try:
            if cfg_path is not None:
                model, tokenizer, pre_cfg = self._from_config(open_clip, cfg_path)
            else:
                model = open_clip.create_model(HPS_ARCH, pretrained=None)
                tokenizer = open_clip.get_tokenizer(HPS_ARCH)
                pre_cfg = {}
        finally:
            log.setLevel(level)
        check_and_load(model, load_state_dict_file(ckpt), self.name, ckpt)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.preprocess = Letterbox(
            size=size,
            mean=tuple(pre_cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(pre_cfg.get("std", OPENAI_CLIP_STD)),
        )

    @staticmethod
    def _from_config(open_clip, cfg_path: Path):
        cfg = json.loads(cfg_path.read_text())
        if "model_cfg" not in cfg:
            raise UserError(f"hpsv2: '{cfg_path}' has no 'model_cfg'")
        try:  # open_clip >= 2.26: register the directory's config through the local-dir schema
            model = open_clip.create_model(f"local-dir:{cfg_path.parent}", load_weights=False)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{cfg_path.parent}")
        except (RuntimeError, ValueError, TypeError, FileNotFoundError):
            from open_clip.model import CLIP
            from open_clip.tokenizer import SimpleTokenizer

            model = CLIP(**cfg["model_cfg"])
            tokenizer = SimpleTokenizer(context_length=cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77))
        return model, tokenizer, cfg.get("preprocess_cfg", {})

    def _text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        if not self.cache_text:
            return self._text_embeds(prompts)
        return stack_rows(self.text_cache.get_many(prompts, self._text_embeds, self.batch_size))

    def score_batch(self, images, prompts, metadata):
        pixels = self.preprocess(images, device=self.device, dtype=self.dtype)
        img = self.model.encode_image(pixels, normalize=True).float()
        txt = self.text_embeds(prompts).to(img.device)
        s = (img * txt).sum(-1)
        return RewardOutput(s, {self.name: s})
