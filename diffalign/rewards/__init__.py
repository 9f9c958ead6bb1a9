"""Reward models for preference alignment: one API for scoring images against prompts.

>>> from diffalign.rewards import get_reward
>>> reward = get_reward("pickscore")                 # or "pickscore=/path/to/dir"
>>> out = reward(images, prompts)                     # images: [B,3,H,W] in [0,1]
>>> out.scores, out.details["clip_cosine"]

Built-ins (weights load lazily on first call): ``clipscore``, ``clipscore_l14``, ``pickscore``,
``hpsv2`` (= ``hpsv2.1``), ``hpsv2.0``, ``imagereward``, ``aesthetic``, ``jpeg``
(= ``jpeg_compressibility``), ``jpeg_incompressibility``, ``remote=URL``; task rewards ``ocr``
(prompt's quoted text vs OCR) and ``vlm_judge=URL`` (a VLM's 1-5 rating over an OpenAI-compatible
endpoint), ``geneval`` (GenEval's object/count/colour/position verdict, Mask2Former + CLIP, with GenEval
metadata rows per image or ``metadata=PATH``). Add more with
:func:`register_reward`. Importing this package imports neither transformers nor open_clip.
"""

from .base import (
    FunctionReward,
    Reward,
    RewardOutput,
    TextEmbeddingCache,
    decode_image_bytes,
    load_image,
    to_image_tensor,
)
from .compose import Affine, RunningZScore, WeightedSum
from .registry import get_reward, list_rewards, parse_spec, register_reward

# Scorer classes load on first attribute access (PEP 562), keeping the import light.
_LAZY = {
    "CLIPScore": "clip", "PickScore": "clip", "LAIONAesthetic": "clip", "CLIPEmbedder": "clip",
    "HPSv2": "hps", "ImageReward": "imagereward", "JPEGReward": "jpeg",
    "RemoteReward": "server", "RewardServer": "server", "OCRReward": "ocr", "VLMJudge": "vlm_judge",
    "GenEvalReward": "geneval",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "Affine",
    "FunctionReward",
    "Reward",
    "RewardOutput",
    "RunningZScore",
    "TextEmbeddingCache",
    "WeightedSum",
    "decode_image_bytes",
    "get_reward",
    "list_rewards",
    "load_image",
    "parse_spec",
    "register_reward",
    "to_image_tensor",
]
