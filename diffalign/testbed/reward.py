"""GenEval-style verifiable reward for the testbed world, computed from pixels alone.

Pipeline, per image:

1. **Parse** the prompt back into a :class:`~diffalign.testbed.world.Scene`
   (:func:`parse_caption`; a prompt outside the caption grammar raises
   :class:`PromptParseError`, a ``ValueError`` naming the prompt).
2. **Segment**: background = per-channel median of the 1-px border ring; every pixel is
   assigned to the nearest of {background, the 6 palette colours} (a pixel farther than
   ``max_colour_dist`` from every palette colour counts as background); 4-connected
   components of same-colour pixels (vectorised min-label propagation with pointer
   jumping, no scipy) smaller than ``min_area_frac`` of the image are dropped.
3. **Describe** each component with *soft* measurements (each pixel of the component
   and of its 1-px ring weighs its coverage ``alpha``, the projection of its colour on
   the background->palette-colour line): colour; shape from the fill ratio
   ``area / (width * height)`` (square ~1, circle ~pi/4, apex-up triangle ~1/2; width =
   sum over columns of the column's max alpha) and the downward shift of the mass
   centroid (triangle ~+1/6 of its height, others ~0); aspect > 1.5 is shape ``"other"``;
   size ``small``/``large`` by extent ``max(width, height)`` vs ``SIZE_THRESHOLD`` (0.30
   of the side); centroid.
4. **Check** each attribute the prompt names, per object group. The objects a group
   talks about, ``T``, are the components of its colour (and shape, if another group
   names the same colour), or - if there are none - all components whose colour no
   other group names. Then

   * ``colour``: some component has the group's colour;
   * ``shape``: ``T`` is non-empty and every component in it has the named shape;
   * ``count``: ``len(T)`` equals the named count (1-3);
   * ``size`` (if named): ``T`` is non-empty and every component has the named size;
   * ``position`` (if named): ``T`` is non-empty and every centroid is on that side
     (x < 0.4 for left, x > 0.6 for right, y < 0.4 top, y > 0.6 bottom).

Score = fraction of checks passed; ``strict`` = 1 if all passed. Per-attribute details are
the fraction of that attribute's checks passed in each image, NaN where the prompt does
not name the attribute (use ``torch.nanmean``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from .world import (
    COLOURS,
    PREFIXES,
    SHAPES,
    SIZE_THRESHOLD,
    SIZES,
    ObjectGroup,
    Scene,
    to_uint8_batch,
)

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count", "size", "position")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)

# Shape decision thresholds (see module docstring).
SQUARE_FILL = 0.88
CIRCLE_FILL_MIN = 0.66
TRIANGLE_FILL_MAX = 0.75
TRIANGLE_SKEW = 0.06
MAX_ASPECT = 1.5
ALPHA_FLOOR = 0.15
SIDE_BOUND = 0.4


class PromptParseError(ValueError):
    """A prompt that is not in the testbed caption grammar."""


# ----------------------------------------------------------------------------- parser

_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_POSITION_SUFFIXES = {
    "on the left": "left", "at the left": "left", "to the left": "left",
    "on the right": "right", "at the right": "right", "to the right": "right",
    "at the top": "top", "on the top": "top", "on top": "top",
    "at the bottom": "bottom", "on the bottom": "bottom",
}
_PLURALS = {s + "s": s for s in SHAPES}


def _fail(text: str, why: str) -> PromptParseError:
    return PromptParseError(f"testbed reward cannot parse prompt {text!r}: {why}")


@lru_cache(maxsize=65536)
def parse_caption(text: str) -> Scene:
    """The :class:`Scene` a caption describes (inverse of :func:`~diffalign.testbed.world.caption`).

    Case, surrounding whitespace and a trailing period are ignored; ``an``/``one`` are
    accepted for ``a``, and ``on the top``/``on the bottom`` for ``at the ...``.
    """
    if not isinstance(text, str):
        raise _fail(str(text), "not a string")
    norm = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()
    if not norm:
        raise _fail(text, "empty prompt")
    prefix = ""
    for p in PREFIXES:
        if p and norm.startswith(p + " "):
            prefix, norm = p, norm[len(p) + 1:]
            break
    position = None
    for phrase, pos in _POSITION_SUFFIXES.items():
        if norm.endswith(" " + phrase):
            position, norm = pos, norm[: -len(phrase) - 1]
            break
    groups = []
    for part in norm.split(" and "):
        words = part.split()
        if len(words) not in (3, 4):
            raise _fail(text, f"expected '<count> [size] <colour> <shape>', got {part!r}")
        count_word, *mid, shape_word = words
        if count_word not in _COUNTS:
            raise _fail(text, f"unknown count word {count_word!r} (expected a/an/one/two/three)")
        shape = _PLURALS.get(shape_word, shape_word)
        if shape not in SHAPES:
            raise _fail(text, f"unknown shape {shape_word!r} (expected {', '.join(SHAPES)})")
        size = None
        if len(mid) == 2:
            size, colour = mid
            if size not in SIZES:
                raise _fail(text, f"unknown size {size!r} (expected {', '.join(SIZES)})")
        else:
            (colour,) = mid
        if colour not in COLOURS:
            raise _fail(text, f"unknown colour {colour!r} (expected {', '.join(COLOURS)})")
        groups.append(ObjectGroup(colour, shape, _COUNTS[count_word], size))
    try:
        return Scene(tuple(groups), position, prefix)
    except ValueError as e:
        raise _fail(text, str(e)) from None


# ----------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class Component:
    """One connected same-colour region (coordinates relative to the image side)."""

    colour: str
    shape: str  # circle / square / triangle / other
    size: str  # small / large
    area: float  # soft pixel count
    cx: float
    cy: float
    extent: float  # max(bbox h, bbox w) / image side
    fill: float  # area / bbox area
    skew: float  # downward shift of the mass centroid from the profile centre, in heights
    aspect: float = 1.0  # max(width, height) / min(width, height)


def background_colour(images_u8: np.ndarray) -> np.ndarray:
    """Per-image background estimate: channel median of the 1-px border ring -> ``[B, 3]`` float."""
    x = images_u8
    ring = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)
    return np.median(ring.astype(np.float32), axis=1)


def classify_pixels(images_u8: np.ndarray, max_colour_dist: float = 80.0) -> np.ndarray:
    """Pixel classes ``[B, H, W]`` int8: 0 = background, k = palette colour ``k - 1``."""
    B, H, W, _ = images_u8.shape
    x = images_u8.astype(np.float32).reshape(B, H * W, 3)
    bg = background_colour(images_u8)
    d_bg = ((x - bg[:, None, :]) ** 2).sum(-1)  # [B, N]
    x2 = (x * x).sum(-1, keepdims=True)
    d_pal = x2 - 2.0 * (x @ PALETTE.T) + (PALETTE * PALETTE).sum(-1)  # [B, N, K]
    k = d_pal.argmin(-1)
    d_best = np.take_along_axis(d_pal, k[..., None], -1)[..., 0]
    fg = (d_best < d_bg) & (d_best < max_colour_dist**2)
    return np.where(fg, k + 1, 0).astype(np.int8).reshape(B, H, W)


def connected_components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero classes.

    Returns ``int64 [B, H, W]`` labels: for a foreground pixel, the flat index (into the
    whole batch) of the smallest pixel of its component; ``-1`` for background.
    """
    B, H, W = cls.shape
    n = B * H * W
    fg = cls > 0
    big = np.int64(n)
    lab = np.where(fg, np.arange(n, dtype=np.int64).reshape(B, H, W), big)
    same_x = fg[:, :, 1:] & (cls[:, :, 1:] == cls[:, :, :-1])
    same_y = fg[:, 1:, :] & (cls[:, 1:, :] == cls[:, :-1, :])
    fg_idx = np.flatnonzero(fg)
    while True:
        new = lab.copy()
        np.minimum(new[:, :, :-1], np.where(same_x, lab[:, :, 1:], big), out=new[:, :, :-1])
        np.minimum(new[:, :, 1:], np.where(same_x, lab[:, :, :-1], big), out=new[:, :, 1:])
        np.minimum(new[:, :-1, :], np.where(same_y, lab[:, 1:, :], big), out=new[:, :-1, :])
        np.minimum(new[:, 1:, :], np.where(same_y, lab[:, :-1, :], big), out=new[:, 1:, :])
        flat = new.reshape(-1)
        for _ in range(2):  # pointer jumping: a label is a pixel of the same component
            flat[fg_idx] = flat[flat[fg_idx]]
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


def _ring_labels(lab: np.ndarray) -> np.ndarray:
    """Component labels grown by one pixel (8-neighbourhood) into background pixels."""
    B, H, W = lab.shape
    pad = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    grown = lab.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                np.maximum(grown, pad[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W], out=grown)
    return np.where(lab >= 0, lab, grown)


def segment(
    images,
    *,
    min_area_frac: float = 0.006,
    max_colour_dist: float = 80.0,
) -> list[list[Component]]:
    """Components of every image in a batch (any input :func:`to_uint8_batch` accepts).

    Components come from the hard pixel classes; their measurements are *soft*: each
    pixel of the component plus its 1-px ring contributes its coverage
    ``alpha = clip(<x - bg, c - bg> / |c - bg|^2, 0, 1)``, so anti-aliased edges count
    fractionally and small shapes measure close to their true area and extent.
    """
    arr = to_uint8_batch(images)
    B, H, W, _ = arr.shape
    side = float(min(H, W))
    cls = classify_pixels(arr, max_colour_dist)
    lab = connected_components(cls)
    out: list[list[Component]] = [[] for _ in range(B)]
    hard = lab.reshape(-1)
    if not (hard >= 0).any():
        return out
    roots = np.unique(hard[hard >= 0])  # one root pixel per component
    n_comp = roots.size
    ring = _ring_labels(lab).reshape(-1)
    pix = np.flatnonzero(ring >= 0)
    comp = np.searchsorted(roots, ring[pix])  # dense component id per member pixel
    rem = pix % (H * W)
    ys, xs = rem // W, rem % W
    img_of = roots // (H * W)
    colour_idx = cls.reshape(-1)[roots].astype(np.int64) - 1
    # soft coverage of each member pixel
    bg = background_colour(arr)  # [B, 3]
    c = PALETTE[colour_idx]  # [C, 3]
    b = bg[img_of]  # [C, 3]
    axis = c - b
    denom = np.maximum((axis * axis).sum(-1), 1.0)
    xpix = arr.reshape(-1, 3)[pix].astype(np.float32)
    proj = ((xpix - b[comp]) * axis[comp]).sum(-1) / denom[comp]
    # noise floor: coverage below ALPHA_FLOOR counts 0, above 1 - ALPHA_FLOOR counts 1 (linear between)
    alpha = np.clip((proj - ALPHA_FLOOR) / (1.0 - 2.0 * ALPHA_FLOOR), 0.0, 1.0)
    is_hard = hard[pix] >= 0
    # hard bbox (drops 1-px slivers such as anti-aliased edges classified as another colour)
    hy, hx, hc = ys[is_hard], xs[is_hard], comp[is_hard]
    hard_area = np.bincount(hc, minlength=n_comp)
    ymin = np.full(n_comp, H, dtype=np.int64); np.minimum.at(ymin, hc, hy)
    ymax = np.full(n_comp, -1, dtype=np.int64); np.maximum.at(ymax, hc, hy)
    xmin = np.full(n_comp, W, dtype=np.int64); np.minimum.at(xmin, hc, hx)
    xmax = np.full(n_comp, -1, dtype=np.int64); np.maximum.at(xmax, hc, hx)
    # soft measurements
    area = np.bincount(comp, weights=alpha, minlength=n_comp)
    colmax = np.zeros(n_comp * W); np.maximum.at(colmax, comp * W + xs, alpha)
    rowmax = np.zeros(n_comp * H); np.maximum.at(rowmax, comp * H + ys, alpha)
    width = colmax.reshape(n_comp, W).sum(1)
    height = rowmax.reshape(n_comp, H).sum(1)
    safe = np.maximum(area, 1e-6)
    cx = (np.bincount(comp, weights=alpha * (xs + 0.5), minlength=n_comp) / safe) / W
    cy = (np.bincount(comp, weights=alpha * (ys + 0.5), minlength=n_comp) / safe) / H
    # downward shift of the mass centroid from the centre of the row profile, in heights:
    # an apex-up triangle has its centroid 2/3 of the way down (skew ~ +1/6), circles and squares ~0
    rows = rowmax.reshape(n_comp, H)
    profile_cy = (rows * (np.arange(H) + 0.5)).sum(1) / np.maximum(height, 1e-6) / H
    skew = (cy - profile_cy) * H / np.maximum(height, 1e-6)
    fill = area / np.maximum(width * height, 1e-6)
    extent = np.maximum(width, height) / side
    aspect = np.maximum(width, height) / np.maximum(np.minimum(width, height), 1e-6)
    thin = np.minimum(ymax - ymin, xmax - xmin) + 1 < 2
    keep = (area >= max(3.0, min_area_frac * H * W)) & ~thin & (hard_area > 0)
    for j in np.flatnonzero(keep):
        out[int(img_of[j])].append(
            Component(
                colour=COLOUR_NAMES[int(colour_idx[j])],
                shape=classify_shape(float(fill[j]), float(skew[j]), float(aspect[j])),
                size="large" if extent[j] >= SIZE_THRESHOLD else "small",
                area=float(area[j]),
                cx=float(cx[j]),
                cy=float(cy[j]),
                extent=float(extent[j]),
                fill=float(fill[j]),
                skew=float(skew[j]),
                aspect=float(aspect[j]),
            )
        )
    return out


def classify_shape(fill: float, skew: float, aspect: float) -> str:
    """circle / square / triangle / other from soft fill ratio, centroid skew and aspect."""
    if aspect > MAX_ASPECT:
        return "other"
    if skew > TRIANGLE_SKEW:
        return "triangle" if fill < TRIANGLE_FILL_MAX else "other"
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL_MIN:
        return "circle"
    return "other"


# ----------------------------------------------------------------------------- checking


def _on_side(c: Component, position: str) -> bool:
    return {
        "left": c.cx < SIDE_BOUND,
        "right": c.cx > 1 - SIDE_BOUND,
        "top": c.cy < SIDE_BOUND,
        "bottom": c.cy > 1 - SIDE_BOUND,
    }[position]


def bind_groups(scene: Scene, components: Sequence[Component]):
    """For each object group of the scene: ``(group, mine, target)``. ``mine`` are the components
    of the group's colour (and shape, if another group names the same colour); ``target``, the
    objects the group's checks talk about, is ``mine`` or - if empty - every component whose colour
    no other group names."""
    named_colours = [g.colour for g in scene.groups]
    for i, g in enumerate(scene.groups):
        others = named_colours[:i] + named_colours[i + 1:]
        mine = [c for c in components if c.colour == g.colour]
        if g.colour in others:  # colour shared: bind by shape too
            mine = [c for c in mine if c.shape == g.shape]
        target = mine if mine else [c for c in components if c.colour not in set(others)]
        yield g, mine, target


def check_scene(scene: Scene, components: Sequence[Component]) -> dict[str, list[bool]]:
    """Pass/fail of every check the scene's caption implies, grouped by attribute."""
    checks: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for g, mine, target in bind_groups(scene, components):
        checks["colour"].append(bool(mine))
        checks["shape"].append(bool(target) and all(c.shape == g.shape for c in target))
        checks["count"].append(len(target) == g.count)
        if g.size is not None:
            checks["size"].append(bool(target) and all(c.size == g.size for c in target))
        if scene.position is not None:
            checks["position"].append(bool(target) and all(_on_side(c, scene.position) for c in target))
    return checks


# Soft grading (``TestbedReward(soft=True)``, reward name ``testbed_soft``): the scale of each
# logistic margin, in the units of the measurement it grades.
SOFT_SIDE = 0.04  # centroid coordinate (fraction of the side)
SOFT_EXTENT = 0.03  # extent (fraction of the side)
SOFT_FILL = 0.03  # fill ratio
SOFT_SKEW = 0.02  # centroid skew (heights)
SOFT_ASPECT = 0.1  # aspect ratio


def _sig(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0))))


def shape_grade(c: Component, shape: str) -> float:
    """Soft version of ``classify_shape(...) == shape``: the product of logistic margins to the
    decision thresholds the hard classifier uses (0.5 on a threshold, -> 1 deep inside the class)."""
    aspect = _sig((MAX_ASPECT - c.aspect) / SOFT_ASPECT)
    flat = _sig((TRIANGLE_SKEW - c.skew) / SOFT_SKEW)
    if shape == "triangle":
        return aspect * _sig((c.skew - TRIANGLE_SKEW) / SOFT_SKEW) * _sig((TRIANGLE_FILL_MAX - c.fill) / SOFT_FILL)
    if shape == "square":
        return aspect * flat * _sig((c.fill - SQUARE_FILL) / SOFT_FILL)
    if shape == "circle":
        return aspect * flat * _sig((c.fill - CIRCLE_FILL_MIN) / SOFT_FILL) * _sig((SQUARE_FILL - c.fill) / SOFT_FILL)
    return 0.0


def _side_grade(c: Component, position: str) -> float:
    margin = {"left": SIDE_BOUND - c.cx, "right": c.cx - (1 - SIDE_BOUND),
              "top": SIDE_BOUND - c.cy, "bottom": c.cy - (1 - SIDE_BOUND)}[position]
    return _sig(margin / SOFT_SIDE)


def grade_scene(scene: Scene, components: Sequence[Component]) -> dict[str, list[float]]:
    """Soft counterpart of :func:`check_scene`: the same checks on the same object binding, with
    shape, size and position graded in [0, 1] by logistic margins to the hard thresholds (the mean
    over the group's components instead of "all of them"); colour and count stay pass/fail.

    A shaped training reward for online RL: every sample gets a distinct score that says how close
    it is to passing, where the hard checks give most samples of a group the same score."""
    checks: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for g, mine, target in bind_groups(scene, components):
        checks["colour"].append(float(bool(mine)))
        checks["shape"].append(float(np.mean([shape_grade(c, g.shape) for c in target])) if target else 0.0)
        checks["count"].append(float(len(target) == g.count))
        if g.size is not None:
            sign = 1.0 if g.size == "large" else -1.0
            checks["size"].append(float(np.mean([_sig(sign * (c.extent - SIZE_THRESHOLD) / SOFT_EXTENT) for c in target]))
                                  if target else 0.0)
        if scene.position is not None:
            checks["position"].append(float(np.mean([_side_grade(c, scene.position) for c in target])) if target else 0.0)
    return checks


def _output_class():
    try:  # the package reward API, when present (imported lazily: no import cycle)
        from diffalign.rewards.base import RewardOutput  # type: ignore

        return RewardOutput
    except ImportError:
        return TestbedRewardOutput


@dataclass
class TestbedRewardOutput:
    """Minimal stand-in for ``diffalign.rewards.base.RewardOutput``."""

    __test__ = False  # not a pytest class

    scores: Any  # float32 tensor [B]
    details: dict[str, Any] = field(default_factory=dict)


def make_output(scores, details: dict):
    cls = _output_class()
    try:
        return cls(scores=scores, details=details)
    except TypeError:
        return cls(scores, details)


class TestbedReward:
    """Verifiable prompt-faithfulness reward: ``reward(images, prompts, metadata=None)``.

    ``images``: float tensor ``[B, 3, H, W]`` in [0, 1] (also uint8 ``[B, H, W, 3]`` arrays
    or a list of PIL images). Returns an object with ``.scores`` (float32 tensor ``[B]``,
    fraction of checks passed) and ``.details`` (float32 tensors ``[B]``: ``strict`` 0/1,
    ``colour``/``shape``/``count``/``size``/``position`` fraction passed or NaN if not
    named, ``n_components``).

    ``soft=True`` (the registered ``testbed_soft``) grades shape, size and position by
    :func:`grade_scene` instead of passing/failing them: a shaped training reward for online RL
    (``strict`` then counts a graded check as passed at >= 0.5, its hard threshold).
    """

    __test__ = False  # not a pytest class
    name = "testbed"

    def __init__(self, min_area_frac: float = 0.006, max_colour_dist: float = 80.0, chunk_size: int = 256,
                 soft: bool = False):
        self.soft = bool(soft)
        self.min_area_frac = float(min_area_frac)
        self.max_colour_dist = float(max_colour_dist)
        self.chunk_size = int(chunk_size)

    def evaluate(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Numpy version of the reward: ``{"score", "strict", <attribute>..., "n_components"}``."""
        arr = to_uint8_batch(images)
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if len(prompts) != arr.shape[0]:
            raise ValueError(f"testbed reward: {arr.shape[0]} images but {len(prompts)} prompts")
        scenes = [parse_caption(p) for p in prompts]
        B = arr.shape[0]
        res = {k: np.full(B, np.nan, dtype=np.float32) for k in ("score", "strict", *ATTRIBUTES, "n_components")}
        for s in range(0, B, self.chunk_size):
            comps = segment(arr[s : s + self.chunk_size], min_area_frac=self.min_area_frac, max_colour_dist=self.max_colour_dist)
            for j, cs in enumerate(comps):
                i = s + j
                checks = grade_scene(scenes[i], cs) if self.soft else check_scene(scenes[i], cs)
                flat = [v for a in ATTRIBUTES for v in checks[a]]
                res["score"][i] = np.mean(flat)
                res["strict"][i] = float(all(v >= 0.5 for v in flat))
                for a in ATTRIBUTES:
                    if checks[a]:
                        res[a][i] = np.mean(checks[a])
                res["n_components"][i] = len(cs)
        return res

    def __call__(self, images, prompts: Sequence[str], metadata: Any = None):
        import torch

        res = self.evaluate(images, prompts)
        details = {k: torch.from_numpy(v) for k, v in res.items() if k != "score"}
        return make_output(torch.from_numpy(res["score"]), details)


def testbed_reward(images, prompts: Sequence[str], metadata: Any = None):
    """Module-level callable with the default :class:`TestbedReward` settings."""
    return _DEFAULT(images, prompts, metadata)


testbed_reward.__test__ = False  # not a pytest test when imported into a test module


_DEFAULT = TestbedReward()
