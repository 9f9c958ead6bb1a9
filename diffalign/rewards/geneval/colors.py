"""GenEval's colour classifier: CLIP zero-shot over each detected object's masked crop.

As GenEval's ``evaluate_images.py`` (facts, our code): the object is pasted through its mask onto a
``#999`` gray canvas the size of the image (``bgcolor``; ``"original"`` keeps the image), cropped to its box
(PIL's crop, which rounds the box coordinates), and classified zero-shot among :data:`~.rules.COLORS` by
CLIP ViT-L/14 (OpenAI weights). Each colour's text embedding is the renormalised mean of the normalised
embeddings of three prompts (clip_benchmark's ``zero_shot_classifier``): ``"a photo of a {color}
{object}"``, ``"a photo of a {color}-colored {object}"`` and ``"a photo of a {color} object"``; the colour
is the argmax of the image embedding's cosine with them (ties: the first colour).

A colour classifier is any callable ``classifier(image, detections, classname) -> list[str]`` (``image`` an
RGB PIL image, one colour name per detection). :class:`CLIPColorClassifier` is the default, on transformers'
``CLIPModel`` (``openai/clip-vit-large-patch14``, the OpenAI ViT-L/14 weights that open_clip's
``ViT-L-14``/``openai`` also loads; or a local directory), or on open_clip (``backend="open_clip"``, as
GenEval; ``model`` an open_clip architecture name and ``pretrained`` a tag or a checkpoint file). The
transformers image processor (bicubic shortest-edge resize to 224 + centre crop + OpenAI mean/std on PIL
images) is the same transform as open_clip's for these weights.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import UserError
from ..base import resolve_device
from .rules import COLORS, Detections

DEFAULT_COLOR_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_OPEN_CLIP = ("ViT-L-14", "openai")
TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
BACKENDS = ("transformers", "open_clip")


def masked_crops(image, detections: Detections, bgcolor: str = "#999", crop: bool = True) -> list:
    """GenEval's crops: each object through its mask onto a ``bgcolor`` canvas (``"original"``: the image
    itself), cropped to its box. ``image``: RGB PIL image the size of the masks."""
    from PIL import Image

    image = image.convert("RGB")
    blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
    crops = []
    for i in range(len(detections)):
        if detections.masks is not None:
            mask = detections.masks[i].cpu().numpy().astype(bool)
            if mask.shape != (image.size[1], image.size[0]):
                raise ValueError(f"mask {mask.shape} does not match the image ({image.size[1]}, {image.size[0]})")
            obj = Image.composite(image, blank, Image.fromarray(mask))
        else:
            obj = image
        crops.append(obj.crop(tuple(float(v) for v in detections.boxes[i, :4])) if crop else obj)
    return crops


class CLIPColorClassifier:
    """GenEval's CLIP zero-shot colour classifier (module docstring); text classifiers cached per class."""

    def __init__(self, model: str | None = None, *, backend: str = "transformers", pretrained: str | None = None,
                 device=None, dtype: str | torch.dtype | None = None, batch_size: int = 16,
                 bgcolor: str = "#999", crop: bool = True, colors: Sequence[str] = COLORS,
                 templates: Sequence[str] = TEMPLATES):
        from ..clip import resolve_dtype

        if backend not in BACKENDS:
            raise UserError(f"geneval: color backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.backend = backend
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.bgcolor, self.crop = bgcolor, crop
        self.colors, self.templates = tuple(colors), tuple(templates)
        self._classifiers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        if backend == "transformers":
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

            from ..weights import load_pretrained

            name = model or DEFAULT_COLOR_MODEL
            hint = "color_model=/path/to/clip_dir"
            self.model = load_pretrained(CLIPModel.from_pretrained, name, "geneval colours", hint)
            self.image_processor = load_pretrained(CLIPImageProcessor.from_pretrained, name, "geneval colours", hint)
            self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name, "geneval colours", hint)
        else:
            from ..hps import import_open_clip

            open_clip = import_open_clip()
            arch = model or DEFAULT_OPEN_CLIP[0]
            self.model, _, self.transform = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained or DEFAULT_OPEN_CLIP[1], device=self.device)
            self.tokenizer = open_clip.get_tokenizer(arch)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def _text(self, texts: list[str]) -> torch.Tensor:
        if self.backend == "transformers":
            from ..clip import projected_features

            max_len = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=min(77, max_len),
                                 return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            return projected_features(self.model.get_text_features(**tok)).float()
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float()

    def _image(self, crops: list) -> torch.Tensor:
        if self.backend == "transformers":
            from ..clip import projected_features

            pixels = self.image_processor(images=crops, return_tensors="pt")["pixel_values"]
            return projected_features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float()
        pixels = torch.stack([self.transform(c) for c in crops]).to(self.device, self.dtype)
        return self.model.encode_image(pixels).float()

    def classifier(self, classname: str) -> torch.Tensor:
        """``[D, n_colors]``: per colour the renormalised mean of its normalised template embeddings."""
        with self._lock:
            if classname in self._classifiers:
                return self._classifiers[classname]
        with torch.inference_mode():
            cols = []
            for c in self.colors:
                emb = self._text([t.format(c=c, obj=classname) for t in self.templates])
                emb = emb / emb.norm(dim=-1, keepdim=True)
                mean = emb.mean(0)
                cols.append(mean / mean.norm())
            weights = torch.stack(cols, dim=1)
        with self._lock:
            self._classifiers[classname] = weights
        return weights

    @torch.inference_mode()
    def scores(self, image, detections: Detections, classname: str) -> torch.Tensor:
        """``[N, n_colors]`` cosines of each object's crop with each colour."""
        crops = masked_crops(image, detections, self.bgcolor, self.crop)
        if not crops:
            return torch.zeros(0, len(self.colors))
        weights = self.classifier(classname)
        feats = []
        for i in range(0, len(crops), self.batch_size):
            f = self._image(crops[i:i + self.batch_size])
            feats.append(f / f.norm(dim=-1, keepdim=True))
        return (torch.cat(feats) @ weights).cpu()

    def __call__(self, image, detections: Detections, classname: str) -> list[str]:
        s = self.scores(image, detections, classname)
        return [self.colors[int(i)] for i in s.argmax(dim=1)] if s.numel() else []


def to_pil(image: torch.Tensor):
    """``[3,H,W]`` in [0,1] -> RGB PIL (uint8, rounded), as GenEval reads PNGs."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
