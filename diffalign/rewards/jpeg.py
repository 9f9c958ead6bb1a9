"""JPEG (in)compressibility -- the DDPO rewards (Black et al. 2023, "Training Diffusion Models
with Reinforcement Learning", Sec. 6.1).

``size_kB = len(JPEG(quality=95)) / 1000`` of the image quantised to ``uint8`` and encoded with
PIL. ``jpeg_incompressibility`` = ``size_kB`` (higher = more detail/texture);
``jpeg`` (alias ``jpeg_compressibility``) = ``-size_kB`` (higher = simpler image). Prompt-free, not
differentiable, computed on CPU (PIL's libjpeg is the reference encoder; other encoders give
different sizes).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .base import Reward, RewardOutput


def jpeg_size_kb(image: torch.Tensor, quality: int = 95) -> float:
    """Encoded size in kB (1000 bytes) of one ``[3,H,W]`` image in [0,1]."""
    from PIL import Image

    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JPEGReward(Reward):
    """JPEG file size at quality 95 in kB; ``compressible=True`` negates it (see module doc)."""

    needs_prompt = False
    differentiable = False

    def __init__(self, compressible: bool = True, *, quality: int = 95, batch_size: int = 64, device=None, name=None):
        super().__init__(batch_size=batch_size, device="cpu" if device is None else device)
        self.compressible = compressible
        self.quality = quality
        # "jpeg" is the name users type (README, eval CSV columns); jpeg_compressibility is its alias
        self.name = name or ("jpeg" if compressible else "jpeg_incompressibility")
        self.units = "-kB" if compressible else "kB"

    def score_batch(self, images, prompts, metadata):
        sizes = torch.tensor([jpeg_size_kb(img, self.quality) for img in images], dtype=torch.float32)
        scores = -sizes if self.compressible else sizes
        return RewardOutput(scores, {self.name: scores, "jpeg_kb": sizes})
