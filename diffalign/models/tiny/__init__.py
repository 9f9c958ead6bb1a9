"""Tiny random-init models in diffusers format, for tests and CPU smoke runs.

Each builder writes a complete pipeline directory (``model_index.json``, scheduler,
tokenizers, text encoders, VAE, denoiser) that ``DiffusionPipeline.from_pretrained(dir)``
loads with no network, exactly as it would load ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
Sizes are chosen so a build takes seconds and the directory stays well under 20 MB.

The tokenizer is a real ``CLIPTokenizer`` with a byte-level vocabulary (one token per
byte, no merges): every string tokenizes, without shipping the 49k-entry CLIP BPE.

Layout: :mod:`.common` (tokenizers, text configs, VAE, scheduler and VAE calibration every builder
shares), one module per family (:mod:`.unet`, :mod:`.sd3`, :mod:`.flux`, :mod:`.flux2`,
:mod:`.qwenimage`), and here the ``BUILDERS`` table ``diffalign tiny-model KIND`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .common import TINY_MAX_LENGTH, TINY_TEXT_DIM, tiny_clip_text_config, tiny_clip_tokenizer, tiny_t5_tokenizer
from .flux import build_flux, build_flux_schnell
from .flux2 import FLUX2_BUILDERS
from .qwenimage import build_qwenimage
from .sd3 import build_sd3
from .unet import build_sd15, build_sdxl

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


__all__ = ["BUILDERS", "TINY_MAX_LENGTH", "TINY_TEXT_DIM", "build_flux", "build_flux_schnell", "build_qwenimage", "build_sd3",
           "build_sd15", "build_sdxl", "describe", "dir_size_mb", "tiny_clip_text_config", "tiny_clip_tokenizer",
           "tiny_t5_tokenizer"]
