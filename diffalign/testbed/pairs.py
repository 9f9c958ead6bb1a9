"""Hidden "human" preferences over testbed images, and Pick-a-Pic v2-schema pairs from them.

**Hidden utility** (what the simulated labellers want; the base model does not know it)::

    utility = faithfulness_weight * faithfulness + aesthetic_weight * warmth

* ``faithfulness``: the verifiable :class:`~diffalign.testbed.reward.TestbedReward` score
  (fraction of named attributes satisfied), in [0, 1];
* ``warmth``: the taste - a warm background tone. ``warmth = clip((R - B) / 76.5, 0, 1)``
  of the background estimate (channel median of the 1-px border ring, 0-255 scale). The
  default world style (``"plain"``) draws near-neutral greys (R - B ~ N(0, 8.5), warmth
  mostly 0-0.2); the target style (``"warm"``) has R - B ~ 80 (warmth ~1). An image
  "has the target style" when warmth >= 0.5.

Defaults: ``faithfulness_weight=1``, ``aesthetic_weight=0.5``.

**Labels** (:func:`make_pairs`): two images of the same prompt from a sampler callable;
if their utilities differ by less than ``tie_margin`` (or the JPEGs are identical) the
pair is a tie (0.5/0.5); otherwise image 0 wins with Bradley-Terry probability
``sigmoid((u0 - u1) / temperature)``.

**Style mismatch** (``style_mismatch=True``, MaPO's reference-mismatch setting): after
labelling, the chosen image of every non-tie pair is recoloured to the target style
(:func:`apply_target_style`: the background is shifted to the warm tone, objects and
their anti-aliased edges keep their colour), so chosen images come from a distribution
the base model rarely produces.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data.schema import PICKAPIC_SCHEMA_TYPES
from .reward import PALETTE, TestbedReward, background_colour, make_output, parse_caption
from .world import (
    STYLES,
    decode_image,
    encode_jpeg,
    perturb_scene,
    render,
    resolve_style,
    to_float_tensor,
    to_uint8_batch,
    warm_background,
)

WARMTH_SCALE = 76.5  # R - B (0-255) at which warmth saturates (0.3 of the range)
TARGET_STYLE_THRESHOLD = 0.5

# Pick-a-Pic v2 columns (diffalign.data.schema) plus the count of images sampled per prompt.
PICKAPIC_COLUMNS: tuple[str, ...] = (*PICKAPIC_SCHEMA_TYPES, "num_example_per_prompt")


def pickapic_schema():
    """The pyarrow schema of the pairs parquet (Pick-a-Pic v2 column names and dtypes)."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, typ)()) for name, typ in PICKAPIC_SCHEMA_TYPES.items()]
                     + [("num_example_per_prompt", pa.int64())])


# ----------------------------------------------------------------------------- the taste


def background_warmth(images) -> np.ndarray:
    """``clip((R - B) / 76.5, 0, 1)`` of each image's background estimate -> float32 ``[B]``."""
    bg = background_colour(to_uint8_batch(images))
    return np.clip((bg[:, 0] - bg[:, 2]) / WARMTH_SCALE, 0.0, 1.0).astype(np.float32)


def is_target_style(images, threshold: float = TARGET_STYLE_THRESHOLD) -> np.ndarray:
    """Boolean ``[B]``: the image has the warm target style (warmth >= ``threshold``)."""
    return background_warmth(images) >= threshold


def apply_target_style(images) -> np.ndarray:
    """Recolour the background of each image to the warm target tone -> ``uint8 [B, H, W, 3]``.

    Each pixel is modelled as ``alpha * c + (1 - alpha) * bg`` for the palette colour ``c``
    that explains it best (``alpha`` = projection on the bg->c line); it becomes
    ``alpha * c + (1 - alpha) * warm``. Pixels no palette blend explains (residual > 40)
    keep ``alpha = clip(|x - bg| / 60, 0, 1)``.
    """
    arr = to_uint8_batch(images)
    B, H, W, _ = arr.shape
    x = arr.reshape(B, H * W, 3).astype(np.float32)
    bg = background_colour(arr)  # [B, 3]
    target = np.stack([warm_background(float(b.mean())) for b in bg]).astype(np.float32)  # [B, 3]
    axis = PALETTE[None, :, :] - bg[:, None, :]  # [B, K, 3]
    rel = x - bg[:, None, :]  # [B, N, 3]
    denom = np.maximum((axis * axis).sum(-1), 1.0)  # [B, K]
    alpha = np.clip(np.einsum("bnc,bkc->bnk", rel, axis) / denom[:, None, :], 0.0, 1.0)  # [B, N, K]
    resid = ((rel[:, :, None, :] - alpha[..., None] * axis[:, None, :, :]) ** 2).sum(-1)  # [B, N, K]
    k = resid.argmin(-1)
    a = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    r = np.sqrt(np.take_along_axis(resid, k[..., None], -1)[..., 0])
    fallback = np.clip(np.sqrt((rel * rel).sum(-1)) / 60.0, 0.0, 1.0)
    a = np.where(r > 40.0, fallback, a)
    out = x + (1.0 - a)[..., None] * (target - bg)[:, None, :]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(B, H, W, 3)


class HiddenUtility:
    """``faithfulness_weight * TestbedReward score + aesthetic_weight * background warmth``."""

    def __init__(self, faithfulness_weight: float = 1.0, aesthetic_weight: float = 0.5, reward: TestbedReward | None = None):
        self.faithfulness_weight = float(faithfulness_weight)
        self.aesthetic_weight = float(aesthetic_weight)
        self.reward = reward or TestbedReward()

    def components(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """``{"utility", "faithfulness", "warmth", "strict"}`` as float32 numpy ``[B]``."""
        arr = to_uint8_batch(images)
        res = self.reward.evaluate(arr, prompts)
        warmth = background_warmth(arr)
        utility = self.faithfulness_weight * res["score"] + self.aesthetic_weight * warmth
        return {
            "utility": utility.astype(np.float32),
            "faithfulness": res["score"],
            "warmth": warmth,
            "strict": res["strict"],
        }

    def __call__(self, images, prompts: Sequence[str]):
        import torch

        return torch.from_numpy(self.components(images, prompts)["utility"])


class StyleReward:
    """The hidden utility as a reward (``"testbed_style"``): ``reward(images, prompts, metadata=None)``.

    ``.scores`` = utility; ``.details``: ``faithfulness``, ``warmth``, ``strict``.
    """

    name = "testbed_style"

    def __init__(self, faithfulness_weight: float = 1.0, aesthetic_weight: float = 0.5):
        self.utility = HiddenUtility(faithfulness_weight, aesthetic_weight)

    def __call__(self, images, prompts: Sequence[str], metadata: Any = None):
        import torch

        comps = self.utility.components(images, prompts)
        details = {k: torch.from_numpy(comps[k]) for k in ("faithfulness", "warmth", "strict")}
        return make_output(torch.from_numpy(comps["utility"]), details)


# ----------------------------------------------------------------------------- model-free sampler


class WorldSampler:
    """A stand-in for a text-to-image model: renders the prompt's scene, with mistakes.

    ``sampler(prompts, seeds) -> float tensor [B, 3, H, W]`` in [0, 1]. For each image,
    every attribute in ``error_kinds`` is independently made wrong with probability
    ``error_rate`` (:func:`~diffalign.testbed.world.perturb_scene`), and the image is drawn
    in the target (warm) style with probability ``warm_rate``, else in ``style``.
    Deterministic in (prompt, seed).
    """

    def __init__(
        self,
        error_rate: float = 0.3,
        resolution: int = 32,
        warm_rate: float = 0.02,
        error_kinds: Sequence[str] = ("colour", "shape", "count"),
        style: str | None = None,
        name: str | None = None,
    ):
        if not 0.0 <= error_rate <= 1.0 or not 0.0 <= warm_rate <= 1.0:
            raise ValueError("error_rate and warm_rate must be in [0, 1]")
        self.error_rate = float(error_rate)
        self.resolution = int(resolution)
        self.warm_rate = float(warm_rate)
        self.error_kinds = tuple(error_kinds)
        self.style = resolve_style(style)
        self.name = name or f"testbed-world-err{self.error_rate:g}"

    def render_one(self, prompt: str, seed: int) -> np.ndarray:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE770])
        scene = parse_caption(prompt)
        kinds = [k for k in self.error_kinds if rng.random() < self.error_rate]
        if kinds:
            scene = perturb_scene(scene, rng, kinds)
        style = STYLES["warm"] if rng.random() < self.warm_rate else self.style
        return render(scene, self.resolution, style, seed)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]):
        prompts, seeds = list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"WorldSampler: {len(prompts)} prompts but {len(seeds)} seeds")
        return to_float_tensor(np.stack([self.render_one(p, s) for p, s in zip(prompts, seeds)]))


world_sampler = WorldSampler()


# ----------------------------------------------------------------------------- pairs


def _uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def make_pairs(
    sampler: Callable[[list[str], list[int]], Any],
    prompts: Sequence[str],
    n_pairs: int,
    seed: int = 0,
    *,
    utility: HiddenUtility | None = None,
    temperature: float = 0.1,
    tie_margin: float = 0.05,
    style_mismatch: bool = False,
    batch_size: int = 64,
    model_name: str | None = None,
    jpeg_quality: int = 95,
    n_users: int = 100,
    images_per_prompt: int = 2,
    out_path: str | Path | None = None,
):
    """``n_pairs`` Pick-a-Pic v2-schema preference pairs labelled by the hidden utility.

    ``sampler(prompts, seeds)`` returns a float tensor ``[B, 3, H, W]`` in [0, 1]; each pair
    is two samples (different seeds) of one prompt drawn uniformly from ``prompts``.
    Returns a ``pyarrow.Table`` (schema :func:`pickapic_schema`); writes it to
    ``out_path`` (parquet) if given. Deterministic in ``seed`` for a deterministic sampler;
    the same seed gives the same images and labels with and without ``style_mismatch``.

    ``images_per_prompt`` K >= 2: each pair draws K samples and shows the labeller the
    highest- and the lowest-utility one (in random order), like keeping the most
    informative comparison of a K-image Pick-a-Pic session; K=2 is a plain random pair.
    Larger K costs K/2 times the sampling and gives pairs with larger utility gaps.
    """
    import pyarrow as pa

    prompts = list(prompts)
    if not prompts:
        raise ValueError("make_pairs: no prompts")
    if n_pairs < 1:
        raise ValueError("make_pairs: n_pairs must be >= 1")
    if temperature <= 0:
        raise ValueError("make_pairs: temperature must be > 0")
    K = int(images_per_prompt)
    if K < 2:
        raise ValueError(f"make_pairs: images_per_prompt must be >= 2, got {images_per_prompt}")
    utility = utility or HiddenUtility()
    name = model_name or getattr(sampler, "name", None) or "base"
    rng = np.random.default_rng([int(seed), 0xDA17])
    prompt_idx = rng.integers(0, len(prompts), size=n_pairs)
    seeds = rng.integers(0, 2**31 - 1, size=(n_pairs, K))
    label_rng = np.random.default_rng([int(seed), 0x1ABE])
    id_rng = np.random.default_rng([int(seed), 0x01D5])
    order_rng = np.random.default_rng([int(seed), 0x0DE5])
    cols: dict[str, list] = {c: [] for c in PICKAPIC_COLUMNS}

    for start in range(0, n_pairs, batch_size):
        stop = min(start + batch_size, n_pairs)
        caps = [prompts[int(i)] for i in prompt_idx[start:stop]]
        flat_prompts = [c for c in caps for _ in range(K)]
        flat_seeds = [int(s) for s in seeds[start:stop].reshape(-1)]
        images = to_uint8_batch(sampler(flat_prompts, flat_seeds))
        if images.shape[0] != len(flat_prompts):
            raise ValueError(f"make_pairs: sampler returned {images.shape[0]} images for {len(flat_prompts)} prompts")
        jpgs = [encode_jpeg(im, jpeg_quality) for im in images]
        decoded = np.stack([decode_image(j) for j in jpgs])  # score what the labeller sees
        u = utility.components(decoded, flat_prompts)["utility"].astype(np.float64)
        for j, cap in enumerate(caps):
            j0, j1 = K * j, K * j + 1
            if K > 2:  # best and worst of the K samples, in random order
                uj = u[K * j : K * (j + 1)]
                hi, lo = K * j + int(np.argmax(uj)), K * j + int(np.argmin(uj))
                if hi == lo:  # all K equal: any two distinct samples (a tie below)
                    hi, lo = K * j, K * j + 1
                j0, j1 = (hi, lo) if order_rng.random() < 0.5 else (lo, hi)
            jpg0, jpg1 = jpgs[j0], jpgs[j1]
            different = jpg0 != jpg1
            du = u[j0] - u[j1]
            draw = label_rng.random()  # drawn for every pair so labels do not depend on ties upstream
            if not different or abs(du) < tie_margin:
                l0 = l1 = 0.5
            else:
                p0 = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, du / temperature))))  # clamped: no overflow at tiny T
                l0 = 1.0 if draw < p0 else 0.0
                l1 = 1.0 - l0
            if style_mismatch and l0 != l1:
                w = j0 if l0 > l1 else j1
                restyled = encode_jpeg(apply_target_style(decoded[w : w + 1])[0], jpeg_quality)
                if l0 > l1:
                    jpg0 = restyled
                else:
                    jpg1 = restyled
            uid0, uid1 = _uid(id_rng), _uid(id_rng)
            cols["caption"].append(cap)
            cols["jpg_0"].append(jpg0)
            cols["jpg_1"].append(jpg1)
            cols["label_0"].append(l0)
            cols["label_1"].append(l1)
            cols["has_label"].append(True)
            cols["are_different"].append(bool(jpg0 != jpg1))
            cols["model_0"].append(name)
            cols["model_1"].append(name)
            cols["ranking_id"].append(int(seed) * 1_000_000_000 + start + j)
            cols["user_id"].append(int(id_rng.integers(1, n_users + 1)))
            cols["best_image_uid"].append(uid0 if l0 > l1 else uid1 if l1 > l0 else "")
            cols["image_0_uid"].append(uid0)
            cols["image_1_uid"].append(uid1)

    counts: dict[str, int] = {}
    for c in cols["caption"]:
        counts[c] = counts.get(c, 0) + 1
    cols["num_example_per_prompt"] = [counts[c] for c in cols["caption"]]
    table = pa.table(cols, schema=pickapic_schema())
    if out_path is not None:
        write_pairs(table, out_path)
    return table


def write_pairs(table, path: str | Path) -> Path:
    """Write a pairs table as one parquet file (parent directories created)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_pairs(path: str | Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def decode_pairs(table) -> tuple[np.ndarray, np.ndarray]:
    """``(images_0, images_1)``, each ``uint8 [N, H, W, 3]``, decoded from a pairs table."""
    d = table.select(["jpg_0", "jpg_1"]).to_pydict()
    return np.stack([decode_image(b) for b in d["jpg_0"]]), np.stack([decode_image(b) for b in d["jpg_1"]])
