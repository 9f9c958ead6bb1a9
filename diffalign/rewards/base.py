"""The reward API: ``reward(images, prompts, metadata=None) -> RewardOutput``.

Every reward (built-in, composed, remote, or registered by another module) is a callable with
this signature. Images enter as a float tensor ``[B, 3, H, W]`` with values in ``[0, 1]``;
PIL images, ``uint8`` numpy arrays (``HWC``) and file paths are converted at the edge by
:func:`to_image_tensor`. Scores come back as a float32 tensor ``[B]`` plus per-component
details.

A reward declares:

* ``name``: the column/registry name of its score;
* ``higher_is_better``: the direction an optimiser should push;
* ``needs_prompt``: whether ``prompts`` must be given;
* ``differentiable``: whether gradients can flow from scores to the input pixels. When it is
  ``False`` (or nothing requires a gradient) the call runs under ``torch.inference_mode()``.

Weights are loaded lazily on the first call (never at import), work is split into
micro-batches of ``batch_size`` images, and rewards that embed prompts keep a per-prompt cache
(GRPO scores many images per prompt).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..errors import UserError
from ..files import decode_image, rgb_image

ImageBatch = Union[torch.Tensor, list]  # [B,3,H,W] tensor, or a list of [3,H,W] when sizes differ

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class RewardOutput:
    """Scores ``[B]`` (float32) and named per-component scores, each ``[B]``."""

    scores: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> RewardOutput:
        return RewardOutput(self.scores.to(device), {k: v.to(device) for k, v in self.details.items()})

    def cpu(self) -> RewardOutput:
        return self.to("cpu")


def default_device() -> torch.device:
    """The device a reward loads on when none is given: this thread's current CUDA device, with its
    index, when CUDA is present, else the CPU.

    The index is resolved here, at construction: a bare ``cuda`` would be resolved later, by whichever
    thread first moves a tensor, and the current device is per thread (a worker thread's is GPU 0
    whatever its process's rank)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_callable(spec: Any, reward: str, what: str) -> Callable | None:
    """An engine a reward plugs in (an OCR recogniser, a detector): a callable as it is, or
    ``"module:attr"`` naming one (a class is instantiated with no arguments), so a config or a
    command line can name it. ``None`` stays ``None`` (the reward's default engine)."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec:
        import importlib

        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"reward '{reward}': cannot import {what} '{spec}': {e}") from None
        obj = obj() if isinstance(obj, type) else obj
        if callable(obj):
            return obj
        raise UserError(f"reward '{reward}': {what} '{spec}' is not callable")
    raise UserError(f"reward '{reward}': {what} must be a callable or 'module:attr', not {spec!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` with its index fixed now: None -> :func:`default_device`; a bare
    ``cuda`` -> this thread's current CUDA device (see :func:`default_device` for why); others as given."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------
# Image conversion at the edge
# --------------------------------------------------------------------------------------------


def pil_to_tensor(img) -> torch.Tensor:
    """PIL image -> ``[3,H,W]`` float in [0,1]; transparency composited onto white (:func:`~diffalign.files.rgb_image`)."""
    arr = np.asarray(rgb_image(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """One ``HWC`` (or ``HW``) array -> ``[3,H,W]`` float in [0,1]."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"numpy images must be HWC with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    if np.issubdtype(arr.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    raise ValueError(f"numpy images must be uint8 (0..255) or float (0..1), got dtype {arr.dtype}")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read one image file as ``[3,H,W]`` float in [0,1] (RGB)."""
    from PIL import Image

    with Image.open(path) as img:
        return pil_to_tensor(img)


def decode_image_bytes(data: bytes) -> torch.Tensor:
    """Decode PNG/JPEG/... bytes as ``[3,H,W]`` float in [0,1] (:func:`diffalign.files.decode_image`);
    raises ``ValueError`` if invalid."""
    return pil_to_tensor(decode_image(data))


def _one_to_tensor(item: Any) -> torch.Tensor:
    from PIL import Image

    if isinstance(item, torch.Tensor):
        t = item
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"a single image tensor must be [3,H,W], got {tuple(t.shape)}")
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.float().div(255.0) if t.dtype == torch.uint8 else t
    if isinstance(item, Image.Image):
        return pil_to_tensor(item)
    if isinstance(item, np.ndarray):
        return _array_to_tensor(item)
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, (bytes, bytearray)):
        return decode_image_bytes(bytes(item))
    raise TypeError(f"unsupported image type {type(item).__name__}; use a tensor, PIL image, numpy array or path")


def to_image_tensor(images: Any) -> ImageBatch:
    """Convert any supported image input to a ``[B,3,H,W]`` float tensor in ``[0,1]``.

    Accepts a ``[B,3,H,W]``/``[3,H,W]`` tensor (float in [0,1] or uint8), a PIL image, a
    ``uint8`` numpy array ``HWC`` or ``BHWC``, a path, encoded bytes, or a list of these.
    When a list mixes image sizes the result is a list of ``[3,H,W]`` tensors (each reward's
    preprocessing resizes them one by one). Tensors keep their device and autograd graph.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"image tensors must be [B,3,H,W] (channels first), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.dtype == torch.uint8:
            return images.float().div(255.0)
        if not images.is_floating_point():
            raise ValueError(f"image tensors must be float in [0,1] or uint8, got {images.dtype}")
        _check_range(images)
        return images
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return torch.stack([_array_to_tensor(a) for a in images])
    if not isinstance(images, (list, tuple)):
        images = [images]
    tensors = [_one_to_tensor(x) for x in images]
    if not tensors:
        return torch.zeros(0, 3, 1, 1)
    for t in tensors:
        _check_range(t)
    if all(t.shape == tensors[0].shape for t in tensors) and all(t.device == tensors[0].device for t in tensors):
        return torch.stack(tensors)
    return tensors


def _check_range(t: torch.Tensor) -> None:
    # Catch the two common unit mistakes ([-1,1] decoder output, 0..255 floats) without
    # rejecting slight overshoot from a VAE decode.
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    if lo < -0.5 or hi > 1.5:
        raise ValueError(
            f"image values must be in [0,1], got min {lo:.3g} max {hi:.3g}; "
            "map [-1,1] decoder output with (x + 1) / 2 and 0..255 floats with x / 255"
        )


def num_images(images: ImageBatch) -> int:
    return len(images) if isinstance(images, list) else int(images.shape[0])


def slice_images(images: ImageBatch, start: int, stop: int) -> ImageBatch:
    return images[start:stop]


def list_image_files(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name."""
    d = Path(directory)
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------
# Text-embedding cache
# --------------------------------------------------------------------------------------------


class TextEmbeddingCache:
    """LRU cache prompt -> embedding row, filled in micro-batches of unique missing prompts.

    Entries are computed outside inference mode (plain tensors without grad) so the same
    cached rows can be used by differentiable calls. A cache hit returns the very tensor stored
    on the first computation, so repeated scoring is bit-identical.
    """

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._store: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def get_many(self, prompts: Sequence[str], compute: Callable[[list[str]], Any], batch_size: int) -> list:
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                rows: dict[str, Any] = {}
                for i in range(0, len(missing), max(1, batch_size)):
                    chunk = missing[i : i + batch_size]
                    emb = compute(chunk)
                    for j, p in enumerate(chunk):
                        rows[p] = _index_rows(emb, j)
            with self._lock:
                for p, r in rows.items():
                    self._store[p] = r
        with self._lock:
            out = []
            for p in prompts:
                value = self._store.get(p)
                if value is None:  # evicted between fill and read by another thread: recompute
                    with torch.inference_mode(False), torch.no_grad():
                        value = _index_rows(compute([p]), 0)
                else:
                    self._store.move_to_end(p)
                out.append(value)
            while len(self._store) > self.max_entries:
                self._store.popitem(last=False)
        return out


def _index_rows(emb: Any, j: int) -> Any:
    if isinstance(emb, dict):
        return {k: v[j] for k, v in emb.items()}
    if isinstance(emb, tuple):
        return tuple(v[j] for v in emb)
    return emb[j]


def stack_rows(rows: list) -> Any:
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    if isinstance(rows[0], tuple):
        return tuple(torch.stack([r[i] for r in rows]) for i in range(len(rows[0])))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Reward base class
# --------------------------------------------------------------------------------------------


class Reward:
    """Base class: subclasses set the class attributes and implement :meth:`score_batch`
    (and :meth:`load` when they have weights).

    ``score_batch(images, prompts, metadata)`` receives one micro-batch (a ``[b,3,H,W]``
    tensor in [0,1], or a list of ``[3,H,W]``), the matching prompts (or ``None``) and
    metadata (a list of per-image dicts, or ``None``), and returns a ``[b]`` tensor or a
    :class:`RewardOutput`.
    """

    name: str = "reward"
    higher_is_better: bool = True
    needs_prompt: bool = True
    differentiable: bool = False
    units: str = ""

    def __init__(self, *, batch_size: int = 16, device: str | torch.device | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self._loaded = False
        self._load_lock = threading.RLock()

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> None:
        """Load weights (called once, on first use). Default: nothing to load."""

    def ensure_loaded(self) -> Reward:
        if not self._loaded:
            with self._load_lock:
                if not self._loaded:
                    self.load()
                    self._loaded = True
        return self

    @property
    def loaded(self) -> bool:
        return self._loaded

    # -- scoring ----------------------------------------------------------------------------
    def score_batch(self, images: ImageBatch, prompts: list[str] | None, metadata: list | None):
        raise NotImplementedError

    def __call__(self, images: Any, prompts: Sequence[str] | str | None = None, metadata: Any = None) -> RewardOutput:
        images = to_image_tensor(images)
        n = num_images(images)
        prompt_list = _normalize_prompts(prompts, n, self.name, self.needs_prompt)
        meta_list = _normalize_metadata(metadata, n, self.name)
        self.ensure_loaded()
        track_grad = (
            self.differentiable
            and torch.is_grad_enabled()
            and isinstance(images, torch.Tensor)
            and images.requires_grad
        )
        ctx = contextlib.nullcontext() if track_grad else torch.inference_mode()
        outputs: list[RewardOutput] = []
        with ctx:
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                out = self.score_batch(
                    slice_images(images, start, stop),
                    None if prompt_list is None else prompt_list[start:stop],
                    None if meta_list is None else meta_list[start:stop],
                )
                outputs.append(self._as_output(out))
        result = merge_outputs(outputs, self.name)
        if not track_grad:
            # Inference tensors cannot be saved for backward; callers use scores in losses
            # (e.g. advantages * log-probs), so hand back ordinary tensors.
            result = RewardOutput(result.scores.clone(), {k: v.clone() for k, v in result.details.items()})
        return result

    def _as_output(self, out: Any) -> RewardOutput:
        if isinstance(out, RewardOutput):
            scores = out.scores.float().reshape(-1)
            details = {k: v.float().reshape(-1) for k, v in out.details.items()}
            if not details:
                details = {self.name: scores}
            return RewardOutput(scores, details)
        scores = torch.as_tensor(out).float().reshape(-1)
        return RewardOutput(scores, {self.name: scores})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def merge_outputs(outputs: list[RewardOutput], name: str = "reward") -> RewardOutput:
    if not outputs:
        return RewardOutput(torch.zeros(0), {name: torch.zeros(0)})
    if len(outputs) == 1:
        return outputs[0]
    scores = torch.cat([o.scores.to(outputs[0].scores.device) for o in outputs])
    keys = list(outputs[0].details)
    details = {k: torch.cat([o.details[k].to(outputs[0].scores.device) for o in outputs]) for k in keys}
    return RewardOutput(scores, details)


def _normalize_prompts(prompts: Any, n: int, name: str, required: bool) -> list[str] | None:
    if prompts is None:
        if required:
            raise ValueError(f"reward '{name}' needs prompts: pass one prompt per image")
        return None
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = [str(p) for p in prompts]
    if len(prompts) != n:
        raise ValueError(f"reward '{name}': got {len(prompts)} prompts for {n} images")
    return prompts


def _normalize_metadata(metadata: Any, n: int, name: str) -> list | None:
    if metadata is None:
        return None
    if isinstance(metadata, dict):
        return [metadata] * n
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"reward '{name}': got {len(metadata)} metadata entries for {n} images")
    return metadata


class FunctionReward(Reward):
    """Wrap a plain ``fn(images, prompts, metadata) -> scores`` (e.g. a toy/testbed reward)."""

    def __init__(self, fn: Callable, name: str, *, higher_is_better: bool = True, needs_prompt: bool = False,
                 differentiable: bool = False, batch_size: int = 64, device: str | torch.device | None = "cpu"):
        super().__init__(batch_size=batch_size, device=device)
        self.fn = fn
        self.name = name
        self.higher_is_better = higher_is_better
        self.needs_prompt = needs_prompt
        self.differentiable = differentiable

    def score_batch(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)
